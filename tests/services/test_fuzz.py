"""Bounded, seeded fuzz of every gRPC service and of the trajectory stream the learner reads.

Real servers as subprocesses on loopback (tests/helpers/procs.py): a rollout server (torch engine,
tiny random checkpoint), an env server (ManiSkill3), a learner (waiting for data on an in-memory
buffer), plus a fresh rollout server for the case that needs a replica without a LoRA. About
350 requests in all, generated from SEED:

- RolloutService: Act (malformed tensors: dtypes, shapes, ndims, huge and negative dims, byte
  counts that disagree with the shape; empty batches, instruction counts and texts, NaN / inf /
  out-of-range temperatures, top_k, seeds), ActStream, random bytes that parse as ActRequest and
  GetPolicyRequest, PushAdapter (wrong sha256 / total_bytes / version, disagreeing later chunks,
  truncated and random blobs, bad metadata, bad tensors).
- EnvService: Reset (every field), Step (malformed actions, unknown sessions), StartCollection
  (random fields plus one that must be refused, towards an unreachable rollout service, so no
  collection starts), StopCollection, CloseSession, GetStatus.
- LearnerService: GetStatus with random bytes that parse as its (empty) request.

Every call must end OK or with a status from the method's allowed set, never INTERNAL or UNKNOWN.
For Act, ActStream, Step and Reset a reference of the documented rules says which requests are
valid, and those must succeed while every other one fails. The servers keep serving (the process
alive after every request, a valid call every LIVENESS requests and at the end, a clean exit on
SIGTERM), and a refused PushAdapter never changes the served version or adapter sha256.

The stream part writes garbage, truncated and wrong-field entries between valid segments into a
real redis-server stream and checks that RedisStreamsBuffer dead-letters exactly the bad ones
with a reason, drops duplicates, and hands out exactly the valid segments, in order.

The bugs this fuzzing found (INTERNAL for a non-object safetensors header, a refused first push
leaving its LoRA injected, an empty Step chunk) are fixed; their cases are the regression tests at
the end.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import safetensors.numpy
import safetensors.torch
import torch

from tests.helpers.procs import ServiceProcess
from tests.services.test_buffer import assert_same_segment, make_segment
from vla_rl.buffer import RedisStreamsBuffer, encode_segment
from vla_rl.config import dump_yaml, load_config
from vla_rl.models import load_policy
from vla_rl.models.lora import (
    ADAPTER_FORMAT,
    LoRASettings,
    apply_lora,
    base_fingerprint,
    serialize_adapter,
    trainable_state,
)
from vla_rl.models.tiny import write_tiny_checkpoint
from vla_rl.rpc.gen.v1 import (
    common_pb2,
    env_pb2,
    env_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
)
from vla_rl.rpc.rollout_client import adapter_chunks, decode_act_reply
from vla_rl.rpc.tensors import WIRE_DTYPES, from_tensor, to_tensor

SEED = 20261126
LIVENESS = 25
"""A valid request (and a check that the process is alive) every this many fuzz requests."""
N_ACT, N_ACT_STREAM, N_ACT_RAW, N_POLICY_RAW = 110, 15, 20, 10
N_PUSH = 45
N_RESET, N_STEP, N_START, N_MISC_ENV = 25, 45, 12, 15
N_LEARNER = 20
N_STREAM_ENTRIES = 90

Code = grpc.StatusCode
OK = Code.OK
ACT_CODES = {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}
PUSH_CODES = {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION}
RESET_CODES = {
    Code.INVALID_ARGUMENT,
    Code.PERMISSION_DENIED,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
}
STEP_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
# StartCollection requests always hold a field that is refused before anything is started
# (START_INVALID), and name an unreachable rollout service besides.
START_CODES = {Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED}

IMAGE = 224
IMAGE_BYTES = IMAGE * IMAGE * 3
LORA = LoRASettings(rank=4, alpha=8)
# A client that may send more than the servers' 64 MiB limit (the RESOURCE_EXHAUSTED cases).
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
TALLY: dict[str, Counter] = {}
"""Method -> status name -> count, printed by each test (pytest -s or -rP shows it)."""


def _tally(method: str, code: Code) -> None:
    TALLY.setdefault(method, Counter())[code.name] += 1


def _print_tally(*methods: str) -> None:
    for m in methods:
        counts = TALLY.get(m, Counter())
        print(f"fuzz {m}: {sum(counts.values())} requests {dict(sorted(counts.items()))}")


def _call(fn, *args, **kw):
    """(status code, details, reply or None) of one call."""
    try:
        return OK, "", fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


# ---------------------------------------------------------------------------------- the servers


@dataclass
class Services:
    rollout: ServiceProcess
    env: ServiceProcess
    learner: ServiceProcess
    spares: dict[str, ServiceProcess]
    ckpt: Path
    channels: list[grpc.Channel] = field(default_factory=list)
    first_reset: grpc.Future | None = None

    def channel(self, proc: ServiceProcess) -> grpc.Channel:
        ch = grpc.insecure_channel(proc.target, options=CHANNEL_OPTIONS)
        self.channels.append(ch)
        return ch


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """All servers, started together (their start-ups overlap on the CPUs)."""
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = write_tiny_checkpoint(root / "ckpt", seed=3)
    rollout_args = ["--checkpoint", str(ckpt), "--engine", "torch", "--max-wait-ms", "5"]
    cfg = load_config(
        None,
        [
            f"actor.model.model_path={ckpt}",
            "buffer.url=memory://",
            "rollout.addresses=[127.0.0.1:1]",  # never contacted: the learner gets no data
            f"runner.logger.log_path={root}",
            "runner.logger.experiment_name=fuzz",
            "runner.logger.logger_backends=[]",
        ],
    )
    dump_yaml(cfg, root / "learner.yaml")
    procs: list[ServiceProcess] = []
    s: Services | None = None
    try:
        env = ServiceProcess("services.env_server.main", ["--server-id", "fuzz"], root, "env")
        procs.append(env)
        rollout = ServiceProcess("services.rollout_server.main", rollout_args, root, "rollout")
        procs.append(rollout)
        spares = {}
        # A replica that gets no valid adapter (test_a_refused_push_to_a_replica_without_...).
        spares["fresh"] = ServiceProcess(
            "services.rollout_server.main", rollout_args, root, "rollout_fresh"
        )
        procs.append(spares["fresh"])
        learner = ServiceProcess(
            "services.learner.main", ["--config", str(root / "learner.yaml")], root, "learner"
        )
        procs.append(learner)
        s = Services(rollout, env, learner, spares, ckpt)
        env.wait_healthy()
        # The env server's first Reset imports ManiSkill and builds an env: let it run while
        # the model servers start.
        env_stub = env_pb2_grpc.EnvServiceStub(s.channel(env))
        s.first_reset = env_stub.Reset.future(
            env_pb2.ResetRequest(task_id="PickCube-v1", seed=1, image_size=32), timeout=180
        )
        for proc in procs[1:]:
            proc.wait_healthy()
        yield s
    finally:
        for ch in s.channels if s is not None else []:
            ch.close()
        with ThreadPoolExecutor(len(procs) or 1) as pool:  # stopping takes seconds each
            names = [p.log_path.name for p in procs]
            codes = dict(zip(names, pool.map(ServiceProcess.stop, procs), strict=True))
    # Every server exits cleanly on SIGTERM after the fuzzing.
    assert all(rc == 0 for rc in codes.values()), (
        codes,
        {p.log_path.name: p.log() for p in procs if codes[p.log_path.name] != 0},
    )


def _assert_alive(proc: ServiceProcess) -> None:
    assert proc.proc.poll() is None, f"{proc.log_path.name} exited:\n{proc.log()}"


def _fail(method: str, case: object, code: Code, details: str, proc: ServiceProcess) -> str:
    return (
        f"{method}: {code.name} ({details[:300]!r}) for case {case}\n"
        f"--- {proc.log_path.name} (tail) ---\n{proc.log()}"
    )


# --------------------------------------------------------------------------- RolloutService Act

GOOD_TEXTS = [
    "push the cube",
    "pick up the red cube",
    "ü ñ 漢字 🤖 robot",
    "nul\x00inside",
    "a" * 1000,
    "x",
]
BAD_TEXTS = ["", " ", "\t\n", "\u3000\u2003", "a" * 1001, "b" * 100_000]
BAD_DTYPES = ["", "object", "U8", "float128", "<u1", "uint8 ", "UINT8", "V3", "complex64", "str"]
DIMS = [0, 1, 2, 3, 7, 100, 223, 224, 225, 2**31, 2**62, 2**63 - 1, -1, -224, -(2**63)]
TEMPERATURES = [
    float("nan"), float("inf"), float("-inf"), -1.0, -0.0, 0.0, 1e-45, 1e-3, 0.01, 0.02,
    0.5, 1.0, 7.3, 100.0, 100.5, 1e9, 3.4e38,
]  # fmt: skip
TOP_KS = [-(2**31), -1, 0, 0, 1, 7, 255, 256, 257, 2**31 - 1]
SEEDS = [-(2**63), -1, 0, 1, 12345, 2**63 - 1]


def _pick(rng: np.random.Generator, pool: list):
    return pool[int(rng.integers(len(pool)))]


def _text(rng: np.random.Generator, max_len: int = 60) -> str:
    """Random text of printable and odd code points (no surrogates: proto strings are UTF-8)."""
    ranges = [(0x20, 0x7F), (0x00, 0x20), (0xA0, 0x2FF), (0x4E00, 0x4E80), (0x1F600, 0x1F650)]
    out = []
    for _ in range(int(rng.integers(0, max_len + 1))):
        lo, hi = _pick(rng, ranges)
        out.append(chr(int(rng.integers(lo, hi))))
    return "".join(out)


def _set_tensor(t: common_pb2.Tensor, rng, shape=None, dtype=None, match: float = 0.5) -> None:
    """Change a Tensor's shape and/or dtype; its bytes then match the header with probability
    `match` where that is at most 2 MB, and are left as they were otherwise."""
    if dtype is not None:
        t.dtype = dtype
    if shape is not None:
        del t.shape[:]
        t.shape.extend(int(d) for d in shape)
    itemsize = np.dtype(t.dtype).itemsize if t.dtype in WIRE_DTYPES else 1
    dims = list(t.shape)
    n = math.prod(dims) * itemsize if all(d >= 0 for d in dims) else -1
    if 0 <= n <= 2_000_000 and rng.random() < match:
        t.data = rng.bytes(n)


def _m_dtype(req, rng):
    dtype = _pick(rng, [*sorted(WIRE_DTYPES - {"uint8"}), *BAD_DTYPES])
    _set_tensor(req.images, rng, dtype=dtype)
    return f"dtype={dtype!r}"


def _m_shape(req, rng):
    small = [0, 1, 2, 3, 7, 16]
    shape = [_pick(rng, DIMS + small) for _ in range(int(rng.integers(0, 7)))]
    _set_tensor(req.images, rng, shape=shape)
    return f"shape={shape}"


def _m_batch_dim(req, rng):
    b = _pick(rng, [0, 1, 4, 2**31, -1, 2**63 - 1])
    if req.images.shape:
        req.images.shape[0] = b
    else:
        req.images.shape.append(b)
    return f"shape[0]={b}"


def _m_side(req, rng):
    b = len(req.instructions) or 1
    shape = [
        b,
        _pick(rng, [1, 16, 100, 223, 225]),
        _pick(rng, [16, 224, 225]),
        _pick(rng, [1, 3, 4]),
    ]
    _set_tensor(req.images, rng, shape=shape, match=0.8)
    return f"shape={shape}"


def _m_data_len(req, rng):
    data = req.images.data
    how = _pick(rng, ["truncate", "extend", "empty"])
    if how == "truncate":
        req.images.data = data[: max(0, len(data) - int(rng.integers(1, 1000)))]
    elif how == "extend":
        req.images.data = data + rng.bytes(int(rng.integers(1, 1000)))
    else:
        req.images.data = b""
    return f"data:{how}"


def _m_empty_batch(req, rng):
    _set_tensor(req.images, rng, shape=[0, IMAGE, IMAGE, 3], match=1.0)
    if rng.random() < 0.7:
        del req.instructions[:]
    return "empty batch"


def _m_no_images(req, rng):
    req.ClearField("images")
    return "no images"


def _m_instruction_count(req, rng):
    if len(req.instructions) and rng.random() < 0.5:
        del req.instructions[-1]
        return "one instruction fewer"
    req.instructions.append(_pick(rng, GOOD_TEXTS))
    return "one instruction more"


def _m_instruction_text(req, rng):
    if not len(req.instructions):
        req.instructions.append("x")
    i = int(rng.integers(len(req.instructions)))
    text = _pick(rng, [*BAD_TEXTS, *GOOD_TEXTS, _text(rng)])
    req.instructions[i] = text
    return f"instructions[{i}]={text[:20]!r}(len {len(text)})"


def _m_temperature(req, rng):
    req.temperature = _pick(rng, TEMPERATURES)
    return f"temperature={req.temperature}"


def _m_top_k(req, rng):
    req.top_k = _pick(rng, TOP_KS)
    return f"top_k={req.top_k}"


def _m_greedy(req, rng):
    req.greedy = not req.greedy
    return f"greedy={req.greedy}"


def _m_seed(req, rng):
    req.seed = _pick(rng, SEEDS)
    return f"seed={req.seed}"


def _m_request_id(req, rng):
    req.request_id = _text(rng, 200)
    return "request_id"


ACT_MUTATIONS = [
    _m_dtype, _m_shape, _m_batch_dim, _m_side, _m_data_len, _m_empty_batch, _m_no_images,
    _m_instruction_count, _m_instruction_text, _m_temperature, _m_top_k, _m_greedy, _m_seed,
    _m_request_id,
]  # fmt: skip


def _act_request(rng: np.random.Generator) -> tuple[rollout_pb2.ActRequest, list[str]]:
    """A valid request with 0-3 random mutations (a quarter stay valid before mutation)."""
    b = int(rng.integers(1, 4))
    req = rollout_pb2.ActRequest(
        request_id=f"r{int(rng.integers(1 << 30))}",
        instructions=[_pick(rng, GOOD_TEXTS) for _ in range(b)],
        temperature=_pick(rng, [0.0, 1.0, 0.7]),
        greedy=bool(rng.random() < 0.3),
    )
    req.images.CopyFrom(
        common_pb2.Tensor(
            data=rng.bytes(b * IMAGE_BYTES), shape=[b, IMAGE, IMAGE, 3], dtype="uint8"
        )
    )
    labels = [_pick(rng, ACT_MUTATIONS)(req, rng) for _ in range(_pick(rng, [0, 1, 1, 2, 3]))]
    return req, labels


def _act_valid(req: rollout_pb2.ActRequest) -> bool:
    """The documented Act rules (protos/vla_rl/v1/rollout.proto, README "What the services
    check"): uint8 [B>=1, 224, 224, 3] whose bytes match, one non-blank instruction of at most
    1000 characters per image, temperature (0 = unset = 1.0) in [0.01, 100] unless greedy, top_k
    >= 0."""
    t = req.images
    shape = list(t.shape)
    if t.dtype != "uint8" or len(shape) != 4 or shape[1:] != [IMAGE, IMAGE, 3]:
        return False
    if shape[0] < 1 or len(t.data) != math.prod(shape) or len(req.instructions) != shape[0]:
        return False
    if any(not s.strip() or len(s) > 1000 for s in req.instructions):
        return False
    temperature = req.temperature if req.temperature != 0 else 1.0
    if not req.greedy and not 0.01 <= temperature <= 100.0:
        return False
    return req.top_k >= 0


def _describe(req: rollout_pb2.ActRequest, labels: list[str]) -> dict:
    return {
        "mutations": labels,
        "images": {"dtype": req.images.dtype, "shape": list(req.images.shape),
                   "data_bytes": len(req.images.data)},
        "instructions": [f"{s[:20]!r}(len {len(s)})" for s in req.instructions],
        "temperature": req.temperature,
        "top_k": req.top_k,
        "greedy": req.greedy,
        "seed": req.seed if req.HasField("seed") else None,
    }  # fmt: skip


def _check_act_reply(reply: rollout_pb2.ActReply, req: rollout_pb2.ActRequest, version: int):
    out = decode_act_reply(reply)
    b = req.images.shape[0]
    assert reply.request_id == req.request_id
    assert out.action_tokens.shape == (b, 7) and out.logprobs.shape == (b, 7)
    assert out.actions.shape == (b, 1, 7) and np.isfinite(out.actions).all()
    assert ((out.action_tokens >= 31744) & (out.action_tokens < 32000)).all()
    assert np.isfinite(out.logprobs).all() and (out.logprobs <= 0).all()
    assert out.policy_version == version


def _valid_act(rng, b: int = 1) -> rollout_pb2.ActRequest:
    images = rng.integers(0, 256, (b, IMAGE, IMAGE, 3), dtype=np.uint8)
    return rollout_pb2.ActRequest(
        request_id="alive", images=to_tensor(images), instructions=["push the cube"] * b,
        temperature=1.0,
    )  # fmt: skip


def _rollout_alive(s: Services, stub, rng) -> int:
    """The rollout server still answers GetPolicy and a valid Act; returns the served version."""
    _assert_alive(s.rollout)
    version = stub.GetPolicy(rollout_pb2.GetPolicyRequest(), timeout=30).policy_version
    req = _valid_act(rng)
    _check_act_reply(stub.Act(req, timeout=60), req, version)
    return version


def _random_wire(rng) -> bytes:
    """Well-formed protobuf wire data: random field numbers (known ones included) with random
    varint, 64-bit, length-delimited or 32-bit values."""
    out = bytearray()

    def varint(n: int) -> None:
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return

    for _ in range(int(rng.integers(1, 6))):
        number = _pick(rng, [1, 2, 3, 4, 5, 6, 7, 8, int(rng.integers(9, 1 << 20))])
        wire = _pick(rng, [0, 1, 2, 5])
        varint(number << 3 | wire)
        if wire == 0:
            varint(
                _pick(rng, [0, 1, 255, 2**31 - 1, 2**63 - 1, 2**64 - 1, int(rng.integers(1 << 62))])
            )
        elif wire == 1:
            out += rng.bytes(8)
        elif wire == 2:
            value = _pick(rng, [rng.bytes(int(rng.integers(0, 40))), _text(rng).encode()])
            varint(len(value))
            out += value
        else:
            out += rng.bytes(4)
    return bytes(out)


def _parsed_random_bytes(rng, message_type, base: bytes, attempts: int = 400) -> list[bytes]:
    """Byte strings (random; random well-formed fields; `base` with flipped, cut or inserted
    bytes) that parse as `message_type`. Those that do not parse are grpcio's business
    (test_undecodable_request_bytes_are_refused_by_grpcio_before_the_servicer)."""
    out = []
    for _ in range(attempts):
        how = int(rng.integers(5))
        if how == 0:
            raw = rng.bytes(int(rng.integers(0, 64)))
        elif how == 1 or not base:
            raw = _random_wire(rng)
        else:
            b = bytearray(base)
            if how == 2:
                for _ in range(int(rng.integers(1, 4))):
                    b[int(rng.integers(len(b)))] = int(rng.integers(256))
            elif how == 3:
                del b[int(rng.integers(len(b))) :]
            else:
                at = int(rng.integers(len(b) + 1))
                b[at:at] = rng.bytes(int(rng.integers(1, 16)))
            raw = bytes(b)
        try:
            message_type.FromString(raw)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: skip it
            continue
        out.append(raw)
    return out


def test_fuzz_rollout_act(services):
    s = services
    rng = np.random.default_rng(SEED)
    channel = s.channel(s.rollout)
    stub = rollout_pb2_grpc.RolloutServiceStub(channel)
    version = _rollout_alive(s, stub, rng)
    sent = 0

    def check(method, code, details, case, valid, allowed):
        nonlocal sent
        _tally(method, code)
        if valid:
            assert code == OK, _fail(method, case, code, details, s.rollout)
        else:
            assert code in allowed, _fail(method, case, code, details, s.rollout)
        _assert_alive(s.rollout)
        sent += 1
        if sent % LIVENESS == 0:
            _rollout_alive(s, stub, rng)

    # Over the servers' 64 MiB message limit.
    huge = _valid_act(rng)
    huge.images.data = bytes(65 * 1024 * 1024)
    code, details, _ = _call(stub.Act, huge, timeout=60)
    check("Act", code, details, "65 MiB of image bytes", False, {Code.RESOURCE_EXHAUSTED})

    for _ in range(N_ACT):
        req, labels = _act_request(rng)
        valid = _act_valid(req)
        code, details, reply = _call(stub.Act, req, timeout=60)
        check("Act", code, details, _describe(req, labels), valid, ACT_CODES)
        if code == OK:
            _check_act_reply(reply, req, version)

    # ActStream: replies in order for the valid requests before the first invalid one, which
    # ends the stream with its status.
    for _ in range(N_ACT_STREAM):
        reqs = [_act_request(rng) for _ in range(int(rng.integers(1, 5)))]
        valid = [_act_valid(r) for r, _ in reqs]
        leading = valid.index(False) if False in valid else len(valid)
        replies = []
        code, details = OK, ""
        try:
            for reply in stub.ActStream(iter([r for r, _ in reqs]), timeout=120):
                replies.append(reply)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        case = [_describe(r, labels) for r, labels in reqs]
        check("ActStream", code, details, case, all(valid), ACT_CODES)
        assert len(replies) == leading, _fail("ActStream", case, code, details, s.rollout)
        for reply, (req, _) in zip(replies, reqs, strict=False):
            _check_act_reply(reply, req, version)

    # Random bytes that parse as an ActRequest, sent as they are.
    small = rollout_pb2.ActRequest(
        request_id="r", images=common_pb2.Tensor(data=bytes(12), shape=[1, 2, 2, 3], dtype="uint8"),
        instructions=["push"], temperature=1.0, top_k=3, seed=5,
    ).SerializeToString()  # fmt: skip
    act_raw = channel.unary_unary("/vla_rl.v1.RolloutService/Act")
    raws = _parsed_random_bytes(rng, rollout_pb2.ActRequest, small)[:N_ACT_RAW]
    assert len(raws) >= N_ACT_RAW // 2
    for raw in raws:
        req = rollout_pb2.ActRequest.FromString(raw)
        code, details, reply = _call(act_raw, raw, timeout=60)
        check("Act(raw)", code, details, f"bytes {raw.hex()}", _act_valid(req), ACT_CODES)
        if code == OK:
            _check_act_reply(rollout_pb2.ActReply.FromString(reply), req, version)

    policy_raw = channel.unary_unary("/vla_rl.v1.RolloutService/GetPolicy")
    for raw in _parsed_random_bytes(rng, rollout_pb2.GetPolicyRequest, b"")[:N_POLICY_RAW]:
        code, details, reply = _call(policy_raw, raw, timeout=30)
        check("GetPolicy(raw)", code, details, f"bytes {raw.hex()}", True, set())
        assert rollout_pb2.PolicyInfo.FromString(reply).policy_version == version

    assert _rollout_alive(s, stub, rng) == version
    _print_tally("Act", "ActStream", "Act(raw)", "GetPolicy(raw)")


# ------------------------------------------------------------------- RolloutService PushAdapter


def _lora_policy(ckpt: Path, settings: LoRASettings = LORA):
    policy = load_policy(ckpt)
    apply_lora(policy, settings)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return policy


def _header_blob(header: object) -> bytes:
    """A safetensors file that is only its header (8-byte length, JSON)."""
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw


def _stream(blob: bytes, version: int, *, sha=None, total=None, chunk_bytes=4096) -> list:
    """PushAdapter chunks: the header fields (overridable) on the first, the blob split after."""
    chunks = list(adapter_chunks(blob, version, chunk_bytes))
    if sha is not None:
        chunks[0].sha256 = sha
    if total is not None:
        chunks[0].total_bytes = total
    return chunks


def _sealed(blob: bytes, version: int, rng) -> list:
    """A stream whose header fields are right for `blob`: only the blob's content can be wrong."""
    return _stream(blob, version, chunk_bytes=_pick(rng, [512, 4096, 1 << 20]))


class _Push:
    """Malformed PushAdapter streams for a replica serving `version` (which has a LoRA of LORA's
    settings loaded). Every one must be refused."""

    def __init__(self, trained, rng) -> None:
        self.trained = trained
        self.rng = rng
        self.state = {
            n: t.detach().contiguous().clone() for n, t in trainable_state(trained).items()
        }
        self.fingerprint = base_fingerprint(trained)

    def meta(self, version: int, **changes) -> dict:
        meta = {
            "format": ADAPTER_FORMAT,
            "policy_version": str(version),
            "base_fingerprint": self.fingerprint,
            "lora": json.dumps({"rank": LORA.rank, "alpha": LORA.alpha, "targets": LORA.targets}),
        }
        meta.update(changes)
        return {k: v for k, v in meta.items() if v is not None}

    # -- the stream is wrong ------------------------------------------------------------------
    def wrong_sha(self, blob, v):
        return _stream(blob, v, sha=_pick(self.rng, [
            self.rng.bytes(32).hex(), hashlib.sha256(blob).hexdigest().upper(), "z" * 64,
            "", "0" * 63, hashlib.sha256(blob).hexdigest() + "0", _text(self.rng, 80),
        ]))  # fmt: skip

    def wrong_total(self, blob, v):
        n = len(blob)
        total = _pick(self.rng, [0, -1, -(2**63), n - 1, n - int(self.rng.integers(1, n)), n + 1,
                                 n + int(self.rng.integers(1, 1 << 20)), (2 << 30) + 1, 2**63 - 1])  # fmt: skip
        return _stream(blob, v, total=total)

    def wrong_version(self, blob, v):
        return _stream(blob, _pick(self.rng, [0, -1, -(2**63)]))

    def later_header_disagrees(self, blob, v):
        chunks = _stream(blob, v, chunk_bytes=4096)
        i = int(self.rng.integers(1, len(chunks)))
        what = _pick(self.rng, ["version", "sha256", "total_bytes"])
        value = {"version": v + 1, "sha256": "0" * 64, "total_bytes": len(blob) + 1}[what]
        setattr(chunks[i], what, value)
        return chunks

    def first_chunk_without_header(self, blob, v):
        chunks = _stream(blob, v, chunk_bytes=4096)
        chunks[0] = rollout_pb2.AdapterChunk(data=chunks[0].data)
        return chunks

    def empty_stream(self, blob, v):
        return []

    def header_only(self, blob, v):
        return [rollout_pb2.AdapterChunk(version=v, sha256=hashlib.sha256(blob).hexdigest(),
                                         total_bytes=len(blob))]  # fmt: skip

    def extra_chunk(self, blob, v):
        return [*_stream(blob, v), rollout_pb2.AdapterChunk(data=self.rng.bytes(100))]

    def corrupt_data(self, blob, v):
        chunks = _stream(blob, v, chunk_bytes=4096)
        i = int(self.rng.integers(len(chunks)))
        data = bytearray(chunks[i].data)
        j = int(self.rng.integers(len(data)))
        data[j] ^= int(self.rng.integers(1, 256))
        chunks[i].data = bytes(data)
        return chunks

    def random_chunks(self, blob, v):
        return [
            rollout_pb2.AdapterChunk(
                version=_pick(self.rng, [0, -5, 1, v, v + 1, 2**63 - 1]),
                sha256=_pick(self.rng, [self.rng.bytes(32).hex(), _text(self.rng, 70), ""]),
                total_bytes=_pick(self.rng, [0, -1, 10, 1000, 5000, 2**40]),
                data=self.rng.bytes(int(self.rng.integers(0, 5000))),
            )
            for _ in range(int(self.rng.integers(1, 6)))
        ]

    # -- the stream is right, the blob is not (sha256 and total_bytes match it) ---------------
    def truncated_blob(self, blob, v):
        return _sealed(blob[: int(self.rng.integers(1, len(blob)))], v, self.rng)

    def random_blob(self, blob, v):
        return _sealed(self.rng.bytes(int(self.rng.integers(1, 3000))), v, self.rng)

    def bad_metadata(self, blob, v):
        changes = _pick(self.rng, [
            {"format": None}, {"format": "vla-rl-adapter/2"}, {"format": ""},
            {"policy_version": None}, {"policy_version": "x"}, {"policy_version": "1.5"},
            {"policy_version": str(v + 1)}, {"policy_version": "-1"},
            {"lora": None}, {"lora": "not json"}, {"lora": "[1, 2]"},
            {"lora": json.dumps({"rank": 4})},
            {"lora": json.dumps({"rank": 0, "alpha": 8, "targets": ["llm"]})},
            {"lora": json.dumps({"rank": -3, "alpha": 8, "targets": ["llm"]})},
            {"lora": json.dumps({"rank": "4", "alpha": 8, "targets": ["llm"]})},
            {"lora": json.dumps({"rank": 4, "alpha": 8, "targets": ["everything"]})},
            {"lora": json.dumps({"rank": 2, "alpha": 2, "targets": ["llm"]})},
            # Refused as "differs from the served" here: this replica already has a LoRA (see
            # test_push_adapter_with_an_absurd_lora_rank_is_refused for one that has none).
            {"lora": json.dumps({"rank": 2**40, "alpha": 1, "targets": ["llm"]})},
            {"base_fingerprint": None}, {"base_fingerprint": "0" * 16},
            {},  # a right header without any tensor
        ])  # fmt: skip
        # Objects only: a header or __metadata__ that is a list or a string is the bug of
        # test_push_adapter_with_a_non_object_header_is_refused.
        header = _pick(self.rng, [
            {"__metadata__": self.meta(v, **changes)}, {}, {"__metadata__": None},
            {"__metadata__": {}}, {"__metadata__": self.meta(v, **changes), "x": {"dtype": "F32"}},
        ])  # fmt: skip
        return _sealed(_header_blob(header), v, self.rng)

    def bad_tensors(self, blob, v):
        state = dict(self.state)
        names = sorted(state)
        name = _pick(self.rng, names)
        how = _pick(self.rng, ["drop", "extra", "reshape", "nan", "inf", "stamp", "not_newer"])
        meta = self.meta(v)
        version = v
        if how == "drop":
            del state[name]
        elif how == "extra":
            state["value_head.extra.weight"] = torch.zeros(3)
        elif how == "reshape":
            state[name] = torch.zeros(state[name].numel() + 1)
        elif how in ("nan", "inf"):
            t = state[name].clone()
            t.view(-1)[0] = float(how)
            state[name] = t
        elif how == "stamp":
            meta = self.meta(v + int(self.rng.integers(1, 5)))
        else:  # the version the replica serves, or an older one: not newer
            version = v - 1 - int(self.rng.integers(0, v - 1)) if v > 1 else 1
            meta = self.meta(version)
        return _sealed(safetensors.torch.save(state, metadata=meta), version, self.rng)

    @property
    def kinds(self):
        return [
            self.wrong_sha, self.wrong_total, self.wrong_version, self.later_header_disagrees,
            self.first_chunk_without_header, self.empty_stream, self.header_only,
            self.extra_chunk, self.corrupt_data, self.random_chunks, self.truncated_blob,
            self.random_blob, self.bad_metadata, self.bad_metadata, self.bad_tensors,
            self.bad_tensors,
        ]  # fmt: skip


def _served(stub) -> tuple[int, str]:
    info = stub.GetPolicy(rollout_pb2.GetPolicyRequest(), timeout=30)
    return info.policy_version, info.adapter_sha256


def test_fuzz_rollout_push_adapter(services):
    s = services
    rng = np.random.default_rng(SEED + 1)
    stub = rollout_pb2_grpc.RolloutServiceStub(s.channel(s.rollout))
    trained = _lora_policy(s.ckpt)
    push = _Push(trained, rng)

    def valid_push() -> tuple[int, str]:
        version, _ = _served(stub)
        blob = serialize_adapter(trained, version + 1)
        code, details, reply = _call(stub.PushAdapter, iter(_sealed(blob, version + 1, rng)),
                                     timeout=120)  # fmt: skip
        _tally("PushAdapter", code)
        assert code == OK, _fail("PushAdapter", "a valid adapter", code, details, s.rollout)
        assert reply.policy_version == version + 1
        assert reply.sha256 == hashlib.sha256(blob).hexdigest()
        assert _served(stub) == (version + 1, reply.sha256)
        assert _rollout_alive(s, stub, rng) == version + 1
        return version + 1, reply.sha256

    served = valid_push()  # the replica now has a LoRA of LORA's settings
    for i in range(N_PUSH):
        if (i + 1) % 12 == 0:
            served = valid_push()
            continue
        kind = _pick(rng, push.kinds)
        version = served[0] + 1
        chunks = kind(serialize_adapter(trained, version), version)
        code, details, _ = _call(stub.PushAdapter, iter(chunks), timeout=120)
        _tally("PushAdapter", code)
        case = f"{kind.__name__}: " + str(
            [(c.version, c.sha256[:16], c.total_bytes, len(c.data)) for c in chunks][:6]
        )
        assert code in PUSH_CODES, _fail("PushAdapter", case, code, details, s.rollout)
        # A refused push leaves the served version and adapter as they were.
        assert _served(stub) == served, _fail("PushAdapter", case, code, details, s.rollout)
        _assert_alive(s.rollout)
        if (i + 1) % LIVENESS == 0:
            assert _rollout_alive(s, stub, rng) == served[0]
    valid_push()
    _print_tally("PushAdapter")


# --------------------------------------------------------------------------------- EnvService

KNOWN_TASKS = {"PickCube-v1", "PushCube-v1"}
OOD_MODULE = "services.env_server.ood_tasks"
OOD_TASK = "PushCube-v1-semantic-colour"
UNSET = object()
# The controllers a fuzzed Reset may name, with the action size each takes (Panda).
CONTROLLER_DIMS = {
    None: 7,  # unset: pd_ee_delta_pose
    "pd_ee_delta_pose": 7,
    "pd_ee_delta_pos": 4,
    "": 8,  # the task's default: pd_joint_delta_pos
    "pd_joint_delta_pos": 8,
    "zz_no_such_mode": None,
    "\x00": None,
}


RESET_POOLS: dict[str, list] = {
    "task_id": ["PushCube-v1", OOD_TASK, "", "NoSuchTask-v9", "PickCube-v1\x00", "pickcube-v1",
                "x" * 5000, "random text"],
    "task_modules": [[], [OOD_MODULE], ["antigravity"], ["os"], [""],
                     [OOD_MODULE, "no.such.module"]],
    "env_type": ["", "maniskill", "isaaclab", "MANISKILL", "\x00"],
    "image_size": [0, 16, 48, 15, 2049, -1, 2**31 - 1, -(2**31)],
    "reward_mode": ["", "sparse", "dense", "normalized_dense", "shaped", "SPARSE"],
    "max_episode_steps": [0, 1, 5, -1, 2**31 - 1, -(2**31)],
    "seed": [0, 2**31 - 1, 2**31, -1, 2**63 - 1, -(2**63)],
    "sim_backend": ["", "cpu", "gpu", "tpu"],
    "action_dim": [0, 7, 4, 8, 1, -1, 2**31 - 1],
    "ignore_terminations": [True, False],
    "control_mode": [UNSET, *CONTROLLER_DIMS],
    # A controller with the action size it takes (valid pairs).
    "controller": [("pd_ee_delta_pos", 4), ("", 8), ("pd_joint_delta_pos", 8),
                   ("pd_ee_delta_pose", 7)],
    "session_id": ["", "nope", "random", "good"],
}  # fmt: skip


def _reset_request(rng, good_sid: str) -> tuple[env_pb2.ResetRequest, dict]:
    """A valid Reset (a new session, or the good one) with 0-3 fields set from RESET_POOLS."""
    kw: dict = dict(
        task_id="PickCube-v1",
        seed=int(rng.integers(0, 1000)),
        image_size=_pick(rng, [16, 32]),
        session_id=_pick(rng, ["", "", good_sid]),
    )
    for _ in range(_pick(rng, [0, 1, 1, 2, 3])):
        name = _pick(rng, sorted(RESET_POOLS))
        value = _pick(rng, RESET_POOLS[name])
        if name == "controller":
            kw["control_mode"], kw["action_dim"] = value
            continue
        if name == "session_id":
            value = {"random": rng.bytes(16).hex(), "good": good_sid}.get(value, value)
        elif value == "random text":
            value = _text(rng)
        if value is UNSET:
            kw.pop(name, None)
        else:
            kw[name] = value
    return env_pb2.ResetRequest(**kw), kw


def _reset_valid(req: env_pb2.ResetRequest) -> bool | None:
    """The documented Reset rules (protos/vla_rl/v1/env.proto, services/env_server); None where
    the answer depends on what the server imported before (the OOD task without its module)."""
    if req.env_type not in ("", "maniskill") or req.sim_backend not in ("", "cpu"):
        return False
    if any(m != OOD_MODULE for m in req.task_modules):
        return False
    if req.task_id not in KNOWN_TASKS and req.task_id != OOD_TASK:
        return False
    if req.image_size and not 16 <= req.image_size <= 2048:
        return False
    if req.max_episode_steps < 0 or req.action_dim < 0 or not 0 <= req.seed < 2**31:
        return False
    if req.reward_mode not in ("", "sparse", "dense", "normalized_dense"):
        return False
    control = req.control_mode if req.HasField("control_mode") else None
    if CONTROLLER_DIMS[control] != (req.action_dim or 7):
        return False
    return None if req.task_id == OOD_TASK and not req.task_modules else True


START_POOLS: dict[str, list] = {
    "run_id": ["", "run", "random text"],
    "task_ids": [["PickCube-v1", "PickCube-v1"], [], [""], ["NoSuchTask-v9"]],
    "num_envs": [1, 2, 0, -1, 2**31 - 1],
    "sim_backend": ["", "cpu", "tpu", "gpu"],
    "pipeline_stage_num": [0, 1, 2, 3, -1],
    "group_size": [0, 1, 2, -2],
    "max_episode_steps": [4, 0, -1, 2**31 - 1],
    "steps_per_segment": [0, 2, 4, 5, -1],
    "rollout_target": ["127.0.0.1:1", "", "::::"],
    "buffer_url": ["memory://", "", "zz://nowhere", "redis://127.0.0.1:1/0"],
    "stream": ["", "random text"],
    "seed": SEEDS,
    "max_staleness": [0, 1, -1],
    "start_version": [0, 5, -5],
    "iterations": [0, 1, -1],
    "temperature": TEMPERATURES,
    "reward_mode": ["", "sparse", "dense", "shaped"],
    "task_modules": [[], ["antigravity"], ["no.such.module"], [OOD_MODULE]],
    "buffer_maxlen": [0, 10, -1],
    "image_size": [0, 32, 8, -1, 4096],
    "env_type": ["", "maniskill", "isaaclab"],
    "video_dir": ["", "/nonexistent/dir", "random text"],
    "ignore_terminations": [True, False],
    "info_on_video": [True, False],
}
# One of these is always set last: each is refused before the controller probe, which would cost
# seconds of ManiSkill start-up and then end in the UNAVAILABLE of the unreachable rollout service
# (tests/services/test_env_server.py covers that path).
START_INVALID: list[dict] = [
    {"num_envs": 0}, {"num_envs": -(2**31)}, {"max_episode_steps": 0}, {"max_episode_steps": -1},
    {"task_ids": []}, {"task_ids": ["NoSuchTask-v9"]}, {"task_ids": ["PickCube-v1", ""]},
    {"env_type": "isaaclab"}, {"image_size": 8}, {"image_size": -1}, {"image_size": 4096},
    {"sim_backend": "tpu"}, {"reward_mode": "shaped"}, {"rollout_target": ""},
    {"buffer_url": ""}, {"task_modules": ["antigravity"]}, {"group_size": -2},
    {"iterations": -1}, {"max_staleness": -1}, {"seed": -1}, {"seed": 2**31},
    {"num_envs": 1, "pipeline_stage_num": 3}, {"max_episode_steps": 4, "steps_per_segment": 5},
]  # fmt: skip


def _start_request(rng) -> tuple[env_pb2.StartCollectionRequest, dict]:
    """A StartCollection towards an unreachable rollout service with 0-4 random fields and one
    invalid one (START_INVALID)."""
    kw: dict = dict(
        task_ids=["PickCube-v1"], num_envs=1, max_episode_steps=4, rollout_target="127.0.0.1:1",
        buffer_url="memory://", control_mode="pd_ee_delta_pose",
    )  # fmt: skip
    for _ in range(int(rng.integers(0, 5))):
        name = _pick(rng, sorted(START_POOLS))
        value = _pick(rng, START_POOLS[name])
        kw[name] = _text(rng) if value == "random text" else value
    kw.update(_pick(rng, START_INVALID))
    return env_pb2.StartCollectionRequest(**kw), kw


def _action_tensor(rng, dim: int) -> tuple[common_pb2.Tensor, str]:
    """A Step action: valid float32 [D] or [C, D] in [-1, 1], or a malformed one."""
    shape = [dim] if rng.random() < 0.5 else [int(rng.integers(1, 4)), dim]
    action = rng.uniform(-1, 1, shape).astype(np.float32)
    t = to_tensor(action)
    how = _pick(rng, ["valid"] * 3 + ["dtype", "ndim", "dims", "data", "nan", "inf", "huge",
                                      "wrong_dim", "empty"])  # fmt: skip
    if how == "dtype":
        _set_tensor(t, rng, dtype=_pick(rng, [*sorted(WIRE_DTYPES - {"float32"}), *BAD_DTYPES]))
    elif how == "ndim":
        ndim = _pick(rng, [0, 3, 4, 6])
        _set_tensor(t, rng, shape=[int(rng.integers(1, 4)) for _ in range(ndim - 1)] + [dim][:ndim])
    elif how == "dims":
        _set_tensor(t, rng, shape=[_pick(rng, DIMS) for _ in range(len(shape))])
    elif how == "data":
        t.data = t.data[: int(rng.integers(0, len(t.data)))] + rng.bytes(int(rng.integers(0, 9)))
    elif how in ("nan", "inf", "huge"):
        action.reshape(-1)[int(rng.integers(action.size))] = {
            "nan": np.nan, "inf": -np.inf, "huge": 1e30,  # finite: valid (the env clips it)
        }[how]  # fmt: skip
        t = to_tensor(action)
    elif how == "wrong_dim":
        _set_tensor(t, rng, shape=shape[:-1] + [_pick(rng, [1, 4, 6, 8, 9])], match=0.9)
    elif how == "empty":
        # [0] or [C, 0]; the empty chunk [0, D] of the session's D is the bug of
        # test_step_with_an_empty_action_chunk_is_invalid_argument.
        _set_tensor(t, rng, shape=_pick(rng, [[0], [2, 0]]), match=1.0)
    return t, how


def _step_valid(t: common_pb2.Tensor, dim: int | None) -> bool:
    """float32 [D] or [C>=1, D] of the session's D, bytes matching, every value finite."""
    shape = list(t.shape)
    if dim is None or t.dtype != "float32" or len(shape) not in (1, 2) or min(shape) < 0:
        return False
    if len(t.data) != 4 * math.prod(shape) or shape[-1] != dim or shape[0] < 1:
        return False
    return bool(np.isfinite(np.frombuffer(t.data, "<f4")).all())


def test_fuzz_env_service(services):
    s = services
    rng = np.random.default_rng(SEED + 2)
    channel = s.channel(s.env)
    stub = env_pb2_grpc.EnvServiceStub(channel)
    good = s.first_reset.result()
    good_sid = good.session_id
    session = {"dim": 7, "size": 32}  # what the good session's current env takes and renders
    closed_sid = stub.Reset(env_pb2.ResetRequest(task_id="PickCube-v1", image_size=16),
                            timeout=120).session_id  # fmt: skip
    assert stub.CloseSession(env_pb2.CloseSessionRequest(session_id=closed_sid), timeout=30).closed
    sent = 0

    def alive():
        _assert_alive(s.env)
        assert stub.GetStatus(env_pb2.GetStatusRequest(), timeout=30).state in ("idle", "failed")
        action = to_tensor(np.zeros(session["dim"], np.float32))
        step = stub.Step(env_pb2.StepRequest(session_id=good_sid, action=action), timeout=60)
        assert from_tensor(step.image, expect_dtype="uint8").shape == (
            session["size"], session["size"], 3,
        )  # fmt: skip

    def check(method, code, details, case, valid, allowed):
        nonlocal sent
        _tally(method, code)
        if valid is True:
            assert code == OK, _fail(method, case, code, details, s.env)
        elif valid is False:
            assert code in allowed, _fail(method, case, code, details, s.env)
        else:  # OK or an allowed status
            assert code == OK or code in allowed, _fail(method, case, code, details, s.env)
        _assert_alive(s.env)
        sent += 1
        if sent % LIVENESS == 0:
            alive()

    alive()
    huge = env_pb2.StepRequest(session_id=good_sid, action=to_tensor(np.zeros(7, np.float32)))
    huge.action.data = bytes(65 * 1024 * 1024)
    code, details, _ = _call(stub.Step, huge, timeout=60)
    check("Step", code, details, "65 MiB of action bytes", False, {Code.RESOURCE_EXHAUSTED})

    for _ in range(N_RESET):
        req, kw = _reset_request(rng, good_sid)
        valid = _reset_valid(req)
        code, details, reply = _call(stub.Reset, req, timeout=120)
        case = {k: (v[:30] + f"...({len(v)})" if isinstance(v, str) and len(v) > 30 else v)
                for k, v in kw.items()}  # fmt: skip
        size = req.image_size or IMAGE
        if code == OK and reply.session_id == good_sid:  # before check() steps the session
            session.update(dim=req.action_dim or 7, size=size)
        check("Reset", code, details, case, valid, RESET_CODES)
        if code != OK:
            continue
        image = from_tensor(reply.image, expect_dtype="uint8")
        assert image.shape == (size, size, 3) and reply.instruction.strip()
        if reply.session_id != good_sid:  # a new session: closed, never reaching the limit
            assert reply.session_id != req.session_id or not req.session_id
            closed = stub.CloseSession(
                env_pb2.CloseSessionRequest(session_id=reply.session_id), timeout=30
            )
            assert closed.closed

    for _ in range(N_STEP):
        sid = _pick(rng, [good_sid] * 6 + ["", "nope", closed_sid, rng.bytes(16).hex()])
        action, how = _action_tensor(rng, session["dim"])
        req = env_pb2.StepRequest(session_id=sid, action=action)
        if rng.random() < 0.05:
            req.ClearField("action")
            how = "no action"
        if sid != good_sid:
            valid, allowed = False, {Code.NOT_FOUND}  # an unknown session is checked first
        else:
            valid, allowed = _step_valid(req.action, session["dim"]), STEP_CODES
        code, details, reply = _call(stub.Step, req, timeout=60)
        case = {"session": sid[:12], "how": how, "dtype": req.action.dtype,
                "shape": list(req.action.shape), "data_bytes": len(req.action.data)}  # fmt: skip
        check("Step", code, details, case, valid, allowed)
        if code == OK:
            image = from_tensor(reply.image, expect_dtype="uint8")
            assert image.shape == (session["size"], session["size"], 3)
            assert math.isfinite(reply.reward)

    for _ in range(N_START):
        req, case = _start_request(rng)
        code, details, _ = _call(stub.StartCollection, req, timeout=120)
        check("StartCollection", code, details, case, False, START_CODES)
        assert stub.GetStatus(env_pb2.GetStatusRequest(), timeout=30).state != "running"

    get_status_raw = channel.unary_unary("/vla_rl.v1.EnvService/GetStatus")
    raws = _parsed_random_bytes(rng, env_pb2.GetStatusRequest, b"")
    for i in range(N_MISC_ENV):
        which = i % 3
        if which == 0:
            req = env_pb2.StopCollectionRequest(run_id=_pick(rng, ["", "zz", _text(rng)]))
            code, details, reply = _call(stub.StopCollection, req, timeout=60)
            check("StopCollection", code, details, req, True, set())
            assert reply.state != "running"
        elif which == 1:
            sid = _pick(rng, ["", "nope", closed_sid, _text(rng), "\x00"])
            req = env_pb2.CloseSessionRequest(session_id=sid)
            code, details, reply = _call(stub.CloseSession, req, timeout=30)
            check("CloseSession", code, details, req, True, set())
            assert not reply.closed
        else:
            raw = raws[i % len(raws)]
            code, details, reply = _call(get_status_raw, raw, timeout=30)
            check("GetStatus(raw)", code, details, raw.hex(), True, set())
            assert env_pb2.CollectionStatus.FromString(reply).state != "running"

    alive()
    # A fresh session still plays.
    reply = stub.Reset(env_pb2.ResetRequest(task_id="PushCube-v1", seed=3, image_size=32),
                       timeout=120)  # fmt: skip
    step = stub.Step(env_pb2.StepRequest(session_id=reply.session_id,
                                         action=to_tensor(np.zeros((2, 7), np.float32))),
                     timeout=60)  # fmt: skip
    assert from_tensor(step.image).shape == (32, 32, 3)
    for sid in (reply.session_id, good_sid):
        assert stub.CloseSession(env_pb2.CloseSessionRequest(session_id=sid), timeout=30).closed
    _print_tally("Reset", "Step", "StartCollection", "StopCollection", "CloseSession",
                 "GetStatus(raw)")  # fmt: skip


# ----------------------------------------------------------------------------- LearnerService


def test_fuzz_learner_service(services):
    s = services
    rng = np.random.default_rng(SEED + 3)
    channel = s.channel(s.learner)
    stub = learner_pb2_grpc.LearnerServiceStub(channel)
    raw_call = channel.unary_unary("/vla_rl.v1.LearnerService/GetStatus")
    base = learner_pb2.LearnerStatusRequest().SerializeToString()
    raws = _parsed_random_bytes(rng, learner_pb2.LearnerStatusRequest, base)[:N_LEARNER]
    assert len(raws) == N_LEARNER
    for raw in raws:
        code, details, reply = _call(raw_call, raw, timeout=30)
        _tally("Learner.GetStatus(raw)", code)
        assert code == OK, _fail("Learner.GetStatus", raw.hex(), code, details, s.learner)
        status = learner_pb2.LearnerStatus.FromString(reply)
        assert status.phase and status.iteration == 0 and status.policy_version == 0
        _assert_alive(s.learner)
    _assert_alive(s.learner)
    assert stub.GetStatus(learner_pb2.LearnerStatusRequest(), timeout=30).phase
    _print_tally("Learner.GetStatus(raw)")


# ------------------------------------------------------ bytes that do not parse as the request

UNARY_METHODS = [
    ("rollout", "/vla_rl.v1.RolloutService/Act"),
    ("rollout", "/vla_rl.v1.RolloutService/GetPolicy"),
    ("env", "/vla_rl.v1.EnvService/Reset"),
    ("env", "/vla_rl.v1.EnvService/Step"),
    ("env", "/vla_rl.v1.EnvService/StartCollection"),
    ("env", "/vla_rl.v1.EnvService/StopCollection"),
    ("env", "/vla_rl.v1.EnvService/GetStatus"),
    ("env", "/vla_rl.v1.EnvService/CloseSession"),
    ("learner", "/vla_rl.v1.LearnerService/GetStatus"),
]


def test_undecodable_request_bytes_are_refused_by_grpcio_before_the_servicer(services):
    """Bytes that are not a protobuf message never reach the project's code: grpcio answers
    INTERNAL "Exception deserializing request!" itself (as gRPC servers in other languages do for
    an unparseable message), and the server goes on serving."""
    s = services
    garbage = [b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x07", b"\x12\x05ab"]
    for name, path in UNARY_METHODS:
        proc = getattr(s, name)
        call = s.channel(proc).unary_unary(path)
        for raw in garbage:
            code, details, _ = _call(call, raw, timeout=30)
            _tally("undecodable", code)
            assert (code, details) == (Code.INTERNAL, "Exception deserializing request!"), (
                path, raw, code, details,
            )  # fmt: skip
        _assert_alive(proc)
    rng = np.random.default_rng(SEED + 4)
    _rollout_alive(s, rollout_pb2_grpc.RolloutServiceStub(s.channel(s.rollout)), rng)
    env = env_pb2_grpc.EnvServiceStub(s.channel(s.env))
    assert env.GetStatus(env_pb2.GetStatusRequest(), timeout=30).state != "running"
    learner = learner_pb2_grpc.LearnerServiceStub(s.channel(s.learner))
    assert learner.GetStatus(learner_pb2.LearnerStatusRequest(), timeout=30).phase


# ------------------------------------------------- the trajectory stream the learner's buffer reads

STREAM = "fuzz:segments"


def _raw_segment(segment, meta_changes: dict | None = None, tensor_changes: dict | None = None,
                 metadata_text: str | None = None) -> bytes:  # fmt: skip
    """An encoded segment built by hand, so that it can break the format's rules."""
    meta = {
        "format": 1, "segment_id": segment.segment_id, "run_id": segment.run_id,
        "policy_version": segment.policy_version, "iteration": segment.iteration,
        "group_id": segment.group_id, "task_id": segment.task_id,
        "instructions": list(segment.instructions),
        "bootstrap_instruction": segment.bootstrap_instruction, "episodes": segment.episodes,
    }  # fmt: skip
    for k, v in (meta_changes or {}).items():
        if v is UNSET:
            meta.pop(k)
        else:
            meta[k] = v
    tensors = {
        name: getattr(segment, name)
        for name in ("images", "action_tokens", "behaviour_logprobs", "rewards", "terminated",
                     "truncated", "success", "bootstrap_image")
    }  # fmt: skip
    for k, v in (tensor_changes or {}).items():
        if v is UNSET:
            tensors.pop(k)
        else:
            tensors[k] = v
    text = metadata_text if metadata_text is not None else json.dumps(meta)
    return safetensors.numpy.save(tensors, metadata={"vla_rl.segment": text})


def _bad_entry(rng, i: int, donor) -> tuple[str, dict, str]:
    """(kind, entry fields, what its dead letter's error must say) of an entry that cannot be
    used; every one has a segment id of its own, so none is dropped as a duplicate."""
    sid = f"bad-{i}".encode()
    blob = encode_segment(donor)
    kind = _pick(rng, [
        "random_bytes", "truncated", "empty_data", "missing_data", "missing_segment_id",
        "unknown_fields", "non_utf8_id", "id_mismatch", "bad_metadata", "bad_tensors",
        "huge_header_length", "header_not_json", "header_not_an_object",
    ])  # fmt: skip
    decode_error = "SegmentDecodeError"
    if kind == "random_bytes":
        return kind, {"segment_id": sid, "data": rng.bytes(int(rng.integers(0, 300)))}, decode_error
    if kind == "truncated":
        cut = int(rng.integers(0, len(blob)))
        return kind, {"segment_id": sid, "data": blob[:cut]}, decode_error
    if kind == "empty_data":
        return kind, {"segment_id": sid, "data": b""}, decode_error
    if kind == "missing_data":
        return kind, {"segment_id": sid, "extra": b"1"}, "lacks the field(s) ['data']"
    if kind == "missing_segment_id":
        return kind, {"data": blob}, "lacks the field(s) ['segment_id']"
    if kind == "unknown_fields":
        fields = {f"f{j}": rng.bytes(8) for j in range(int(rng.integers(1, 4)))}
        return kind, fields, "lacks the field(s) ['segment_id', 'data']"
    if kind == "non_utf8_id":
        return kind, {"segment_id": b"\xff\xfe" + sid, "data": blob}, "segment_id is not UTF-8"
    if kind == "id_mismatch":  # a whole valid segment under another segment's id
        return kind, {"segment_id": sid, "data": blob}, "differs from the encoded segment's"
    if kind == "bad_metadata":
        changes = _pick(rng, [
            {"format": 2}, {"format": "1"}, {"policy_version": -1}, {"policy_version": "1"},
            {"policy_version": True}, {"iteration": 1.5}, {"group_id": -2},
            {"task_id": None}, {"instructions": ["only one"]}, {"episodes": [{"return": 1}]},
            {"episodes": [{"success_once": 1, "episode_len": 2, "return": 1.0}]},
            {"episodes": "none"}, {"run_id": UNSET}, {"unexpected": 1},
        ])  # fmt: skip
        return kind, {"segment_id": sid, "data": _raw_segment(donor, changes)}, decode_error
    if kind == "bad_tensors":
        t = donor.num_steps
        changes = _pick(rng, [
            {"images": donor.images.astype(np.float32)},
            {"rewards": np.full(t, np.nan, np.float32)},
            {"behaviour_logprobs": np.full(donor.behaviour_logprobs.shape, np.inf, np.float32)},
            {"truncated": np.array([True] + [False] * (t - 1))},
            {"action_tokens": donor.action_tokens[:, :0]},
            {"bootstrap_image": donor.bootstrap_image[:1]},
            {"success": UNSET},
            {"extra": np.zeros(2, np.float32)},
        ])  # fmt: skip
        return kind, {"segment_id": sid, "data": _raw_segment(donor, None, changes)}, decode_error
    if kind == "huge_header_length":
        data = (2**63).to_bytes(8, "little") + blob[8:]
        return kind, {"segment_id": sid, "data": data}, decode_error
    if kind == "header_not_json":
        text = _pick(rng, ["{not json", "", "[1, 2]", "null", '"a string"'])
        return (
            kind,
            {"segment_id": sid, "data": _raw_segment(donor, metadata_text=text)},
            decode_error,
        )
    # header_not_an_object: the safetensors header itself is a list
    return kind, {"segment_id": sid, "data": _header_blob([1, 2, 3])}, decode_error


def test_fuzz_stream_entries_are_dead_lettered(redis_url):
    """Garbage, truncated and wrong-field entries between valid ones in the stream the learner
    reads: every bad entry goes to `<stream>:dead` (acked) with its reason, a second copy of a
    valid segment is dropped as a duplicate, and the valid segments come out exactly, in order."""
    rng = np.random.default_rng(SEED + 5)
    client = redis.Redis.from_url(redis_url)
    producer = RedisStreamsBuffer(redis_url, stream=STREAM)
    consumer = RedisStreamsBuffer(redis_url, stream=STREAM, consumer="fuzz-learner")
    try:
        consumer.pending()  # creates the group: its reads start at the stream's beginning
        valid: list[tuple[str, object]] = []  # (entry id, segment)
        bad: dict[str, tuple[str, dict, str]] = {}  # entry id -> (kind, fields, reason)
        duplicates: list[str] = []
        for i in range(N_STREAM_ENTRIES):
            r = rng.random()
            if r < 0.3:
                segment = make_segment(i, segment_id=f"ok-{i}")
                valid.append((producer.put(segment), segment))
            elif r < 0.36 and valid:
                _, original = valid[int(rng.integers(len(valid)))]
                fields = {"segment_id": original.segment_id.encode(),
                          "data": encode_segment(original)}  # fmt: skip
                duplicates.append(client.xadd(STREAM, fields).decode())
            else:
                kind, fields, reason = _bad_entry(rng, i, make_segment(i))
                bad[client.xadd(STREAM, fields).decode()] = (kind, fields, reason)
        assert len(valid) > 10 and len(bad) > 40 and duplicates

        received = []
        empty_takes = 0
        while empty_takes < 2:
            got = consumer.take(count=int(rng.integers(1, 9)), timeout_s=0.05)
            empty_takes = 0 if got else empty_takes + 1
            received += got

        assert [r.entry_id for r in received] == [e for e, _ in valid]
        for r, (_, segment) in zip(received, valid, strict=True):
            assert_same_segment(r.segment, segment)
        assert consumer.dead_letters() == len(bad)
        assert consumer.duplicates_dropped == len(duplicates)
        dead = client.xrange(f"{STREAM}:dead")
        assert sorted(f[b"entry_id"].decode() for _, f in dead) == sorted(bad)
        kinds = Counter()
        for _, record in dead:
            kind, fields, reason = bad[record[b"entry_id"].decode()]
            kinds[kind] += 1
            error = record[b"error"].decode()
            assert reason in error, (kind, error)
            for k, v in fields.items():  # the dead letter keeps the entry as it was
                assert record[f"field:{k}".encode()] == v, (kind, k)
        # Dead letters and duplicates are acked; only the valid segments wait for their ack.
        assert consumer.pending() == len(valid)
        assert consumer.ack([r.entry_id for r in received]) == len(valid)
        assert consumer.pending() == 0 and consumer.acknowledged() == len(valid)
        # Nothing comes back to a restarted consumer.
        restarted = RedisStreamsBuffer(redis_url, stream=STREAM, consumer="fuzz-learner")
        assert restarted.take(count=100, timeout_s=0.1) == []
        restarted.close()
        print(f"fuzz stream: {len(valid)} valid, {len(duplicates)} duplicates, "
              f"{len(bad)} dead-lettered {dict(sorted(kinds.items()))}")  # fmt: skip
    finally:
        producer.close()
        consumer.close()
        client.close()


# ------------------------------------ bugs this fuzzing found (fixed; kept as regression tests)


@pytest.mark.parametrize(
    "header",
    [[1, 2], {"__metadata__": [1]}, {"__metadata__": "x"}],
    ids=["header_is_a_list", "metadata_is_a_list", "metadata_is_a_string"],
)
def test_push_adapter_with_a_non_object_header_is_refused(services, header):
    s = services
    stub = rollout_pb2_grpc.RolloutServiceStub(s.channel(s.rollout))
    served = _served(stub)
    version = served[0] + 1
    code, details, _ = _call(
        stub.PushAdapter, iter(_stream(_header_blob(header), version)), timeout=60
    )
    assert _served(stub) == served
    _rollout_alive(s, stub, np.random.default_rng(0))
    assert code in PUSH_CODES, (code, details)


def test_a_refused_push_to_a_replica_without_lora_changes_nothing(services):
    """On a fresh replica (the learner's first push): blobs whose metadata claims other LoRA
    settings, without tensors, are refused with a caller's status and change nothing, so that the
    learner's real adapter (rank 4, alpha 8, every target) still loads."""
    s = services
    proc = s.spares["fresh"]
    stub = rollout_pb2_grpc.RolloutServiceStub(s.channel(proc))
    assert _served(stub) == (0, "")
    problems = []
    for lora in ({"rank": 2**40, "alpha": 1, "targets": ["llm"]},  # INTERNAL
                 {"rank": 2, "alpha": 2, "targets": ["llm"]}):  # fmt: skip
        meta = {"format": ADAPTER_FORMAT, "policy_version": "1", "lora": json.dumps(lora)}
        blob = _header_blob({"__metadata__": meta})
        code, details, _ = _call(stub.PushAdapter, iter(_stream(blob, 1)), timeout=60)
        if code not in PUSH_CODES:
            problems.append(f"rank {lora['rank']}: {code.name} {details}")
        assert _served(stub) == (0, "")
        _assert_alive(proc)
    blob = serialize_adapter(_lora_policy(s.ckpt), 1)
    code, details, _ = _call(stub.PushAdapter, iter(_stream(blob, 1)), timeout=60)
    if code != OK:
        problems.append(f"then the real adapter: {code.name} {details}")
    # Before the fix: rank 1099511627776 answered INTERNAL (the allocation of that LoRA failed),
    # and the real adapter was then refused: 'differs from the served 2/2/['llm']'.
    assert not problems, problems


def test_step_with_an_empty_action_chunk_is_invalid_argument(services):
    s = services
    stub = env_pb2_grpc.EnvServiceStub(s.channel(s.env))
    sid = stub.Reset(env_pb2.ResetRequest(task_id="PickCube-v1", image_size=16),
                     timeout=120).session_id  # fmt: skip
    try:
        req = env_pb2.StepRequest(session_id=sid, action=to_tensor(np.zeros((0, 7), np.float32)))
        code, details, _ = _call(stub.Step, req, timeout=60)
        _assert_alive(s.env)
        action = to_tensor(np.zeros(7, np.float32))
        stub.Step(env_pb2.StepRequest(session_id=sid, action=action), timeout=60)
        assert code == Code.INVALID_ARGUMENT, (code, details)
    finally:
        stub.CloseSession(env_pb2.CloseSessionRequest(session_id=sid), timeout=30)
