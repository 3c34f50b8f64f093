"""The env server as a real subprocess: bad requests get clear gRPC statuses and the server keeps
serving; evaluation sessions render real ManiSkill3 frames with the requested image size, reward
and controller; a broken policy (NaN weights) fails the collection with a clear error instead of
writing garbage."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from tests.helpers.procs import ServiceProcess
from vla_rl.evaluation import evaluate
from vla_rl.models.checkpoint import save_policy
from vla_rl.models.tiny import build_tiny_policy, build_tiny_tokenizer
from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from vla_rl.rpc.tensors import from_tensor, to_tensor


@pytest.fixture(scope="module")
def env_process(tmp_path_factory):
    proc = ServiceProcess(
        "services.env_server.main",
        ["--server-id", "test", "--task-modules", TASK_MODULE],
        tmp_path_factory.mktemp("env"),
        "env",
    )
    try:
        proc.wait_healthy()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture
def env_server(env_process):
    """A stub on a connection of its own: each test is its own client, with its own share of
    the server's eval sessions (the ones it leaves open expire)."""
    channel = grpc.insecure_channel(env_process.target)
    yield env_pb2_grpc.EnvServiceStub(channel), env_process
    channel.close()


def _code(call, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=120)
    return err.value.code(), err.value.details()


def _start(**kw) -> env_pb2.StartCollectionRequest:
    base = dict(
        task_ids=["PickCube-v1"],
        num_envs=1,
        max_episode_steps=4,
        rollout_target="127.0.0.1:1",
        buffer_url="memory://",
        control_mode="pd_ee_delta_pose",
    )
    return env_pb2.StartCollectionRequest(**{**base, **kw})


