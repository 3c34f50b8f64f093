"""gRPC plumbing: tensor conversion, stub freshness, and real servers on loopback (limits, health,
reflection, error mapping, deadlines, retries, graceful shutdown on SIGTERM)."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from vla_rl.rpc import ENV_SERVICE, LEARNER_SERVICE, ROLLOUT_SERVICE
from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel, wait_for_health
from vla_rl.rpc.gen.v1 import (
    common_pb2,
    env_pb2,
    env_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
)
from vla_rl.rpc.server import (
    MAX_MESSAGE_BYTES,
    add_health_and_reflection,
    make_server,
    map_errors,
)
from vla_rl.rpc.tensors import from_tensor, to_tensor

REPO = Path(__file__).resolve().parents[2]
TEN_MB = 10 * 1024 * 1024

# ----------------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "dtype, shape",
    [
        ("uint8", (2, 8, 8, 3)),
        ("int64", (3, 14)),
        ("float32", (2, 1, 7)),
        ("float64", ()),
        ("float16", (4, 5)),
        ("int32", (0, 3)),
        ("bool", (6,)),
    ],
)
def test_tensor_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    pb = to_tensor(array)
    assert pb.dtype == dtype and list(pb.shape) == list(shape)
    # Through the wire format, not just the message object.
    pb = common_pb2.Tensor.FromString(pb.SerializeToString())
    out = from_tensor(pb, expect_dtype=dtype, expect_ndim=len(shape))
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, array)


def test_tensor_non_contiguous_and_big_endian_inputs():
    array = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(from_tensor(to_tensor(array.T)), array.T)
    big = array.astype(">f4")
    pb = to_tensor(big)
    assert pb.dtype == "float32" and pb.data == array.tobytes()  # little-endian on the wire
    np.testing.assert_array_equal(from_tensor(pb), array)


def test_from_tensor_view_is_read_only_unless_copied():
    pb = to_tensor(np.zeros((2, 3), np.float32))
    assert not from_tensor(pb).flags.writeable
    assert from_tensor(pb, copy=True).flags.writeable


def test_from_tensor_accepts_a_set_of_ranks_and_free_dims():
    action = to_tensor(np.zeros(7, np.float32))
    chunk = to_tensor(np.zeros((4, 7), np.float32))
    for pb in (action, chunk):
        from_tensor(pb, expect_ndim={1, 2})
    images = to_tensor(np.zeros((2, 4, 4, 3), np.uint8))
    assert from_tensor(images, expect_shape=(None, None, None, 3)).shape == (2, 4, 4, 3)


def _pb(data=b"\0" * 8, shape=(2,), dtype="float32"):
    return common_pb2.Tensor(data=data, shape=list(shape), dtype=dtype)


@pytest.mark.parametrize(
    "tensor, kwargs, message",
    [
        (_pb(dtype="object"), {}, "unknown tensor dtype 'object'"),
        (_pb(dtype="complex64"), {}, "unknown tensor dtype"),
        (_pb(dtype=""), {}, "unknown tensor dtype ''"),
        (_pb(data=b"\0" * 7), {}, "needs 8 bytes, got 7"),
        (_pb(shape=(-2, -1)), {}, "negative dim"),
        (_pb(shape=(2**40, 2**40)), {}, "needs"),  # no overflow, just a mismatch
        (_pb(), {"expect_dtype": "int64"}, "expected dtype int64, got float32"),
        (_pb(), {"expect_dtype": np.uint8}, "expected dtype uint8"),
        (_pb(), {"expect_ndim": 2}, "expected a 2-d tensor, got shape [2]"),
        (_pb(), {"expect_ndim": (2, 3)}, "expected a 2 or 3-d tensor"),
        (_pb(shape=(1, 2)), {"expect_shape": (None, 7)}, "expected shape ['*', 7], got [1, 2]"),
        (_pb(), {"expect_shape": (2, 1)}, "expected shape"),
        (_pb(), {"max_bytes": 4}, "8 bytes, more than the limit of 4"),
        (_pb(data=b"\x00\x02", dtype="bool"), {}, "bool tensor holds bytes other than 0 and 1"),
    ],
)
def test_from_tensor_validation(tensor, kwargs, message):
    with pytest.raises(ValueError) as err:
        from_tensor(tensor, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "array", [np.array([{}], dtype=object), np.array(["a"]), np.zeros(2, "c8")]
)
def test_to_tensor_rejects_dtypes_off_the_wire(array):
    with pytest.raises(ValueError, match="cannot be sent"):
        to_tensor(array)


# ----------------------------------------------------------------------------- generated stubs


def test_committed_stubs_match_the_protos(tmp_path):
    """Regenerates into a temporary directory; a diff means someone edited a .proto without
    running scripts/gen_protos.sh (or edited a generated file)."""
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    committed = REPO / "vla_rl" / "rpc" / "gen"

    def files(root: Path) -> list[str]:
        return sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )

    assert files(tmp_path) == files(committed)
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, files(committed), shallow=False)
    assert not mismatch and not errors, f"stale stubs, run scripts/gen_protos.sh: {mismatch}"


def test_stubs_import_under_the_package():
    assert type(rollout_pb2.ActRequest()).__module__ == "vla_rl.rpc.gen.v1.rollout_pb2"
    assert (ROLLOUT_SERVICE, ENV_SERVICE, LEARNER_SERVICE) == (
        "vla_rl.v1.RolloutService",
        "vla_rl.v1.EnvService",
        "vla_rl.v1.LearnerService",
    )
    assert rollout_pb2.ActRequest.DESCRIPTOR.fields_by_name["images"].message_type is (
        common_pb2.Tensor.DESCRIPTOR
    )
    assert not rollout_pb2.ActRequest().HasField("seed")  # proto3 optional


# ----------------------------------------------------------------------------- servers


class _Learner(learner_pb2_grpc.LearnerServiceServicer):
    """Behaviour chosen per call by the `mode` metadata."""

    @map_errors
    def GetStatus(self, request, context):
        mode = dict(context.invocation_metadata()).get("mode", "")
        if mode == "invalid":
            raise ValueError("iteration must be >= 0")
        if mode == "crash":
            raise RuntimeError("boom")
        if mode == "abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such run")
        if mode == "sleep":
            end = time.monotonic() + 5.0
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.02)
        phase = "x" * TEN_MB if mode == "big" else "training"
        return learner_pb2.LearnerStatus(
            iteration=3, policy_version=2, phase=phase, last_metrics={"loss/policy": 0.5}
        )


class _Rollout(rollout_pb2_grpc.RolloutServiceServicer):
    """Act answers with the mean of each image, so the payload is checked end to end."""

    @staticmethod
    def _act(request):
        images = from_tensor(request.images, expect_dtype=np.uint8, expect_shape=(None,) * 3 + (3,))
        means = images.reshape(len(images), -1).mean(axis=1, dtype=np.float64)
        actions = np.repeat(means.astype(np.float32)[:, None, None], 7, axis=2)
        return rollout_pb2.ActReply(
            request_id=request.request_id, actions=to_tensor(actions), policy_version=7
        )

    @map_errors
    def Act(self, request, context):
        return self._act(request)

    @map_errors
    def ActStream(self, request_iterator, context):
        for request in request_iterator:
            yield self._act(request)


class _Env(env_pb2_grpc.EnvServiceServicer):
    """Fails with UNAVAILABLE to exercise the channel's retry policy."""

    def __init__(self):
        self.calls = {"GetStatus": 0, "StartCollection": 0}

    def GetStatus(self, request, context):
        self.calls["GetStatus"] += 1
        if self.calls["GetStatus"] < 3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return env_pb2.CollectionStatus(state="idle")

    def StartCollection(self, request, context):
        self.calls["StartCollection"] += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")


