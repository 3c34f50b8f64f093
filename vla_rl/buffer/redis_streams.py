"""Trajectory buffer on a Redis stream with a consumer group (at-least-once, see base.py).

Keys: `<stream>` holds entries {segment_id, data}; `<stream>:acked` is the set of acked segment
ids used to drop duplicates; `<stream>:dead` is the dead-letter stream.
"""

from __future__ import annotations

import logging

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from vla_rl import security
from vla_rl.buffer.base import (
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_GROUP,
    DEFAULT_STREAM,
    ConsumerGroupBuffer,
    RawEntry,
    default_consumer_name,
    next_entry_id,
    parse_entry_id,
)

log = logging.getLogger(__name__)


# A redis-server restarted by the launcher (AOF: nothing acknowledged is lost) takes a second or
# two to come back; commands retry meanwhile instead of failing the service. About 60 s in all.
_RECONNECT = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=35)


def redis_client(url: str, **options) -> redis.Redis:
    """A client for `url` that logs in as this process's Redis user (security.current(); a
    user or password written in the URL itself wins) and retries commands while the server is
    unreachable (a restart)."""
    options.setdefault("retry", _RECONNECT)
    options.setdefault("retry_on_error", [redis.ConnectionError, redis.TimeoutError])
    creds = security.current()
    if creds.redis_password is not None:
        options.setdefault("password", creds.redis_password)
        if creds.redis_username is not None:
            options.setdefault("username", creds.redis_username)
    return redis.Redis.from_url(url, **options)


class RedisStreamsBuffer(ConsumerGroupBuffer):
    """A `TrajectoryBuffer` on Redis Streams (Redis >= 6.2; 7 reports deleted pending entries)."""

    def __init__(
        self,
        url: str,
        stream: str = DEFAULT_STREAM,
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        maxlen: int | None = None,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        *,
        client: redis.Redis | None = None,
    ) -> None:
        super().__init__(
            stream=stream,
            group=group,
            consumer=consumer or default_consumer_name(),
            maxlen=maxlen,
            claim_idle_ms=claim_idle_ms,
        )
        self._redis = client if client is not None else redis_client(url)
        self._acked_key = f"{stream}:acked"
        self._dead_key = f"{stream}:dead"

    def length(self) -> int:
        return int(self._redis.xlen(self.stream))

    def dead_letters(self) -> int:
        return int(self._redis.xlen(self._dead_key))

    def acknowledged(self) -> int:
        return int(self._redis.scard(self._acked_key))

    def close(self) -> None:
        self._redis.close()

    # -- primitives -------------------------------------------------------------------------

    def _create_group(self) -> None:
        try:
            self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _pending_count(self) -> int:
        return int(self._redis.xpending(self.stream, self.group)["pending"])

    def _lag(self) -> int | None:
        # XINFO GROUPS' lag (Redis 7+) is computed from the stream's entries-added counter, so
        # trimming acked entries below the group keeps it exact; Redis answers nil when it
        # cannot tell (an XDEL inside the unread range) and older servers have no such field.
        for info in self._redis.xinfo_groups(self.stream):
            if _str(info["name"]) == self.group:
                lag = info.get("lag")
                return None if lag is None else int(lag)
        return None

    def _add(self, fields: dict[str, bytes]) -> str:
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self.stream, fields)
        pipe.xlen(self.stream)
        entry_id, length = pipe.execute()
        if self.maxlen is not None and length > self.maxlen:
            self._trim_acked()
        return _str(entry_id)

    def _trim_acked(self) -> None:
        # Not XADD MAXLEN: that drops the oldest entries whether acked or not. MINID at the
        # oldest unacked entry of any group drops only acked ones. The floor is read before it
        # is applied, but a group's floor only ever rises, so an old floor is still safe.
        floors = []
        for info in self._redis.xinfo_groups(self.stream):
            floor = next_entry_id(_str(info["last-delivered-id"]))
            if info["pending"]:
                oldest = self._redis.xpending(self.stream, info["name"])["min"]
                if oldest is not None:
                    floor = min(floor, _str(oldest), key=parse_entry_id)
            floors.append(floor)
        if not floors:
            return
        floor = min(floors, key=parse_entry_id)
        trimmed = self._redis.xtrim(self.stream, minid=floor, approximate=False)
        if trimmed:
            log.debug("trimmed %d acked entries below %s from %s", trimmed, floor, self.stream)

    def _read_own_pending(self, after_id: str, count: int) -> list[RawEntry]:
        reply = self._redis.xreadgroup(
            self.group, self.consumer, {self.stream: after_id}, count=count
        )
        return _stream_entries(reply)

    def _read_new(self, count: int, block_s: float | None) -> list[RawEntry]:
        block_ms = None if block_s is None else max(1, round(block_s * 1000))
        reply = self._redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        return _stream_entries(reply)

    def _autoclaim(self, cursor: str, count: int) -> tuple[str, list[RawEntry], list[str]]:
        reply = self._redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=cursor,
            count=count,
        )
        deleted = [_str(e) for e in reply[2]] if len(reply) > 2 else []
        return _str(reply[0]), [_entry(e) for e in reply[1]], deleted

    def _acked_mask(self, segment_ids: list[str]) -> list[bool]:
        return [bool(x) for x in self._redis.smismember(self._acked_key, segment_ids)]

    def _ack_entries(self, entry_ids: list[str], segment_ids: list[str]) -> int:
        pipe = self._redis.pipeline(transaction=True)
        if segment_ids:
            pipe.sadd(self._acked_key, *segment_ids)
        pipe.xack(self.stream, self.group, *entry_ids)
        replies = pipe.execute()
        if segment_ids and replies[0] < len(set(segment_ids)):
            # Two consumers used copies of one segment (or one was claimed while in use).
            log.warning("acked segment ids of which some had been acked before: %s", segment_ids)
        return int(replies[-1])

    def _segment_ids_of(self, entry_ids: list[str]) -> dict[str, str]:
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xrange(self.stream, entry_id, entry_id)
        found = {}
        for entry_id, reply in zip(entry_ids, pipe.execute(), strict=True):
            if reply and reply[0][1] and b"segment_id" in reply[0][1]:
                found[entry_id] = reply[0][1][b"segment_id"].decode("utf-8", "replace")
        return found

    def _dead_letter(self, entry_id: str, fields: dict[str, bytes], error: str) -> None:
        record = {"entry_id": entry_id, "error": error}
        record.update({f"field:{k}": v for k, v in fields.items()})
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(self._dead_key, record)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(item: tuple) -> RawEntry:
    entry_id, fields = item
    return _str(entry_id), {_str_lenient(k): v for k, v in (fields or {}).items()}


def _str_lenient(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _stream_entries(reply: list | None) -> list[RawEntry]:
    """Entries of the one stream in an XREADGROUP reply ([[stream, entries]], RESP2)."""
    return [_entry(item) for _, entries in reply or [] for item in entries]
