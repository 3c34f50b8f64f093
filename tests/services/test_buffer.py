"""Trajectory buffer: segment encoding, and delivery semantics on a real redis-server and in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import safetensors.numpy

from vla_rl.buffer import (
    MemoryBuffer,
    RedisStreamsBuffer,
    Segment,
    SegmentDecodeError,
    decode_segment,
    encode_segment,
    from_url,
    serve_memory_buffer,
)
from vla_rl.buffer.memory import MemoryStreamStore, resolve_authkey

STREAM = "test:segments"
GROUP = "learner"
T, K, H, W = 4, 7, 8, 6


def make_segment(index: int, segment_id: str | None = None) -> Segment:
    rng = np.random.default_rng(index)
    return Segment(
        segment_id=segment_id or f"run-srv-{index}-0",
        run_id="run",
        policy_version=index % 3,
        iteration=index,
        group_id=index % 2 - 1,
        task_id="PickCube-v1",
        images=rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8),
        instructions=[f"pick up the cube {i} ü" for i in range(T)],
        action_tokens=rng.integers(31744, 32000, (T, K), dtype=np.int64),
        behaviour_logprobs=-rng.exponential(size=(T, K)).astype(np.float32),
        rewards=rng.normal(size=T).astype(np.float32),
        terminated=np.array([False, True, False, False]),
        truncated=np.array([False, False, False, True]),
        success=np.array([False, True, False, False]),
        bootstrap_image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        bootstrap_instruction="pick up the cube",
        episodes=[{"success_once": True, "episode_len": 2, "return": 1.5}],
    )


def assert_same_segment(a: Segment, b: Segment) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and value.shape == other.shape, name
            assert value.tobytes() == other.tobytes(), name
        else:
            assert value == other and type(value) is type(other), name


# -- encoding ---------------------------------------------------------------------------------


def test_round_trip_is_bit_exact():
    segment = make_segment(3)
    segment.behaviour_logprobs[0, 0] = -0.0
    segment.rewards[1] = np.float32(1e-38)  # subnormal-adjacent values survive unchanged
    decoded = decode_segment(encode_segment(segment))
    assert_same_segment(segment, decoded)
    assert decoded.num_steps == T


def _encode_raw(tensors: dict, metadata: dict | str) -> bytes:
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    return safetensors.numpy.save(tensors, metadata={"vla_rl.segment": text})


def _parts(segment: Segment) -> tuple[dict, dict]:
    blob = encode_segment(segment)
    tensors = safetensors.numpy.load(blob)
    header_len = int.from_bytes(blob[:8], "little")
    metadata = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["vla_rl.segment"])
    return tensors, metadata


def _corrupt_tensor(name, fn):
    def build():
        tensors, metadata = _parts(make_segment(0))
        tensors[name] = fn(tensors[name])
        return _encode_raw(tensors, metadata)

    return build


def _corrupt_metadata(fn):
    def build():
        tensors, metadata = _parts(make_segment(0))
        fn(metadata)
        return _encode_raw(tensors, metadata)

    return build


def _without_tensor(name):
    def build():
        tensors, metadata = _parts(make_segment(0))
        del tensors[name]
        return _encode_raw(tensors, metadata)

    return build


def _with_extra_tensor():
    tensors, metadata = _parts(make_segment(0))
    tensors["values"] = np.zeros(T, np.float32)
    return _encode_raw(tensors, metadata)


DECODE_ERRORS = {
    "not bytes": (lambda: "text", "expected bytes"),
    "too short": (lambda: b"\x01\x02", "too short"),
    "header length": (lambda: (10**9).to_bytes(8, "little") + b"{}", "header length"),
    "header not json": (lambda: (4).to_bytes(8, "little") + b"{{{{", "header is not JSON"),
    "no metadata": (
        lambda: safetensors.numpy.save({"x": np.zeros(2, np.float32)}),
        "no 'vla_rl.segment' metadata",
    ),
    "metadata not json": (
        lambda: _encode_raw(_parts(make_segment(0))[0], "{not json"),
        "metadata is not JSON",
    ),
    "metadata key missing": (
        _corrupt_metadata(lambda m: m.pop("run_id")),
        r"missing: \['run_id'\]",
    ),
    "metadata key unexpected": (
        _corrupt_metadata(lambda m: m.update(colour="red")),
        r"unexpected: \['colour'\]",
    ),
    "format version": (_corrupt_metadata(lambda m: m.update(format=99)), "format 99"),
    "truncated payload": (lambda: encode_segment(make_segment(0))[:-10], "malformed safetensors"),
    "tensor missing": (_without_tensor("rewards"), r"tensors missing: \['rewards'\]"),
    "tensor unexpected": (_with_extra_tensor, r"unexpected: \['values'\]"),
    "dtype": (
        _corrupt_tensor("rewards", lambda x: x.astype(np.float64)),
        "rewards must have dtype float32",
    ),
    "T of rewards": (
        _corrupt_tensor("rewards", lambda x: x[:-1]),
        r"rewards must have shape \[T=4\]",
    ),
    "T of tokens": (_corrupt_tensor("action_tokens", lambda x: x[:-1]), "action_tokens"),
    "K of logprobs": (
        _corrupt_tensor("behaviour_logprobs", lambda x: x[:, :-1]),
        "behaviour_logprobs must have the shape of action_tokens",
    ),
    "image channels": (_corrupt_tensor("images", lambda x: x[..., :2]), "images must have shape"),
    "bootstrap image": (
        _corrupt_tensor("bootstrap_image", lambda x: x[:-1]),
        "bootstrap_image must have shape",
    ),
    "nan logprob": (
        _corrupt_tensor("behaviour_logprobs", lambda x: np.full_like(x, np.nan)),
        "behaviour_logprobs must be finite",
    ),
    "instructions length": (
        _corrupt_metadata(lambda m: m["instructions"].pop()),
        "instructions must be a list of T=4",
    ),
    "policy version type": (
        _corrupt_metadata(lambda m: m.update(policy_version="3")),
        "policy_version must be an int",
    ),
    "policy version bool": (
        _corrupt_metadata(lambda m: m.update(policy_version=True)),
        "policy_version must be an int",
    ),
    "group id": (_corrupt_metadata(lambda m: m.update(group_id=-2)), "group_id must be >= -1"),
    "episode key": (
        _corrupt_metadata(lambda m: m["episodes"][0].pop("return")),
        r"episodes\[0\] keys missing",
    ),
    "empty segment id": (
        _corrupt_metadata(lambda m: m.update(segment_id="")),
        "segment_id must not be empty",
    ),
}


@pytest.mark.parametrize("case", sorted(DECODE_ERRORS))
def test_decode_rejects(case):
    build, message = DECODE_ERRORS[case]
    with pytest.raises(SegmentDecodeError, match=message):
        decode_segment(build())


def test_encode_validates():
    segment = make_segment(0)
    segment.terminated = segment.terminated.astype(np.uint8)
    with pytest.raises(ValueError, match="terminated must have dtype bool"):
        encode_segment(segment)
    segment = make_segment(0)
    segment.episodes = [{"success_once": True, "episode_len": 2, "return": 1.0, "extra": 1}]
    with pytest.raises(ValueError, match=r"unexpected: \['extra'\]"):
        encode_segment(segment)


# -- delivery semantics, on both backends -----------------------------------------------------


class Backend:
    """Opens buffers on one shared stream, so a new object stands for a restarted process."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.store = MemoryStreamStore()
        self.opened = []

    def open(self, consumer: str = "learner-0", **kwargs):
        kwargs.setdefault("claim_idle_ms", 60_000)
        if self.kind == "redis":
            buffer = RedisStreamsBuffer(self.redis_url, STREAM, GROUP, consumer, **kwargs)
        else:
            buffer = MemoryBuffer(STREAM, GROUP, consumer, store=self.store, **kwargs)
        self.opened.append(buffer)
        return buffer

    def add_raw(self, fields: dict[str, bytes]) -> str:
        if self.kind == "redis":
            client = redis.Redis.from_url(self.redis_url)
            try:
                return client.xadd(STREAM, fields).decode()
            finally:
                client.close()
        return self.store.add(STREAM, fields, None)

    def dead_letter_errors(self) -> list[str]:
        if self.kind == "redis":
            client = redis.Redis.from_url(self.redis_url)
            try:
                return [f[b"error"].decode() for _, f in client.xrange(f"{STREAM}:dead")]
            finally:
                client.close()
        return [r["error"] for r in self.store.dead_letter_records(STREAM)]


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    backend = Backend(request.param, redis_url)
    yield backend
    for buffer in backend.opened:
        buffer.close()


