"""Trajectory buffer kept in memory, with the Redis backend's semantics, for runs without Redis.

`MemoryStreamStore` models the few Redis Streams commands the buffer needs. By default every
`MemoryBuffer` of a process shares one store (as they would share one Redis); `serve_memory_buffer`
hosts a store in its own process so separately launched env servers and learners can share it
through `memory://host:port` URLs.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import multiprocessing
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.managers import BaseManager
from urllib.parse import urlsplit

from vla_rl.buffer.base import (
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_GROUP,
    DEFAULT_STREAM,
    ConsumerGroupBuffer,
    RawEntry,
    default_consumer_name,
    parse_entry_id,
)

log = logging.getLogger(__name__)

AUTHKEY_ENV = "VLA_RL_BUFFER_AUTHKEY"
"""Environment variable with the key a buffer server and its clients share. A manager unpickles
what clients send, so the key is what stands between any local process and running code in the
store: there is no fixed default key (there was one for loopback), `serve_memory_buffer` makes a
random one when none is given."""

EntryId = tuple[int, int]


def _format_id(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


@dataclass
class _Delivery:
    consumer: str
    delivered_at: float


@dataclass
class _Group:
    last_delivered: EntryId = (0, 0)
    pending: dict[EntryId, _Delivery] = field(default_factory=dict)


@dataclass
class _Stream:
    ids: list[EntryId] = field(default_factory=list)  # ascending; trimming removes a prefix
    entries: dict[EntryId, dict[str, bytes]] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    dead: list[dict] = field(default_factory=list)
    last_id: EntryId = (0, 0)


class MemoryStreamStore:
    """Streams, consumer groups, acked-id sets and dead letters behind one lock.

    Method names follow the Redis commands they stand in for; all take the stream name so one
    store serves many streams.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._streams: dict[str, _Stream] = {}

    def create_group(self, stream: str, group: str) -> None:
        with self._cond:
            self._stream(stream).groups.setdefault(group, _Group())

    def add(self, stream: str, fields: dict[str, bytes], maxlen: int | None) -> str:
        with self._cond:
            s = self._stream(stream)
            ms = time.time_ns() // 1_000_000
            s.last_id = (ms, 0) if ms > s.last_id[0] else (s.last_id[0], s.last_id[1] + 1)
            s.ids.append(s.last_id)
            s.entries[s.last_id] = dict(fields)
            if maxlen is not None and len(s.ids) > maxlen:
                self._trim_acked(s)
            self._cond.notify_all()
            return _format_id(s.last_id)

    def read_new(
        self, stream: str, group: str, consumer: str, count: int, block_s: float | None
    ) -> list[RawEntry]:
        with self._cond:
            s = self._stream(stream)
            g = self._group(s, group)
            deadline = time.monotonic() + (block_s or 0.0)
            while True:
                start = bisect.bisect_right(s.ids, g.last_delivered)
                if start < len(s.ids):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            now = time.monotonic()
            delivered = s.ids[start : start + count]
            for entry_id in delivered:
                g.pending[entry_id] = _Delivery(consumer, now)
            g.last_delivered = delivered[-1]
            return [(_format_id(e), dict(s.entries[e])) for e in delivered]

    def read_pending(
        self, stream: str, group: str, consumer: str, after_id: str, count: int
    ) -> list[RawEntry]:
        with self._cond:
            s = self._stream(stream)
            g = self._group(s, group)
            after = parse_entry_id(after_id)
            mine = sorted(e for e, d in g.pending.items() if d.consumer == consumer and e > after)
            now = time.monotonic()
            out = []
            for entry_id in mine[:count]:
                g.pending[entry_id].delivered_at = now
                out.append((_format_id(entry_id), dict(s.entries.get(entry_id, {}))))
            return out

    def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[RawEntry], list[str]]:
        with self._cond:
            s = self._stream(stream)
            g = self._group(s, group)
            start = parse_entry_id(cursor)
            now = time.monotonic()
            claimed: list[RawEntry] = []
            deleted: list[str] = []
            for entry_id in sorted(e for e in g.pending if e >= start):
                if len(claimed) >= count:
                    return _format_id(entry_id), claimed, deleted
                delivery = g.pending[entry_id]
                if entry_id not in s.entries:
                    del g.pending[entry_id]
                    deleted.append(_format_id(entry_id))
                elif (now - delivery.delivered_at) * 1000 >= min_idle_ms:
                    g.pending[entry_id] = _Delivery(consumer, now)
                    claimed.append((_format_id(entry_id), dict(s.entries[entry_id])))
            return "0-0", claimed, deleted

    def acked_count(self, stream: str) -> int:
        with self._cond:
            return len(self._stream(stream).acked)

    def acked_mask(self, stream: str, segment_ids: list[str]) -> list[bool]:
        with self._cond:
            acked = self._stream(stream).acked
            return [seg in acked for seg in segment_ids]

    def ack(self, stream: str, group: str, entry_ids: list[str], segment_ids: list[str]) -> int:
        with self._cond:
            s = self._stream(stream)
            g = self._group(s, group)
            if len(s.acked & set(segment_ids)):
                log.warning(
                    "acked segment ids of which some had been acked before: %s", segment_ids
                )
            s.acked.update(segment_ids)
            return sum(g.pending.pop(parse_entry_id(e), None) is not None for e in entry_ids)

    def segment_ids_of(self, stream: str, entry_ids: list[str]) -> dict[str, str]:
        with self._cond:
            entries = self._stream(stream).entries
            found = {}
            for entry_id in entry_ids:
                fields = entries.get(parse_entry_id(entry_id), {})
                if "segment_id" in fields:
                    found[entry_id] = fields["segment_id"].decode("utf-8", "replace")
            return found

    def dead_letter(
        self, stream: str, group: str, entry_id: str, fields: dict[str, bytes], error: str
    ) -> None:
        with self._cond:
            s = self._stream(stream)
            s.dead.append({"entry_id": entry_id, "error": error, "fields": dict(fields)})
            self._group(s, group).pending.pop(parse_entry_id(entry_id), None)

    def dead_letter_records(self, stream: str) -> list[dict]:
        """Copies of the dead letters: {"entry_id", "error", "fields"}."""
        with self._cond:
            return [dict(r) for r in self._stream(stream).dead]

    def pending_count(self, stream: str, group: str) -> int:
        with self._cond:
            return len(self._group(self._stream(stream), group).pending)

    def length(self, stream: str) -> int:
        with self._cond:
            return len(self._stream(stream).ids)

    def lag(self, stream: str, group: str) -> int:
        """Entries after the group's last delivered one."""
        with self._cond:
            s = self._stream(stream)
            return len(s.ids) - bisect.bisect_right(s.ids, self._group(s, group).last_delivered)

    def dead_letter_count(self, stream: str) -> int:
        with self._cond:
            return len(self._stream(stream).dead)

    def _stream(self, name: str) -> _Stream:
        return self._streams.setdefault(name, _Stream())

    @staticmethod
    def _group(s: _Stream, name: str) -> _Group:
        if name not in s.groups:
            raise KeyError(f"no consumer group {name!r}")
        return s.groups[name]

    @staticmethod
    def _trim_acked(s: _Stream) -> None:
        # Same rule as the Redis backend: drop only what every group has acked.
        if not s.groups:
            return
        floor = min(
            min([*g.pending, (g.last_delivered[0], g.last_delivered[1] + 1)])
            for g in s.groups.values()
        )
        cut = bisect.bisect_left(s.ids, floor)
        for entry_id in s.ids[:cut]:
            del s.entries[entry_id]
        del s.ids[:cut]