@pytest.fixture(scope="module")
def served():
    server = make_server(max_workers=4)
    env = _Env()
    learner_pb2_grpc.add_LearnerServiceServicer_to_server(_Learner(), server)
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(_Rollout(), server)
    env_pb2_grpc.add_EnvServiceServicer_to_server(env, server)
    add_health_and_reflection(server, [LEARNER_SERVICE, ROLLOUT_SERVICE, ENV_SERVICE])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    target = f"127.0.0.1:{port}"
    channel = make_channel(target)
    yield target, channel, env
    channel.close()
    server.stop(None)


def _learner_status(channel, mode="", timeout=DEFAULT_DEADLINE_S["status"]):
    stub = learner_pb2_grpc.LearnerServiceStub(channel)
    return stub.GetStatus(
        learner_pb2.LearnerStatusRequest(), timeout=timeout, metadata=(("mode", mode),)
    )


def test_health_reports_serving(served):
    target, _, _ = served
    wait_for_health(target, timeout_s=10)
    wait_for_health(target, service=LEARNER_SERVICE, timeout_s=10)
    with pytest.raises(TimeoutError, match="NOT_FOUND"):
        wait_for_health(target, service="vla_rl.v1.NoSuchService", timeout_s=0.5)


def test_wait_for_health_times_out_without_a_server():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not report SERVING"):
        wait_for_health("127.0.0.1:1", timeout_s=0.5)
    assert time.monotonic() - start < 3