def ids_of(received) -> list[str]:
    return [r.segment.segment_id for r in received]


def test_put_take_ack(backend):
    buffer = backend.open()
    segments = [make_segment(i) for i in range(3)]
    entry_ids = [buffer.put(s) for s in segments]
    assert buffer.length() == 3 and buffer.pending() == 0

    received = buffer.take(10, timeout_s=1.0)
    assert [r.entry_id for r in received] == entry_ids
    for r, s in zip(received, segments, strict=True):
        assert_same_segment(r.segment, s)
    assert buffer.pending() == 3

    assert buffer.ack([r.entry_id for r in received]) == 3
    assert buffer.pending() == 0
    assert buffer.take(10, timeout_s=0.05) == []


def test_take_returns_at_most_count(backend):
    buffer = backend.open()
    for i in range(5):
        buffer.put(make_segment(i))
    assert len(buffer.take(2, 0)) == 2
    assert len(buffer.take(10, 0)) == 3


def test_acked_entries_are_not_redelivered_after_restart(backend):
    first = backend.open()
    for i in range(3):
        first.put(make_segment(i))
    first.ack([r.entry_id for r in first.take(10, 1.0)])
    first.close()

    restarted = backend.open()
    assert restarted.take(10, timeout_s=0.1) == []
    assert restarted.pending() == 0


