from vla_rl.rpc.gen.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartCollectionRequest(_message.Message):
    __slots__ = ("run_id", "task_ids", "num_envs", "sim_backend", "pipeline_stage_num", "group_size", "max_episode_steps", "rollout_target", "buffer_url", "stream", "seed", "max_staleness", "start_version", "iterations", "temperature", "reward_mode", "control_mode", "task_modules", "steps_per_segment", "buffer_maxlen", "image_size", "env_type", "video_dir", "info_on_video", "ignore_terminations")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ENVS_FIELD_NUMBER: _ClassVar[int]
    SIM_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_STAGE_NUM_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_EPISODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_TARGET_FIELD_NUMBER: _ClassVar[int]
    BUFFER_URL_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    START_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_MODE_FIELD_NUMBER: _ClassVar[int]
    TASK_MODULES_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    BUFFER_MAXLEN_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENV_TYPE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_DIR_FIELD_NUMBER: _ClassVar[int]
    INFO_ON_VIDEO_FIELD_NUMBER: _ClassVar[int]
    IGNORE_TERMINATIONS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    num_envs: int
    sim_backend: str
    pipeline_stage_num: int
    group_size: int
    max_episode_steps: int
    rollout_target: str
    buffer_url: str
    stream: str
    seed: int
    max_staleness: int
    start_version: int
    iterations: int
    temperature: float
    reward_mode: str
    control_mode: str
    task_modules: _containers.RepeatedScalarFieldContainer[str]
    steps_per_segment: int
    buffer_maxlen: int
    image_size: int
    env_type: str
    video_dir: str
    info_on_video: bool
    ignore_terminations: bool
    def __init__(self, run_id: _Optional[str] = ..., task_ids: _Optional[_Iterable[str]] = ..., num_envs: _Optional[int] = ..., sim_backend: _Optional[str] = ..., pipeline_stage_num: _Optional[int] = ..., group_size: _Optional[int] = ..., max_episode_steps: _Optional[int] = ..., rollout_target: _Optional[str] = ..., buffer_url: _Optional[str] = ..., stream: _Optional[str] = ..., seed: _Optional[int] = ..., max_staleness: _Optional[int] = ..., start_version: _Optional[int] = ..., iterations: _Optional[int] = ..., temperature: _Optional[float] = ..., reward_mode: _Optional[str] = ..., control_mode: _Optional[str] = ..., task_modules: _Optional[_Iterable[str]] = ..., steps_per_segment: _Optional[int] = ..., buffer_maxlen: _Optional[int] = ..., image_size: _Optional[int] = ..., env_type: _Optional[str] = ..., video_dir: _Optional[str] = ..., info_on_video: _Optional[bool] = ..., ignore_terminations: _Optional[bool] = ...) -> None: ...

class StopCollectionRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectionStatus(_message.Message):
    __slots__ = ("state", "run_id", "segments_written", "env_steps", "episodes", "policy_version", "error", "act_wait_seconds", "env_step_seconds", "policy_wait_seconds")
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ENV_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACT_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    state: str
    run_id: str
    segments_written: int
    env_steps: int
    episodes: int
    policy_version: int
    error: str
    act_wait_seconds: float
    env_step_seconds: float
    policy_wait_seconds: float
    def __init__(self, state: _Optional[str] = ..., run_id: _Optional[str] = ..., segments_written: _Optional[int] = ..., env_steps: _Optional[int] = ..., episodes: _Optional[int] = ..., policy_version: _Optional[int] = ..., error: _Optional[str] = ..., act_wait_seconds: _Optional[float] = ..., env_step_seconds: _Optional[float] = ..., policy_wait_seconds: _Optional[float] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("task_id", "seed", "session_id", "env_type", "image_size", "control_mode", "reward_mode", "task_modules", "max_episode_steps", "sim_backend", "action_dim", "ignore_terminations")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ENV_TYPE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_MODE_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODE_FIELD_NUMBER: _ClassVar[int]
    TASK_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_EPISODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    SIM_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    IGNORE_TERMINATIONS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    seed: int
    session_id: str
    env_type: str
    image_size: int
    control_mode: str
    reward_mode: str
    task_modules: _containers.RepeatedScalarFieldContainer[str]
    max_episode_steps: int
    sim_backend: str
    action_dim: int
    ignore_terminations: bool
    def __init__(self, task_id: _Optional[str] = ..., seed: _Optional[int] = ..., session_id: _Optional[str] = ..., env_type: _Optional[str] = ..., image_size: _Optional[int] = ..., control_mode: _Optional[str] = ..., reward_mode: _Optional[str] = ..., task_modules: _Optional[_Iterable[str]] = ..., max_episode_steps: _Optional[int] = ..., sim_backend: _Optional[str] = ..., action_dim: _Optional[int] = ..., ignore_terminations: _Optional[bool] = ...) -> None: ...

class ResetReply(_message.Message):
    __slots__ = ("session_id", "image", "instruction")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    image: _common_pb2.Tensor
    instruction: str
    def __init__(self, session_id: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., instruction: _Optional[str] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "action")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    action: _common_pb2.Tensor
    def __init__(self, session_id: _Optional[str] = ..., action: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("image", "instruction", "reward", "terminated", "truncated", "success")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Tensor
    instruction: str
    reward: float
    terminated: bool
    truncated: bool
    success: bool
    def __init__(self, image: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., instruction: _Optional[str] = ..., reward: _Optional[float] = ..., terminated: _Optional[bool] = ..., truncated: _Optional[bool] = ..., success: _Optional[bool] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...