def test_reflection_lists_and_describes_the_services(served):
    _, channel, _ = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {LEARNER_SERVICE, ROLLOUT_SERVICE, ENV_SERVICE, "grpc.health.v1.Health"} <= names
    # The descriptors (with common.proto as a dependency) resolve through reflection alone.
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    act = pool.FindServiceByName(ROLLOUT_SERVICE).methods_by_name["Act"]
    assert act.input_type.fields_by_name["images"].message_type.full_name == "vla_rl.v1.Tensor"


def test_ten_megabyte_messages_pass_both_ways(served):
    _, channel, _ = served
    assert MAX_MESSAGE_BYTES > TEN_MB
    images = np.random.default_rng(0).integers(0, 256, (36, 320, 320, 3), dtype=np.uint8)
    assert images.nbytes > TEN_MB
    stub = rollout_pb2_grpc.RolloutServiceStub(channel)
    request = rollout_pb2.ActRequest(request_id="r1", images=to_tensor(images))
    reply = stub.Act(request, timeout=DEFAULT_DEADLINE_S["act"])
    assert reply.request_id == "r1" and reply.policy_version == 7
    actions = from_tensor(reply.actions, expect_dtype=np.float32, expect_ndim=3)
    np.testing.assert_allclose(actions[:, 0, 0], images.reshape(36, -1).mean(axis=1), rtol=1e-6)
    assert len(_learner_status(channel, "big").phase) == TEN_MB


def test_default_grpc_limit_would_reject_the_same_reply(served):
    target, _, _ = served
    with grpc.insecure_channel(target) as plain:
        with pytest.raises(grpc.RpcError) as err:
            _learner_status(plain, "big")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_errors_map_to_status_codes_and_the_server_survives(served):
    _, channel, _ = served
    cases = {
        "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "iteration must be >= 0"),
        "crash": (grpc.StatusCode.INTERNAL, "RuntimeError: boom"),
        "abort": (grpc.StatusCode.NOT_FOUND, "no such run"),
    }
    for mode, (code, details) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _learner_status(channel, mode)
        assert err.value.code() == code and err.value.details() == details, mode
    assert _learner_status(channel).phase == "training"