def test_unacked_entries_come_back_to_the_same_consumer_after_restart(backend):
    first = backend.open(consumer="learner-0")
    for i in range(3):
        first.put(make_segment(i))
    received = first.take(10, 1.0)
    first.ack([received[0].entry_id])
    first.close()  # crashed before committing the other two

    restarted = backend.open(consumer="learner-0")
    again = restarted.take(10, timeout_s=0)
    assert [r.entry_id for r in again] == [r.entry_id for r in received[1:]]
    assert_same_segment(again[0].segment, received[1].segment)
    restarted.ack([r.entry_id for r in again])
    assert restarted.pending() == 0


def test_unacked_entries_are_claimed_by_another_consumer_once_idle(backend):
    first = backend.open(consumer="learner-0", claim_idle_ms=300)
    for i in range(2):
        first.put(make_segment(i))
    held = first.take(10, 1.0)
    first.close()

    other = backend.open(consumer="learner-1", claim_idle_ms=300)
    assert other.take(10, timeout_s=0) == []  # not idle long enough yet
    start = time.monotonic()
    claimed = other.take(10, timeout_s=5.0)  # blocks, and claims once they are idle
    assert time.monotonic() - start < 3.0
    assert sorted(r.entry_id for r in claimed) == sorted(r.entry_id for r in held)
    other.ack([r.entry_id for r in claimed])
    assert other.pending() == 0
    assert other.take(10, timeout_s=0.4) == []


def test_duplicates_are_dropped_by_segment_id(backend):
    buffer = backend.open()
    buffer.put(make_segment(0))
    buffer.put(make_segment(0))  # e.g. an env server retried an XADD
    buffer.put(make_segment(1))
    received = buffer.take(10, 1.0)
    assert ids_of(received) == ["run-srv-0-0", "run-srv-1-0"]
    assert buffer.duplicates_dropped == 1
    buffer.ack([r.entry_id for r in received])
    assert buffer.pending() == 0

    buffer.put(make_segment(0))  # after the ack: never handed out again, even to a new consumer
    other = backend.open(consumer="learner-1")
    assert other.take(10, timeout_s=0.1) == []
    assert other.pending() == 0 and other.duplicates_dropped == 1