_PROCESS_STORE: MemoryStreamStore | None = None
_PROCESS_STORE_LOCK = threading.Lock()


def process_store() -> MemoryStreamStore:
    """The store that `MemoryBuffer`s of this process share unless given another."""
    global _PROCESS_STORE
    with _PROCESS_STORE_LOCK:
        if _PROCESS_STORE is None:
            _PROCESS_STORE = MemoryStreamStore()
        return _PROCESS_STORE


class MemoryBuffer(ConsumerGroupBuffer):
    """A `TrajectoryBuffer` on a `MemoryStreamStore`, local or served by another process."""

    def __init__(
        self,
        stream: str = DEFAULT_STREAM,
        group: str = DEFAULT_GROUP,
        consumer: str | None = None,
        maxlen: int | None = None,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        *,
        store: MemoryStreamStore | None = None,
    ) -> None:
        super().__init__(
            stream=stream,
            group=group,
            consumer=consumer or default_consumer_name(),
            maxlen=maxlen,
            claim_idle_ms=claim_idle_ms,
        )
        self.store = store if store is not None else process_store()

    @classmethod
    def connect(
        cls,
        address: tuple[str, int] | str,
        authkey: bytes | str | None = None,
        **kwargs,
    ) -> MemoryBuffer:
        """A buffer on the store served at `address` (`host:port`, `memory://host:port`)."""
        host, port = parse_address(address)
        manager = _StoreManager(address=(host, port), authkey=resolve_authkey(authkey, host))
        manager.connect()
        return cls(store=manager.store(), **kwargs)

    def length(self) -> int:
        return self.store.length(self.stream)

    def dead_letters(self) -> int:
        return self.store.dead_letter_count(self.stream)

    def acknowledged(self) -> int:
        return self.store.acked_count(self.stream)

    def close(self) -> None:
        pass

    def _create_group(self) -> None:
        self.store.create_group(self.stream, self.group)

    def _pending_count(self) -> int:
        return self.store.pending_count(self.stream, self.group)

    def _lag(self) -> int | None:
        return self.store.lag(self.stream, self.group)

    def _add(self, fields: dict[str, bytes]) -> str:
        return self.store.add(self.stream, fields, self.maxlen)

    def _read_own_pending(self, after_id: str, count: int) -> list[RawEntry]:
        return self.store.read_pending(self.stream, self.group, self.consumer, after_id, count)

    def _read_new(self, count: int, block_s: float | None) -> list[RawEntry]:
        return self.store.read_new(self.stream, self.group, self.consumer, count, block_s)

    def _autoclaim(self, cursor: str, count: int) -> tuple[str, list[RawEntry], list[str]]:
        return self.store.autoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, cursor, count
        )

    def _acked_mask(self, segment_ids: list[str]) -> list[bool]:
        return self.store.acked_mask(self.stream, segment_ids)

    def _ack_entries(self, entry_ids: list[str], segment_ids: list[str]) -> int:
        return self.store.ack(self.stream, self.group, entry_ids, segment_ids)

    def _segment_ids_of(self, entry_ids: list[str]) -> dict[str, str]:
        return self.store.segment_ids_of(self.stream, entry_ids)

    def _dead_letter(self, entry_id: str, fields: dict[str, bytes], error: str) -> None:
        self.store.dead_letter(self.stream, self.group, entry_id, fields, error)


