"""The trajectory buffer interface and the consumer-group logic its backends share.

Backends (Redis Streams, in-memory) only provide stream primitives shaped like Redis commands;
delivery semantics live once, here, in `ConsumerGroupBuffer`:

- at-least-once: an entry stays pending until `ack`, which the learner calls only after the
  update that used it is committed; a restarted consumer gets its own pending entries back at
  once, and any consumer claims another's entries once they have been idle `claim_idle_ms`;
- duplicates by `segment_id` are dropped: a segment id acked once is never handed out again, nor
  is a second copy of a segment this consumer holds unacked;
- an entry that does not decode goes to a dead-letter stream with its error and is acked; the
  consumer logs it and goes on.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from vla_rl.buffer.segment import Segment, decode_segment, encode_segment

log = logging.getLogger(__name__)

RawEntry = tuple[str, dict[str, bytes]]
"""(entry id, fields) as read from a stream; empty fields mean the entry was deleted."""

_FIELD_SEGMENT_ID = "segment_id"
_FIELD_DATA = "data"
DEFAULT_STREAM = "vla_rl:segments"
DEFAULT_GROUP = "learner"
DEFAULT_CLAIM_IDLE_MS = 120_000
"""Longer than any update, or a live consumer's entries are claimed and used twice."""
# Idle entries are looked for every claim_idle_ms / 2, but not more often than this.
_MIN_CLAIM_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Received:
    """A segment handed to a consumer, with the entry id to `ack` once it has been used."""

    entry_id: str
    segment: Segment