def test_segment_truncated_mid_way_goes_to_dead_letters_with_its_reason(backend):
    """The learner bootstraps a time-limit cut from the segment's bootstrap observation, which
    exists only after the last step: a cut anywhere else is refused when the entry is decoded."""
    bad = make_segment(1)
    bad.truncated = np.array([False, True, False, False])
    bad.validate = lambda: None  # a writer that skips validation
    backend.add_raw({"segment_id": bad.segment_id.encode(), "data": encode_segment(bad)})
    buffer = backend.open()
    buffer.put(make_segment(2))
    assert ids_of(buffer.take(10, 1.0)) == ["run-srv-2-0"]
    assert buffer.dead_letters() == 1
    (error,) = backend.dead_letter_errors()
    assert "truncated at step 1 of 4" in error and "last step" in error


def test_duplicate_of_a_held_segment_is_dropped(backend):
    buffer = backend.open()
    buffer.put(make_segment(0))
    first = buffer.take(1, 1.0)
    buffer.put(make_segment(0))
    assert buffer.take(10, timeout_s=0.05) == []  # the copy is acked; the original stays held
    assert buffer.pending() == 1
    buffer.close()

    restarted = backend.open()
    assert [r.entry_id for r in restarted.take(10, 0)] == [first[0].entry_id]


def test_bad_entries_go_to_dead_letters_and_the_consumer_goes_on(backend):
    buffer = backend.open()
    buffer.put(make_segment(0))
    backend.add_raw({"segment_id": b"garbage-1", "data": b"not a segment"})
    backend.add_raw({"something": b"else"})
    backend.add_raw({"segment_id": b"other-id", "data": encode_segment(make_segment(1))})
    buffer.put(make_segment(2))

    received = buffer.take(10, 1.0)
    assert ids_of(received) == ["run-srv-0-0", "run-srv-2-0"]
    assert buffer.dead_letters() == 3
    errors = " | ".join(backend.dead_letter_errors())
    assert "SegmentDecodeError: header length" in errors
    assert "lacks the field(s) ['segment_id', 'data']" in errors
    assert "differs from the encoded segment's 'run-srv-1-0'" in errors
    assert buffer.pending() == 2  # dead letters are acked, so they do not come back
    buffer.ack([r.entry_id for r in received])

    buffer.put(make_segment(3))
    assert ids_of(buffer.take(10, 1.0)) == ["run-srv-3-0"]


def test_blocking_take_times_out_empty(backend):
    buffer = backend.open()
    start = time.monotonic()
    assert buffer.take(5, timeout_s=0.3) == []
    assert 0.25 <= time.monotonic() - start < 2.0


def test_blocking_take_wakes_up_on_put(backend):
    consumer = backend.open()
    producer = backend.open(consumer="env-0")
    timer = threading.Timer(0.2, producer.put, args=(make_segment(0),))
    timer.start()
    start = time.monotonic()
    received = consumer.take(5, timeout_s=10.0)
    timer.join()
    assert ids_of(received) == ["run-srv-0-0"]
    assert time.monotonic() - start < 5.0


def test_concurrent_producers(backend):
    producers = [backend.open(consumer=f"env-{p}") for p in range(4)]

    def produce(n: int) -> None:
        for i in range(5):
            producers[n].put(make_segment(i + 10 * n))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    consumer = backend.open()
    received = consumer.take(100, 1.0)
    assert sorted(ids_of(received)) == sorted(
        f"run-srv-{i + 10 * n}-0" for n in range(4) for i in range(5)
    )


def test_trimming_never_loses_unacked_entries(backend):
    buffer = backend.open(maxlen=2)
    entry_ids = [buffer.put(make_segment(i)) for i in range(6)]
    assert buffer.length() == 6  # nothing acked: nothing trimmed, though over maxlen

    received = buffer.take(3, 1.0)  # 3 delivered, 3 never delivered
    buffer.ack([received[0].entry_id])
    buffer.put(make_segment(6))
    assert buffer.length() == 6  # only the acked entry was trimmed
    buffer.close()

    restarted = backend.open(maxlen=2)
    rest = restarted.take(100, 1.0)
    assert [r.entry_id for r in rest][:2] == entry_ids[1:3]  # held ones first
    assert ids_of(rest) == [f"run-srv-{i}-0" for i in range(1, 7)]
    restarted.ack([r.entry_id for r in rest])
    restarted.put(make_segment(7))
    assert restarted.length() == 1  # everything acked is trimmed, the new entry stays
    assert ids_of(restarted.take(10, 1.0)) == ["run-srv-7-0"]