# -- sharing a store between processes --------------------------------------------------------


class _StoreManager(BaseManager):
    pass


_StoreManager.register("store", callable=process_store)


def parse_address(address: tuple[str, int] | str) -> tuple[str, int]:
    """`(host, port)`, `"host:port"` or `"memory://host:port"` -> (host, port)."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    parts = urlsplit(address if "://" in address else f"memory://{address}")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"buffer address {address!r} must name a host and a port")
    return parts.hostname, parts.port


def resolve_authkey(authkey: bytes | str | None, host: str) -> bytes:
    """The given key, else $VLA_RL_BUFFER_AUTHKEY; ValueError when there is neither."""
    if authkey is None:
        authkey = os.environ.get(AUTHKEY_ENV) or None
    if authkey is None:
        raise ValueError(
            f"the memory buffer on {host!r} needs its secret key: pass authkey or set {AUTHKEY_ENV}"
        )
    return authkey.encode() if isinstance(authkey, str) else authkey


class MemoryBufferServer:
    """A store served by a child process; `url` is what clients pass to `from_url`."""

    def __init__(self, manager: _StoreManager, authkey: str) -> None:
        self._manager = manager
        self.authkey = authkey
        """The key clients need (pass it as authkey or in $VLA_RL_BUFFER_AUTHKEY)."""
        host, port = manager.address
        self.address: tuple[str, int] = (host, port)
        self.url = f"memory://{host}:{port}"

    def shutdown(self) -> None:
        """Stop the server process; the buffered entries are gone."""
        self._manager.shutdown()

    def __enter__(self) -> MemoryBufferServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve_memory_buffer(
    address: tuple[str, int] | str = ("127.0.0.1", 0),
    authkey: bytes | str | None = None,
) -> MemoryBufferServer:
    """Start a child process that serves a store at `address` (port 0: any free port). Without
    `authkey` (or $VLA_RL_BUFFER_AUTHKEY) the store gets a random key: `server.authkey`."""
    host, port = parse_address(address)
    if authkey is None:
        authkey = os.environ.get(AUTHKEY_ENV) or secrets.token_hex(32)
    key = authkey.decode() if isinstance(authkey, bytes) else authkey
    manager = _StoreManager(
        address=(host, port),
        authkey=resolve_authkey(key, host),
        ctx=multiprocessing.get_context("spawn"),
    )
    manager.start()
    log.info("memory buffer served at memory://%s:%d", *manager.address)
    return MemoryBufferServer(manager, key)


def run_memory_buffer_server(
    address: tuple[str, int] | str, authkey: bytes | str | None = None
) -> None:
    """Serve a store from this process until it is killed (a buffer service of its own)."""
    host, port = parse_address(address)
    manager = _StoreManager(address=(host, port), authkey=resolve_authkey(authkey, host))
    server = manager.get_server()
    log.info("memory buffer served at memory://%s:%d", *server.address)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an in-memory trajectory buffer.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6380)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    run_memory_buffer_server((args.host, args.port))


if __name__ == "__main__":
    main()
