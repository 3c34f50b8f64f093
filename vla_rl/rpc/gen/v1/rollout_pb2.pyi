from vla_rl.rpc.gen.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActRequest(_message.Message):
    __slots__ = ("request_id", "images", "instructions", "temperature", "top_k", "greedy", "seed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _common_pb2.Tensor
    instructions: _containers.RepeatedScalarFieldContainer[str]
    temperature: float
    top_k: int
    greedy: bool
    seed: int
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., instructions: _Optional[_Iterable[str]] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., greedy: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class ActReply(_message.Message):
    __slots__ = ("request_id", "action_tokens", "actions", "logprobs", "policy_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    action_tokens: _common_pb2.Tensor
    actions: _common_pb2.Tensor
    logprobs: _common_pb2.Tensor
    policy_version: int
    def __init__(self, request_id: _Optional[str] = ..., action_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., actions: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("version", "sha256", "total_bytes", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    sha256: str
    total_bytes: int
    data: bytes
    def __init__(self, version: _Optional[int] = ..., sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushAdapterReply(_message.Message):
    __slots__ = ("policy_version", "sha256")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    sha256: str
    def __init__(self, policy_version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("policy_version", "base_model_id", "engine", "action_chunk", "action_dim", "adapter_sha256")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ACTION_CHUNK_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    base_model_id: str
    engine: str
    action_chunk: int
    action_dim: int
    adapter_sha256: str
    def __init__(self, policy_version: _Optional[int] = ..., base_model_id: _Optional[str] = ..., engine: _Optional[str] = ..., action_chunk: _Optional[int] = ..., action_dim: _Optional[int] = ..., adapter_sha256: _Optional[str] = ...) -> None: ...