def test_lag_counts_what_the_group_has_not_been_handed(backend):
    """Consumer lag (vla_rl_buffer_consumer_lag): written but not yet taken; trimming acked
    entries below the group keeps it exact."""
    buffer = backend.open(maxlen=2)
    assert buffer.lag() == 0
    for i in range(5):
        buffer.put(make_segment(i))
    assert buffer.lag() == 5 and buffer.pending() == 0
    received = buffer.take(3, 1.0)
    assert buffer.lag() == 2 and buffer.pending() == 3
    buffer.ack([r.entry_id for r in received])
    buffer.put(make_segment(5))  # over maxlen: the three acked entries are trimmed
    assert buffer.length() == 3 and buffer.lag() == 3
    buffer.take(10, 1.0)
    assert buffer.lag() == 0


def test_ack_of_unknown_entry_is_harmless(backend):
    buffer = backend.open()
    entry_id = buffer.put(make_segment(0))
    other = backend.open(consumer="learner-1")
    received = buffer.take(1, 1.0)
    assert other.ack([received[0].entry_id]) == 1  # acked through an object that did not take it
    assert buffer.pending() == 0
    assert other.ack([entry_id]) == 0
    buffer.put(make_segment(0))
    assert buffer.take(1, 0.05) == []  # its segment id was still recorded as acked


def test_producers_create_no_group(backend):
    producer = backend.open(consumer="env-0", maxlen=1)
    for i in range(3):
        producer.put(make_segment(i))
    assert producer.length() == 3  # no group has read them yet, so none is trimmed
    consumer = backend.open()
    assert len(consumer.take(10, 0)) == 3  # a group created later reads from the start


@pytest.mark.parametrize("same_consumer", [True, False])
def test_pending_entry_deleted_from_the_stream_is_a_dead_letter(redis_url, same_consumer):
    buffer = RedisStreamsBuffer(redis_url, STREAM, GROUP, "learner-0", claim_idle_ms=0)
    buffer.put(make_segment(0))
    buffer.put(make_segment(1))
    held = buffer.take(10, 1.0)
    client = redis.Redis.from_url(redis_url)
    client.xdel(STREAM, held[0].entry_id)  # e.g. an operator's XTRIM MAXLEN
    client.close()
    buffer.close()

    consumer = "learner-0" if same_consumer else "learner-1"
    restarted = RedisStreamsBuffer(redis_url, STREAM, GROUP, consumer, claim_idle_ms=0)
    assert [r.entry_id for r in restarted.take(10, 0.5)] == [held[1].entry_id]
    assert restarted.dead_letters() == 1
    assert restarted.pending() == 1
    restarted.close()


# -- URLs and sharing between processes -------------------------------------------------------


def test_from_url(redis_url):
    with from_url(redis_url, stream=STREAM, consumer="c") as buffer:
        assert isinstance(buffer, RedisStreamsBuffer)
    with from_url("memory://", stream=STREAM, consumer="c") as buffer:
        assert isinstance(buffer, MemoryBuffer)
    with pytest.raises(ValueError, match="unknown buffer URL scheme 'kafka'"):
        from_url("kafka://host:9092")


