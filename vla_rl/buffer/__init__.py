"""Trajectory buffer between env servers and the learner: segments, the interface, two backends."""

from __future__ import annotations

from urllib.parse import urlsplit

from vla_rl.buffer.base import (
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_GROUP,
    DEFAULT_STREAM,
    Received,
    TrajectoryBuffer,
)
from vla_rl.buffer.memory import MemoryBuffer, MemoryBufferServer, serve_memory_buffer
from vla_rl.buffer.redis_streams import RedisStreamsBuffer
from vla_rl.buffer.segment import Segment, SegmentDecodeError, decode_segment, encode_segment

__all__ = [
    "MemoryBuffer",
    "MemoryBufferServer",
    "Received",
    "RedisStreamsBuffer",
    "Segment",
    "SegmentDecodeError",
    "TrajectoryBuffer",
    "decode_segment",
    "encode_segment",
    "from_url",
    "serve_memory_buffer",
]


def from_url(
    url: str,
    stream: str = DEFAULT_STREAM,
    group: str = DEFAULT_GROUP,
    consumer: str | None = None,
    maxlen: int | None = None,
    claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
    authkey: bytes | str | None = None,
) -> TrajectoryBuffer:
    """Open a buffer by URL.

    `redis://host:port/db` (also `rediss://`, `unix://`): Redis Streams. `memory://`: the store
    shared by this process. `memory://host:port`: a store served by `serve_memory_buffer`
    (`authkey`, else $VLA_RL_BUFFER_AUTHKEY: the server's key, always required).
    """
    scheme = urlsplit(url).scheme
    options = dict(
        stream=stream,
        group=group,
        consumer=consumer,
        maxlen=maxlen,
        claim_idle_ms=claim_idle_ms,
    )
    if scheme in ("redis", "rediss", "unix"):
        return RedisStreamsBuffer(url, **options)
    if scheme == "memory":
        if urlsplit(url).netloc:
            return MemoryBuffer.connect(url, authkey=authkey, **options)
        return MemoryBuffer(**options)
    raise ValueError(f"unknown buffer URL scheme {scheme!r} in {url!r}: use redis:// or memory://")