def test_tensor_validation_error_is_invalid_argument_on_unary_and_stream(served):
    _, channel, _ = served
    stub = rollout_pb2_grpc.RolloutServiceStub(channel)
    bad = rollout_pb2.ActRequest(images=to_tensor(np.zeros((1, 4, 4, 3), np.float32)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Act(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected dtype uint8, got float32" in err.value.details()

    good = rollout_pb2.ActRequest(
        request_id="ok", images=to_tensor(np.full((2, 4, 4, 3), 5, np.uint8))
    )
    replies = stub.ActStream(iter([good, bad]), timeout=10)
    assert next(replies).request_id == "ok"
    with pytest.raises(grpc.RpcError) as err:
        next(replies)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_is_honoured(served):
    _, channel, _ = served
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        _learner_status(channel, "sleep", timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.0


def test_channel_retries_idempotent_calls_only(served):
    _, channel, env = served
    stub = env_pb2_grpc.EnvServiceStub(channel)
    status = stub.GetStatus(env_pb2.GetStatusRequest(), timeout=10)
    assert status.state == "idle" and env.calls["GetStatus"] == 3  # two retries
    with pytest.raises(grpc.RpcError) as err:
        stub.StartCollection(env_pb2.StartCollectionRequest(run_id="r"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert env.calls["StartCollection"] == 1  # never retried


_SIGTERM_SERVER = textwrap.dedent(
    """
    import time

    from vla_rl.rpc import LEARNER_SERVICE
    from vla_rl.rpc.gen.v1 import learner_pb2, learner_pb2_grpc
    from vla_rl.rpc.server import (
        add_health_and_reflection, make_server, map_errors, serve_until_signal,
    )

    class Learner(learner_pb2_grpc.LearnerServiceServicer):
        @map_errors
        def GetStatus(self, request, context):
            time.sleep(float(dict(context.invocation_metadata()).get("sleep", "0")))
            return learner_pb2.LearnerStatus(phase="done")

    server = make_server(2)
    learner_pb2_grpc.add_LearnerServiceServicer_to_server(Learner(), server)
    add_health_and_reflection(server, [LEARNER_SERVICE])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    signum = serve_until_signal(server, grace_s=3.0, on_stop=lambda: print("on_stop", flush=True))
    print("signal", signum, flush=True)
    """
)


def _start_signal_server(tmp_path) -> tuple[subprocess.Popen, str]:
    """_SIGTERM_SERVER as a subprocess, serving; returns it and its target."""
    script = tmp_path / "server.py"
    script.write_text(_SIGTERM_SERVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    target = f"127.0.0.1:{int(proc.stdout.readline())}"
    wait_for_health(target, service=LEARNER_SERVICE, timeout_s=30)
    return proc, target


def test_serve_until_signal_stops_gracefully_on_sigterm(tmp_path):
    proc, target = _start_signal_server(tmp_path)
    try:
        with make_channel(target) as channel:
            stub = learner_pb2_grpc.LearnerServiceStub(channel)
            in_flight = stub.GetStatus.future(
                learner_pb2.LearnerStatusRequest(), timeout=10, metadata=(("sleep", "1.0"),)
            )
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # The call in flight finishes inside the grace period.
            assert in_flight.result().phase == "done"
            assert proc.wait(timeout=10) == 0
            assert time.monotonic() - start < 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    assert "on_stop" in out and f"signal {int(signal.SIGTERM)}" in out


def test_a_second_signal_cancels_calls_in_flight_and_still_stops_cleanly(tmp_path):
    """SIGTERM starts the 3 s grace; a second signal (SIGINT: a user's Ctrl-C) cancels the call
    still running before the grace ends, and the server stops with on_stop run, no deadlock, exit
    code 0 (once the handler's thread, which nothing can interrupt, returns)."""
    proc, target = _start_signal_server(tmp_path)
    try:
        with make_channel(target) as channel:
            stub = learner_pb2_grpc.LearnerServiceStub(channel)
            slow = stub.GetStatus.future(
                learner_pb2.LearnerStatusRequest(), timeout=30, metadata=(("sleep", "5"),)
            )
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            with pytest.raises(grpc.RpcError):
                slow.result()
            assert time.monotonic() - start < 2.5  # cancelled before the 3 s grace ran out
            assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    assert "on_stop" in out and f"signal {int(signal.SIGTERM)}" in out


@pytest.mark.parametrize("module", ["services.env_server.main", "services.rollout_server.main"])
def test_a_port_in_use_is_one_clear_line(tmp_path, module):
    """Another gRPC server already listens on the port (grpc's so_reuseport would have let both
    listen, sharing the calls): the service exits at once with one line naming the address,
    before it loads any model (the rollout server's checkpoint here does not even exist)."""
    other = make_server(1)
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, "--port", str(port),
             *(["--checkpoint", str(tmp_path / "none")] if "rollout" in module else [])],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    finally:
        other.stop(None)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"cannot listen on 127.0.0.1:{port}" in last and "in use" in last
    assert "Traceback" not in proc.stderr


def test_temperature_range_is_checked_as_the_float32_the_proto_carries():
    import numpy as np

    from vla_rl.rpc import temperature_in_range

    assert temperature_in_range(float(np.float32(0.01)))  # 0.0099999998 after the proto
    assert temperature_in_range(100.0) and temperature_in_range(1.0)
    for bad in (0.0, 1e-45, -1.0, 100.5, float("nan"), float("inf")):
        assert not temperature_in_range(bad), bad
