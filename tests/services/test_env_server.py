"""The env server as a real subprocess: bad requests get clear gRPC statuses and the server keeps
serving; evaluation sessions render real ManiSkill3 frames; a broken policy (NaN weights) fails
the collection with a clear error instead of writing garbage."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch

from tests.helpers.procs import ServiceProcess
from vla_rl.models.checkpoint import save_policy
from vla_rl.models.tiny import build_tiny_policy, build_tiny_tokenizer
from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc
from vla_rl.rpc.tensors import from_tensor, to_tensor


@pytest.fixture(scope="module")
def env_server(tmp_path_factory):
    proc = ServiceProcess(
        "services.env_server.main", ["--server-id", "test"], tmp_path_factory.mktemp("env"), "env"
    )
    try:
        proc.wait_healthy()
        channel = grpc.insecure_channel(proc.target)
        yield env_pb2_grpc.EnvServiceStub(channel), proc
        channel.close()
    finally:
        assert proc.stop() == 0, proc.log()


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
    )
    return env_pb2.StartCollectionRequest(**{**base, **kw})


@pytest.mark.parametrize(
    "request_kw, needle",
    [
        ({"task_ids": ["NoSuchTask-v9"]}, "NoSuchTask-v9"),
        ({"task_ids": []}, "task_ids"),
        ({"num_envs": 0}, "num_envs"),
        ({"max_episode_steps": 0}, "max_episode_steps"),
        ({"rollout_target": ""}, "rollout_target"),
        ({"num_envs": 3, "pipeline_stage_num": 2}, "pipeline_stage_num"),
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