class TrajectoryBuffer(ABC):
    """A durable queue of trajectory segments between env servers and a learner."""

    @abstractmethod
    def put(self, segment: Segment) -> str:
        """Validate, encode and append `segment`; return its entry id."""

    @abstractmethod
    def take(self, count: int, timeout_s: float) -> list[Received]:
        """Return up to `count` segments for this consumer, blocking up to `timeout_s` for the first.

        Returns early with what is there as soon as anything is; an empty list after the timeout.
        """

    @abstractmethod
    def ack(self, entry_ids: Iterable[str]) -> int:
        """Mark entries as used; call only after the update that used them is committed.

        Ack everything taken, including segments the learner chose to discard: unacked entries
        are redelivered and are never trimmed. Returns how many entries were newly acked.
        """

    @abstractmethod
    def reject(self, received: Received, reason: str) -> None:
        """Move a taken segment the consumer refuses to use (a policy version that was never
        published, ...) to the dead-letter stream with `reason`; it counts as acked."""

    @abstractmethod
    def pending(self) -> int:
        """Entries delivered to this consumer group and not yet acked (all its consumers)."""

    @abstractmethod
    def lag(self) -> int | None:
        """Entries added to the stream that this consumer group has not been handed yet: the
        backlog the learner has not read (pending() counts what it read and has not acked).
        None where the backend cannot tell (Redis after an XDEL inside the unread range)."""

    @abstractmethod
    def length(self) -> int:
        """Entries stored in the stream, acked ones included until they are trimmed."""

    @abstractmethod
    def dead_letters(self) -> int:
        """Entries moved to the dead-letter stream because they could not be used."""

    @abstractmethod
    def acknowledged(self) -> int:
        """Distinct segment ids acked so far (they are never handed out again)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; stored entries stay."""

    def __enter__(self) -> TrajectoryBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_consumer_name() -> str:
    """The host name: stable across restarts of a pod or process, so pending entries come back."""
    return socket.gethostname()


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """`"<ms>-<seq>"` -> (ms, seq), ordered like Redis orders stream ids."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_entry_id(entry_id: str) -> str:
    """The smallest id greater than `entry_id`."""
    ms, seq = parse_entry_id(entry_id)
    return f"{ms}-{seq + 1}"


class ConsumerGroupBuffer(TrajectoryBuffer):
    """Delivery semantics over Redis-Streams-like primitives that a backend implements.

    The consumer group is created (reading from the stream's start) by the first take, ack or
    pending call, so producers and consumers may start in any order.

    Trimming, when `maxlen` is set: once the stream holds more than `maxlen` entries, every entry
    that all consumer groups have acked is trimmed (those below the oldest unacked one). Unacked
    entries, delivered or not, are never trimmed, so while the learner lags the stream may hold
    more than `maxlen`; before any group exists nothing is trimmed. `maxlen=None` keeps every
    entry.
    """

    def __init__(
        self,
        *,
        stream: str,
        group: str,
        consumer: str,
        maxlen: int | None,
        claim_idle_ms: int,
    ) -> None:
        if not stream or not group or not consumer:
            raise ValueError("stream, group and consumer names must not be empty")
        if maxlen is not None and maxlen < 0:
            raise ValueError(f"maxlen must be >= 0 or None, got {maxlen}")
        if claim_idle_ms < 0:
            raise ValueError(f"claim_idle_ms must be >= 0, got {claim_idle_ms}")
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.maxlen = maxlen
        self.claim_idle_ms = claim_idle_ms
        self.duplicates_dropped = 0
        """Entries acked without being handed out because their segment id was a duplicate."""

        self._take_lock = threading.Lock()
        self._state_lock = threading.Lock()
        # Handed out by this object and not yet acked: entry id -> segment id, and back.
        self._inflight: dict[str, str] = {}
        self._inflight_segments: dict[str, str] = {}
        # This consumer name's pending entries from before a restart are read once, first.
        self._history_cursor: str | None = "0-0"
        self._claim_cursor = "0-0"
        self._next_claim_at = 0.0
        self._group_created = False

    # -- primitives a backend provides ------------------------------------------------------

    @abstractmethod
    def _create_group(self) -> None:
        """Create the stream and the group reading from its start, unless the group exists."""

    @abstractmethod
    def _pending_count(self) -> int:
        """Entries pending in the group."""

    @abstractmethod
    def _add(self, fields: dict[str, bytes]) -> str:
        """Append an entry and, when `maxlen` is exceeded, trim the acked prefix."""

    @abstractmethod
    def _read_own_pending(self, after_id: str, count: int) -> list[RawEntry]:
        """Entries pending for this consumer name with id > `after_id`, in id order."""

    @abstractmethod
    def _autoclaim(self, cursor: str, count: int) -> tuple[str, list[RawEntry], list[str]]:
        """Claim up to `count` pending entries idle >= claim_idle_ms, scanning from `cursor`.

        Returns (next cursor, "0-0" when the scan is complete; claimed entries; ids of pending
        entries whose payload had been deleted, which the claim drops from the pending list).
        """

    @abstractmethod
    def _read_new(self, count: int, block_s: float | None) -> list[RawEntry]:
        """Deliver up to `count` never-delivered entries, waiting up to `block_s` (None: no wait)."""

    @abstractmethod
    def _acked_mask(self, segment_ids: list[str]) -> list[bool]:
        """For each segment id, whether it has been acked before."""

    @abstractmethod
    def _lag(self) -> int | None:
        """Entries after the group's last delivered one (None: unknown)."""

    @abstractmethod
    def _ack_entries(self, entry_ids: list[str], segment_ids: list[str]) -> int:
        """Atomically ack the entries and record the segment ids as acked."""

    @abstractmethod
    def _segment_ids_of(self, entry_ids: list[str]) -> dict[str, str]:
        """Segment ids of stored entries, for acks of entries this object did not hand out."""

    @abstractmethod
    def _dead_letter(self, entry_id: str, fields: dict[str, bytes], error: str) -> None:
        """Atomically copy the entry with its error to the dead-letter stream and ack it."""

    # -- the interface ----------------------------------------------------------------------

    def pending(self) -> int:
        self._ensure_group()
        return self._pending_count()

    def lag(self) -> int | None:
        self._ensure_group()
        return self._lag()

    def put(self, segment: Segment) -> str:
        data = encode_segment(segment)
        return self._add({_FIELD_SEGMENT_ID: segment.segment_id.encode(), _FIELD_DATA: data})

    def take(self, count: int, timeout_s: float) -> list[Received]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        deadline = time.monotonic() + max(0.0, timeout_s)
        out: list[Received] = []
        self._ensure_group()
        with self._take_lock:
            while self._history_cursor is not None and len(out) < count:
                raw = self._read_own_pending(self._history_cursor, count - len(out))
                if not raw:
                    self._history_cursor = None
                    break
                self._history_cursor = raw[-1][0]
                out += self._accept(raw)

            while len(out) < count:
                if time.monotonic() >= self._next_claim_at:
                    out += self._reclaim(count - len(out))
                    if len(out) >= count:
                        break
                now = time.monotonic()
                want = count - len(out)
                if out or now >= deadline:
                    block_s = None
                else:
                    # Wake up for the next reclaim scan even while nothing new arrives.
                    block_s = max(0.001, min(deadline, self._next_claim_at) - now)
                raw = self._read_new(want, block_s)
                if raw:
                    out += self._accept(raw)
                    if out and len(raw) < want:
                        break
                elif out or time.monotonic() >= deadline:
                    break
        return out

    def ack(self, entry_ids: Iterable[str]) -> int:
        ids = list(dict.fromkeys(entry_ids))
        if not ids:
            return 0
        self._ensure_group()
        with self._state_lock:
            segment_ids = {e: self._inflight[e] for e in ids if e in self._inflight}
        unknown = [e for e in ids if e not in segment_ids]
        if unknown:
            found = self._segment_ids_of(unknown)
            for e in unknown:
                if e not in found:
                    log.warning("ack of entry %s of which no segment id is known", e)
            segment_ids.update(found)
        acked = self._ack_entries(ids, list(segment_ids.values()))
        with self._state_lock:
            for e in ids:
                seg = self._inflight.pop(e, None)
                if seg is not None and self._inflight_segments.get(seg) == e:
                    del self._inflight_segments[seg]
        return acked

    def reject(self, received: Received, reason: str) -> None:
        self._ensure_group()
        fields = {
            _FIELD_SEGMENT_ID: received.segment.segment_id.encode(),
            _FIELD_DATA: encode_segment(received.segment),
        }
        self._reject(received.entry_id, fields, reason)
        with self._state_lock:
            seg = self._inflight.pop(received.entry_id, None)
            if seg is not None and self._inflight_segments.get(seg) == received.entry_id:
                del self._inflight_segments[seg]

    # -- shared logic -----------------------------------------------------------------------

    def _ensure_group(self) -> None:
        # Only consumers create the group: a group nobody reads (a producer's typo) would hold
        # back trimming forever, and without a group entries are kept until one reads them.
        if not self._group_created:
            self._create_group()
            self._group_created = True

    def _reclaim(self, count: int) -> list[Received]:
        out: list[Received] = []
        while len(out) < count:
            cursor, raw, deleted = self._autoclaim(self._claim_cursor, count - len(out))
            for entry_id in deleted:
                self._reject(entry_id, {}, "entry was deleted from the stream before its ack")
            out += self._accept(raw)
            self._claim_cursor = cursor
            if cursor == "0-0":
                interval_s = max(_MIN_CLAIM_INTERVAL_S, self.claim_idle_ms / 2000)
                self._next_claim_at = time.monotonic() + interval_s
                break
        return out

    def _accept(self, raw: list[RawEntry]) -> list[Received]:
        """Turn read entries into Received, dropping duplicates and dead-lettering bad ones."""
        candidates: list[tuple[str, str, dict[str, bytes]]] = []
        for entry_id, fields in raw:
            with self._state_lock:
                if entry_id in self._inflight:  # already handed out by this object
                    continue
            if not fields:
                self._reject(entry_id, {}, "entry was deleted from the stream before its ack")
                continue
            missing = [k for k in (_FIELD_SEGMENT_ID, _FIELD_DATA) if k not in fields]
            if missing:
                self._reject(entry_id, fields, f"entry lacks the field(s) {missing}")
                continue
            try:
                segment_id = fields[_FIELD_SEGMENT_ID].decode("utf-8")
            except UnicodeDecodeError as e:
                self._reject(entry_id, fields, f"segment_id is not UTF-8: {e}")
                continue
            candidates.append((entry_id, segment_id, fields))
        if not candidates:
            return []

        acked_before = self._acked_mask([seg for _, seg, _ in candidates])
        duplicates: list[str] = []
        out: list[Received] = []
        for (entry_id, segment_id, fields), was_acked in zip(candidates, acked_before, strict=True):
            with self._state_lock:
                held = segment_id in self._inflight_segments
            if was_acked or held:
                # Safe to ack now: the segment was committed, or the copy this consumer holds
                # stays pending until it is.
                duplicates.append(entry_id)
                continue
            try:
                segment = decode_segment(fields[_FIELD_DATA])
            except Exception as e:  # never let one bad entry stop the consumer
                self._reject(entry_id, fields, f"{type(e).__name__}: {e}")
                continue
            if segment.segment_id != segment_id:
                self._reject(
                    entry_id,
                    fields,
                    f"segment_id field {segment_id!r} differs from the encoded segment's "
                    f"{segment.segment_id!r}",
                )
                continue
            with self._state_lock:
                self._inflight[entry_id] = segment_id
                self._inflight_segments[segment_id] = entry_id
            out.append(Received(entry_id, segment))
        if duplicates:
            self._ack_entries(duplicates, [])
            self.duplicates_dropped += len(duplicates)
            log.info("dropped %d duplicate segment entries: %s", len(duplicates), duplicates)
        return out

    def _reject(self, entry_id: str, fields: dict[str, bytes], error: str) -> None:
        log.error("stream %s entry %s moved to dead letters: %s", self.stream, entry_id, error)
        self._dead_letter(entry_id, fields, error)