def test_a_served_memory_buffer_always_needs_its_key(monkeypatch):
    """The store unpickles what clients send: no fixed key, not even on loopback (there was one,
    so any local process could run code in it). A server started without a key makes a random
    one; a client without it, or with another, is refused."""
    from multiprocessing import AuthenticationError

    monkeypatch.delenv("VLA_RL_BUFFER_AUTHKEY", raising=False)
    for host in ("127.0.0.1", "10.1.2.3"):
        with pytest.raises(ValueError, match="needs its secret key"):
            resolve_authkey(None, host)
    monkeypatch.setenv("VLA_RL_BUFFER_AUTHKEY", "secret")
    assert resolve_authkey(None, "10.1.2.3") == b"secret"
    monkeypatch.delenv("VLA_RL_BUFFER_AUTHKEY")

    with serve_memory_buffer() as server, serve_memory_buffer() as other:
        assert len(server.authkey) == 64 and server.authkey != other.authkey
        with pytest.raises(ValueError, match="needs its secret key"):
            from_url(server.url, stream=STREAM, consumer="c")
        with pytest.raises(AuthenticationError):
            from_url(server.url, stream=STREAM, consumer="c", authkey=other.authkey)
        with from_url(server.url, stream=STREAM, consumer="c", authkey=server.authkey) as buffer:
            buffer.put(make_segment(0))
            assert buffer.length() == 1


_PRODUCER = """
import sys
sys.path.insert(0, {test_dir!r})
from test_buffer import make_segment
from vla_rl.buffer import from_url
with from_url({url!r}, stream={stream!r}, consumer="env-0") as buffer:
    for i in range({count}):
        buffer.put(make_segment(i))
"""


def test_memory_buffer_shared_between_processes():
    count = 4
    with serve_memory_buffer(authkey="test-key") as server:
        assert server.url.startswith("memory://127.0.0.1:")
        consumer = from_url(server.url, stream=STREAM, consumer="learner-0", authkey="test-key")
        code = _PRODUCER.format(
            test_dir=str(Path(__file__).parent), url=server.url, stream=STREAM, count=count
        )
        env = dict(os.environ, VLA_RL_BUFFER_AUTHKEY="test-key")
        producer = subprocess.Popen([sys.executable, "-c", code], env=env)
        received = []
        deadline = time.monotonic() + 60
        while len(received) < count and time.monotonic() < deadline:
            received += consumer.take(count, timeout_s=1.0)
        assert producer.wait(timeout=60) == 0
        assert ids_of(received) == [f"run-srv-{i}-0" for i in range(count)]
        assert_same_segment(received[2].segment, make_segment(2))
        assert consumer.pending() == count
        consumer.ack([r.entry_id for r in received[:2]])
        consumer.close()

        restarted = from_url(server.url, stream=STREAM, consumer="learner-0", authkey="test-key")
        assert ids_of(restarted.take(10, 0)) == ["run-srv-2-0", "run-srv-3-0"]
        assert restarted.length() == count and restarted.dead_letters() == 0


def test_the_launcher_passes_its_memory_buffer_key_to_children_only(tmp_path, monkeypatch):
    """`vla-rl train` without Redis serves the in-memory store with a key of this run and hands
    it to every child through its environment (not its command line); the launcher's own
    environment keeps no copy."""
    from vla_rl.config import load_config
    from vla_rl.launch import Launch, run_summary, start_buffer

    monkeypatch.delenv("VLA_RL_BUFFER_AUTHKEY", raising=False)
    cfg = load_config(None, ["buffer.backend=memory"])
    launch = Launch(tmp_path)
    try:
        url = start_buffer(cfg, launch)
        assert "VLA_RL_BUFFER_AUTHKEY" not in os.environ
        code = _PRODUCER.format(
            test_dir=str(Path(__file__).parent), url=url, stream=STREAM, count=2
        )
        child = launch.start("producer", [sys.executable, "-c", code])
        assert child.proc.wait(timeout=60) == 0, child.log_path.read_text()
        assert launch.memory_server.authkey not in " ".join(child.proc.args)
        with from_url(url, stream=STREAM, consumer="c", authkey=launch.memory_server.authkey) as b:
            assert b.length() == 2
        # The run's summary reads the buffer from the launcher too, with the children's key
        # (it failed at the end of every Redis-less run on a lent GPU before).
        cfg.buffer.url, cfg.buffer.stream, cfg.rollout.addresses = url, STREAM, []
        summary = run_summary(cfg, [], launch.child_env)
        assert summary["buffer"]["length"] == 2
    finally:
        launch.stop()