@pytest.mark.parametrize(
    "request_kw, needle",
    [
        ({"task_ids": ["NoSuchTask-v9"]}, "NoSuchTask-v9"),
        ({"task_ids": []}, "task_ids"),
        ({"num_envs": 0}, "num_envs"),
        ({"num_envs": 5000}, "num_envs"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"rollout_target": ""}, "rollout_target"),
        ({"num_envs": 3, "pipeline_stage_num": 2}, "pipeline_stage_num"),
        ({"env_type": "isaaclab"}, "isaaclab"),
        ({"image_size": 8}, "image_size"),
        ({"reward_mode": "shaped"}, "reward_mode"),
        # Checked before the rollout service is asked anything (its target here is unreachable);
        # whether a controller takes the policy's actions is checked once it has said their size
        # (test_collection_checks_the_controller_against_the_policys_action_dim).
        ({"control_mode": "pd_no_such_mode"}, "pd_no_such_mode"),
    ],
)
def test_bad_collection_requests(env_server, request_kw, needle):
    stub, _ = env_server
    code, details = _code(stub.StartCollection, _start(**request_kw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert needle in details
    assert stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10).state == "idle"


def test_unreachable_rollout_server_is_unavailable(env_server):
    stub, _ = env_server
    code, _ = _code(stub.StartCollection, _start())
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_eval_session_reset_and_step(env_server):
    stub, _ = env_server
    reply = stub.Reset(env_pb2.ResetRequest(task_id="PickCube-v1", seed=3), timeout=120)
    image = from_tensor(reply.image, expect_dtype="uint8")
    assert image.shape == (224, 224, 3) and image.std() > 5  # a rendered scene, not a blank
    assert "cube" in reply.instruction
    step = stub.Step(
        env_pb2.StepRequest(session_id=reply.session_id, action=to_tensor(np.zeros(7, np.float32))),
        timeout=60,
    )
    assert from_tensor(step.image).shape == (224, 224, 3)
    assert not step.terminated and not step.truncated

    bad = np.full(7, np.nan, np.float32)
    code, details = _code(
        stub.Step, env_pb2.StepRequest(session_id=reply.session_id, action=to_tensor(bad))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in details
    code, _ = _code(
        stub.Step,
        env_pb2.StepRequest(session_id=reply.session_id, action=to_tensor(np.zeros(5, np.float32))),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _code(
        stub.Step, env_pb2.StepRequest(session_id="nope", action=to_tensor(np.zeros(7, np.float32)))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = _code(stub.Reset, env_pb2.ResetRequest(task_id="NoSuchTask-v9"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NoSuchTask-v9" in details


def test_broken_policy_fails_the_collection_clearly(env_server, tmp_path, redis_url):
    stub, _ = env_server
    policy = build_tiny_policy(seed=0)
    with torch.no_grad():
        policy.language_model.lm_head.weight.fill_(float("nan"))
    ckpt = save_policy(policy, tmp_path / "nan_ckpt", tokenizer=build_tiny_tokenizer())
    rollout = ServiceProcess(
        "services.rollout_server.main", ["--checkpoint", str(ckpt)], tmp_path, "rollout"
    )
    try:
        rollout.wait_healthy()
        stub.StartCollection(
            _start(rollout_target=rollout.target, buffer_url=redis_url, iterations=1), timeout=60
        )
        deadline = time.monotonic() + 120
        status = stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10)
        while status.state in ("running", "stopping") and time.monotonic() < deadline:
            time.sleep(0.5)
            status = stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10)
        assert status.state == "failed", status
        assert status.segments_written == 0
        assert (
            "INTERNAL" in status.error or "finite" in status.error or "nan" in status.error.lower()
        )
    finally:
        rollout.stop()
    # The server still takes work.
    assert stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10).state == "failed"


def _reset(stub, **kw) -> env_pb2.ResetReply:
    return stub.Reset(env_pb2.ResetRequest(**{"task_id": "PickCube-v1", **kw}), timeout=120)


def _step_zeros(stub, session_id: str) -> env_pb2.StepReply:
    zeros = to_tensor(np.zeros(7, np.float32))
    return stub.Step(env_pb2.StepRequest(session_id=session_id, action=zeros), timeout=60)


def test_reset_refuses_unknown_env_type(env_server):
    stub, _ = env_server
    code, details = _code(
        stub.Reset, env_pb2.ResetRequest(task_id="PickCube-v1", env_type="isaaclab")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "isaaclab" in details
    assert _reset(stub, env_type="maniskill", image_size=32).session_id


def test_eval_session_image_size_and_reward_mode(env_server):
    stub, _ = env_server
    small = _reset(stub, seed=3, image_size=64, reward_mode="sparse")
    assert from_tensor(small.image, expect_dtype="uint8").shape == (64, 64, 3)
    step = _step_zeros(stub, small.session_id)
    assert from_tensor(step.image).shape == (64, 64, 3)
    assert step.reward == 0.0 and not step.success  # sparse: nothing until success
    # The same session with the same config is reused.
    again = _reset(stub, seed=4, image_size=64, reward_mode="sparse", session_id=small.session_id)
    assert again.session_id == small.session_id
    # Another reward mode is another env of the same session (which keeps both).
    dense = _reset(stub, seed=3, image_size=64, session_id=small.session_id)
    assert dense.session_id == small.session_id
    assert _step_zeros(stub, dense.session_id).reward > 0  # normalized_dense: reaching reward
    back = _reset(stub, seed=3, image_size=64, reward_mode="sparse", session_id=small.session_id)
    assert _step_zeros(stub, back.session_id).reward == 0.0
    # Another image size: another env rendering at that size.
    big = _reset(stub, seed=3, image_size=96, session_id=dense.session_id)
    assert from_tensor(big.image).shape == (96, 96, 3)
    assert from_tensor(_step_zeros(stub, big.session_id).image).shape == (96, 96, 3)
    code, details = _code(stub.Reset, env_pb2.ResetRequest(task_id="PickCube-v1", image_size=8))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image_size" in details


def test_eval_session_control_mode(env_server):
    stub, _ = env_server
    # Unset is pd_ee_delta_pose (older clients): a zero action holds the arm still.
    delta = _reset(stub, seed=5, image_size=64)
    still = _step_zeros(stub, delta.session_id)
    moved = np.abs(from_tensor(still.image).astype(int) - from_tensor(delta.image).astype(int))
    assert moved.mean() < 1.0
    # pd_ee_pose (also 7-d) reads the same zeros as an absolute target pose: the arm moves, and
    # the session holds another env since the controller differs.
    absolute = _reset(
        stub, seed=5, image_size=64, control_mode="pd_ee_pose", session_id=delta.session_id
    )
    np.testing.assert_array_equal(from_tensor(absolute.image), from_tensor(delta.image))
    step = _step_zeros(stub, absolute.session_id)
    moved = np.abs(from_tensor(step.image).astype(int) - from_tensor(absolute.image).astype(int))
    assert moved.mean() > 2.0
    # A controller of another action size fails the Reset, naming control_mode and the space;
    # "" asks for the task's default controller (Panda: 8-d joint deltas).
    for control_mode, needles in [
        ("pd_ee_delta_pos", ["control_mode 'pd_ee_delta_pos'", "Box(4,)", "7-d"]),
        ("", ["control_mode unset", "'pd_joint_delta_pos'", "Box(8,)", "7-d"]),
    ]:
        code, details = _code(
            stub.Reset, env_pb2.ResetRequest(task_id="PickCube-v1", control_mode=control_mode)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        for needle in needles:
            assert needle in details, details


class _ZeroPolicy(rollout_pb2_grpc.RolloutServiceServicer):
    """A rollout service whose policy takes action_dim-d actions and answers every observation
    with a zero action; it keeps the image shapes it was sent."""

    def __init__(self) -> None:
        self.image_shapes: list[tuple] = []
        self.action_dim = 7

    def Act(self, request, context):
        images = from_tensor(request.images, expect_dtype="uint8")
        self.image_shapes.append(images.shape)
        b, d = images.shape[0], self.action_dim
        return rollout_pb2.ActReply(
            request_id=request.request_id,
            action_tokens=to_tensor(np.zeros((b, d), np.int64)),
            actions=to_tensor(np.zeros((b, 1, d), np.float32)),
            logprobs=to_tensor(np.full((b, d), -1.0, np.float32)),
            policy_version=3,
        )

    def GetPolicy(self, request, context):
        return rollout_pb2.PolicyInfo(
            policy_version=3, engine="zero", action_chunk=1, action_dim=self.action_dim
        )


@pytest.fixture()
def zero_policy():
    policy = _ZeroPolicy()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(policy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield policy, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_evaluate_passes_the_eval_env_config(env_server, zero_policy):
    _, proc = env_server
    policy, rollout_target = zero_policy
    result = evaluate(
        proc.target,
        rollout_target,
        ["PickCube-v1"],
        episodes=2,
        max_steps=2,
        env_type="maniskill",
        image_size=64,
        control_mode="pd_ee_delta_pose",
        reward_mode="sparse",
    )
    assert policy.image_shapes == [(1, 64, 64, 3)] * 4
    assert [e["episode_len"] for e in result.episodes] == [2, 2]
    assert [e["return"] for e in result.episodes] == [0.0, 0.0]  # sparse
    assert result.episodes[0]["policy_version"] == 3
    # control_mode None: the task's default controller, which PickCube's 7-d policy cannot drive.
    with pytest.raises(grpc.RpcError) as err:
        evaluate(proc.target, rollout_target, ["PickCube-v1"], 1, 1, control_mode=None)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pd_joint_delta_pos" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        evaluate(proc.target, rollout_target, ["PickCube-v1"], 1, 1, env_type="isaaclab")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------ env.eval and env.train

TASK_MODULE = "tests.services._env_pool_test_tasks"
"""Registers TestPickCube-v1 (a 20-step time limit) in the env server's process."""


def _close(stub, session_id: str) -> env_pb2.CloseSessionReply:
    return stub.CloseSession(env_pb2.CloseSessionRequest(session_id=session_id), timeout=30)


def test_eval_session_keeps_an_env_per_task(env_server):
    """An OOD split alternates its task variants episode by episode: the session keeps one env
    per task (rebuilding at every switch exhausted SAPIEN's Vulkan on a GPU machine) under the
    same session id, and a Reset that fails leaves the session's envs usable."""
    stub, _ = env_server
    first = _reset(stub, seed=5, image_size=32)
    sid = first.session_id
    push = _reset(stub, task_id="PushCube-v1", seed=5, image_size=32, session_id=sid)
    assert push.session_id == sid and push.instruction != first.instruction
    _step_zeros(stub, sid)
    again = _reset(stub, seed=5, image_size=32, session_id=sid)
    assert again.session_id == sid and again.instruction == first.instruction
    assert np.array_equal(from_tensor(again.image), from_tensor(first.image))  # same seed
    code, _ = _code(
        stub.Reset, env_pb2.ResetRequest(task_id="NoSuchTask-v9", session_id=sid, image_size=32)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert from_tensor(_step_zeros(stub, sid).image).shape == (32, 32, 3)  # still PickCube
    assert _close(stub, sid).closed


def test_task_modules_are_the_servers_configuration_not_the_clients(env_server):
    """Importing a module runs its code: a request may only name modules the server was started
    with (--task-modules) or the built-in OOD variants; anything else is PERMISSION_DENIED before
    any import (a client used to make the server import whatever it named)."""
    stub, proc = env_server
    for module in ("antigravity", "tests.services.conftest"):
        code, details = _code(
            stub.Reset, env_pb2.ResetRequest(task_id="PickCube-v1", task_modules=[module])
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and module in details
        code, details = _code(stub.StartCollection, _start(task_modules=[module]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and module in details
    assert stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10).state != "running"
    # The built-in OOD variants stay available to every client.
    obs = _reset(
        stub,
        task_id="PushCube-v1-semantic-colour",
        task_modules=["services.env_server.ood_tasks"],
        image_size=32,
    )
    assert obs.session_id


def test_eval_session_task_modules_and_time_limit(env_server):
    stub, _ = env_server
    code, details = _code(stub.Reset, env_pb2.ResetRequest(task_id="TestPickCube-v1"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "TestPickCube-v1" in details
    code, details = _code(
        stub.Reset,
        env_pb2.ResetRequest(task_id="TestPickCube-v1", task_modules=["no_such_module_xyz"]),
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "no_such_module_xyz" in details

    # The module registers the task; the session's env truncates at the requested step (the
    # task's own limit is 20).
    first = _reset(
        stub, task_id="TestPickCube-v1", task_modules=[TASK_MODULE], image_size=32,
        max_episode_steps=2, seed=1,
    )  # fmt: skip
    assert first.instruction == "pick up the red test cube"
    steps = [_step_zeros(stub, first.session_id) for _ in range(2)]
    assert [(s.terminated, s.truncated) for s in steps] == [(False, False), (False, True)]
    # The same settings reuse the session; another time limit is another env.
    kw = dict(task_id="TestPickCube-v1", task_modules=[TASK_MODULE], image_size=32, seed=2)
    again = _reset(stub, max_episode_steps=2, session_id=first.session_id, **kw)
    assert again.session_id == first.session_id
    longer = _reset(stub, max_episode_steps=3, session_id=again.session_id, **kw)
    assert [_step_zeros(stub, longer.session_id).truncated for _ in range(3)] == [
        False,
        False,
        True,
    ]
    # 0 (unset): the task's own limit.
    own = _reset(stub, session_id=longer.session_id, **kw)
    assert not any(_step_zeros(stub, own.session_id).truncated for _ in range(3))
    assert _close(stub, own.session_id).closed


def test_close_session(env_server):
    stub, _ = env_server
    reply = _reset(stub, seed=1, image_size=32)
    assert _close(stub, reply.session_id).closed
    code, _ = _code(
        stub.Step,
        env_pb2.StepRequest(session_id=reply.session_id, action=to_tensor(np.zeros(7, np.float32))),
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert not _close(stub, reply.session_id).closed  # closing twice is not an error


@pytest.fixture
def fresh_env_process(tmp_path):
    """An env server no other test has opened sessions on."""
    proc = ServiceProcess("services.env_server.main", ["--server-id", "fresh"], tmp_path, "env")
    try:
        proc.wait_healthy()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


def test_one_client_cannot_hold_every_eval_session(fresh_env_process):
    """A client gets at most MAX_SESSIONS_PER_CLIENT (4) of the server's 8 sessions; another
    client (another connection) still gets one, and closing frees a slot."""
    proc = fresh_env_process
    # Each with its own connection: channels of one process otherwise share one, and a client
    # is known by its connection.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    mine = grpc.insecure_channel(proc.target, options=own_connection)
    other = grpc.insecure_channel(proc.target, options=own_connection)
    stub, other_stub = env_pb2_grpc.EnvServiceStub(mine), env_pb2_grpc.EnvServiceStub(other)
    opened = []
    try:
        opened = [_reset(stub, seed=i, image_size=32).session_id for i in range(4)]
        code, details = _code(stub.Reset, env_pb2.ResetRequest(task_id="PickCube-v1", seed=9,
                                                                image_size=32))  # fmt: skip
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "holds 4 eval sessions" in details
        theirs = _reset(other_stub, seed=5, image_size=32).session_id
        assert _close(other_stub, theirs).closed
        assert _close(stub, opened.pop()).closed
        opened.append(_reset(stub, seed=6, image_size=32).session_id)
    finally:
        for sid in opened:
            _close(stub, sid)
        mine.close()
        other.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal where no GPU is visible")
def test_eval_session_sim_backend(env_server):
    stub, _ = env_server
    code, details = _code(
        stub.Reset, env_pb2.ResetRequest(task_id="PickCube-v1", sim_backend="gpu", image_size=32)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "sim_backend 'gpu'" in details and "CUDA" in details, details
    code, details = _code(
        stub.Reset, env_pb2.ResetRequest(task_id="PickCube-v1", sim_backend="tpu", image_size=32)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sim_backend" in details, details
    # "cpu" and "" (older clients) are the same env: the session is reused.
    cpu = _reset(stub, sim_backend="cpu", image_size=32)
    assert _reset(stub, image_size=32, session_id=cpu.session_id).session_id == cpu.session_id
    assert _close(stub, cpu.session_id).closed


def test_evaluate_passes_task_modules_time_limit_and_sim_backend(env_server, zero_policy):
    _, proc = env_server
    policy, rollout_target = zero_policy
    result = evaluate(
        proc.target,
        rollout_target,
        ["TestPickCube-v1"],
        episodes=1,
        max_steps=10,
        image_size=32,
        task_modules=[TASK_MODULE],
        max_episode_steps=3,
    )
    # The server truncated the episode at 3 steps (the client would have gone on to 10).
    assert [e["episode_len"] for e in result.episodes] == [3]
    assert len(policy.image_shapes) == 3
    with pytest.raises(grpc.RpcError) as err:
        evaluate(proc.target, rollout_target, ["PickCube-v1"], 1, 1, sim_backend="tpu")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sim_backend" in err.value.details()
    if not torch.cuda.is_available():
        with pytest.raises(grpc.RpcError) as err:
            evaluate(proc.target, rollout_target, ["PickCube-v1"], 1, 1, sim_backend="gpu")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_evaluate_chunks_play_the_episodes_of_one_call(env_server, zero_policy, tmp_path):
    _, proc = env_server
    _, rollout_target = zero_policy
    tasks = ["PickCube-v1", "PushCube-v1"]

    def play(episodes: int, first_episode: int, video_dir=None) -> list[tuple]:
        result = evaluate(
            proc.target, rollout_target, tasks, episodes=episodes, max_steps=1, seed=100,
            image_size=32, first_episode=first_episode, video_dir=video_dir,
        )  # fmt: skip
        return [(e["episode"], e["task_id"], e["seed"]) for e in result.episodes]

    whole = play(4, 0)
    assert whole == [
        (0, "PickCube-v1", 100),
        (1, "PushCube-v1", 101),
        (2, "PickCube-v1", 102),
        (3, "PushCube-v1", 103),
    ]
    assert play(2, 0) + play(2, 2, tmp_path) == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "episode002_PickCube-v1_seed102.mp4",
        "episode003_PushCube-v1_seed103.mp4",
    ]


def test_eval_session_takes_the_policys_action_dim(env_server, zero_policy):
    """A policy of 4-d actions (PolicyInfo.action_dim) drives pd_ee_delta_pos (xyz and the
    gripper); the pd_ee_delta_pose default (7-d) is refused for it."""
    stub, proc = env_server
    policy, rollout_target = zero_policy
    policy.action_dim = 4
    result = evaluate(
        proc.target, rollout_target, ["PickCube-v1"], 1, 2, image_size=32,
        control_mode="pd_ee_delta_pos",
    )  # fmt: skip
    assert [e["episode_len"] for e in result.episodes] == [2]
    with pytest.raises(grpc.RpcError) as err:
        evaluate(proc.target, rollout_target, ["PickCube-v1"], 1, 1, image_size=32)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Box(7,)" in err.value.details() and "4-d" in err.value.details()
    # Step expects the session's action size.
    reply = _reset(stub, image_size=32, control_mode="pd_ee_delta_pos", action_dim=4)
    code, details = _code(
        stub.Step,
        env_pb2.StepRequest(session_id=reply.session_id, action=to_tensor(np.zeros(7, np.float32))),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "[4]" in details
    assert _close(stub, reply.session_id).closed


def _wait_done(stub, timeout_s: float = 180) -> env_pb2.CollectionStatus:
    deadline = time.monotonic() + timeout_s
    status = stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10)
    while status.state in ("running", "stopping") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10)
    return status


@pytest.mark.parametrize(
    "action_dim, control_mode, needles",
    [
        # "" is the task's default controller, which for PickCube's Panda is 8-d joint deltas.
        (
            7,
            "",
            [
                "control_mode unset (the task's default controller): PickCube-v1 runs controller "
                "'pd_joint_delta_pos' with action space Box(8,)",
                "7-d",
            ],
        ),
        (
            7,
            "pd_ee_delta_pos",
            [
                "control_mode 'pd_ee_delta_pos': PickCube-v1 runs controller 'pd_ee_delta_pos' "
                "with action space Box(4,)",
                "7-d",
            ],
        ),
        (4, "pd_ee_delta_pose", ["Box(7,)", "the policy's actions are 4-d"]),
        (4, "pd_ee_delta_pos", None),  # xyz and the gripper: collects
    ],
)
def test_collection_checks_the_controller_against_the_policys_action_dim(
    env_server, zero_policy, action_dim, control_mode, needles
):
    stub, _ = env_server
    policy, rollout_target = zero_policy
    policy.action_dim = action_dim
    request = _start(
        control_mode=control_mode, rollout_target=rollout_target, iterations=1,
        max_episode_steps=2, image_size=32, run_id=f"dim{action_dim}",
    )  # fmt: skip
    if needles is not None:
        code, details = _code(stub.StartCollection, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        for needle in needles:
            assert needle in details, details
        return
    stub.StartCollection(request, timeout=60)
    status = _wait_done(stub)
    assert status.state == "idle" and status.segments_written == 1, status


def test_training_video_of_the_first_env(env_server, tmp_path, redis_url):
    """env.train.video_cfg: one MP4 per iteration of env 0 (of stage 0), T+1 frames."""
    import cv2

    stub, _ = env_server
    rollout = ServiceProcess(
        "services.rollout_server.main",
        ["--checkpoint", str(save_policy(build_tiny_policy(seed=0), tmp_path / "ckpt",
                                         tokenizer=build_tiny_tokenizer()))],
        tmp_path,
        "rollout",
    )  # fmt: skip
    try:
        rollout.wait_healthy()
        video_dir = tmp_path / "video"
        stub.StartCollection(
            _start(
                rollout_target=rollout.target, buffer_url=redis_url, iterations=2, num_envs=2,
                pipeline_stage_num=2, max_episode_steps=3, run_id="video",
                video_dir=str(video_dir), info_on_video=True,
                max_staleness=1,  # no learner: the policy stays at version 0
            ),
            timeout=60,
        )  # fmt: skip
        status = _wait_done(stub)
        assert status.state == "idle" and status.segments_written == 4, status
    finally:
        stub.StopCollection(env_pb2.StopCollectionRequest(), timeout=30)
        rollout.stop()
    # The env server's id is "test" (the fixture's --server-id).
    assert sorted(str(p.relative_to(video_dir)) for p in video_dir.rglob("*")) == [
        "test",
        "test/iter00000_env0.mp4",
        "test/iter00001_env0.mp4",
    ]
    for name in ("iter00000_env0.mp4", "iter00001_env0.mp4"):
        capture = cv2.VideoCapture(str(video_dir / "test" / name))
        frames = []
        ok, frame = capture.read()
        while ok:
            frames.append(frame)
            ok, frame = capture.read()
        capture.release()
        assert len(frames) == 3 + 1  # T = 3 observations and the bootstrap one
        assert frames[0].shape == (224, 224, 3)


@pytest.mark.parametrize("ignore", [False, True])
def test_eval_session_ignore_terminations(env_server, ignore):
    """Success ends a session's episode unless ignore_terminations (RLinf's key): then it runs
    to the time limit and every Step still reports the success."""
    stub, _ = env_server
    kw = dict(task_id="TestAlwaysSuccess-v1", task_modules=[TASK_MODULE], image_size=32)
    reply = _reset(stub, max_episode_steps=3, ignore_terminations=ignore, **kw)
    first = _step_zeros(stub, reply.session_id)
    assert first.success and first.terminated == (not ignore) and not first.truncated
    if ignore:
        second = _step_zeros(stub, reply.session_id)
        assert second.success and not second.terminated and not second.truncated
        assert _step_zeros(stub, reply.session_id).truncated
    assert _close(stub, reply.session_id).closed


def test_collection_request_carries_ignore_terminations():
    from services.env_server.servicer import collection_config

    def request(**kw):
        return env_pb2.StartCollectionRequest(
            task_ids=["PickCube-v1"], num_envs=1, max_episode_steps=4,
            rollout_target="127.0.0.1:1", buffer_url="memory://", **kw,
        )  # fmt: skip

    assert not collection_config(request(), "env0").pool.ignore_terminations
    assert collection_config(request(ignore_terminations=True), "env0").pool.ignore_terminations


def test_session_limit_refusal_names_the_limit_that_was_hit():
    from services.env_server.servicer import session_limit_refusal

    assert session_limit_refusal(["a", "a", "b"], "a") == ""
    assert "holds 4 eval sessions" in session_limit_refusal(["a"] * 4 + ["b"], "a")
    assert session_limit_refusal(["a"] * 4, "b") == ""
    assert "all 8 eval sessions" in session_limit_refusal(["a"] * 4 + ["b"] * 4, "c")
