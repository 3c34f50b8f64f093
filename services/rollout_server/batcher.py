"""Dynamic batching: concurrent Act calls from several env servers share one engine forward.

A worker thread takes the first waiting request, then gathers more with the same sampling
settings until `max_batch_size` observations or `max_wait_ms` have passed, runs the engine once
and hands each caller its rows. Requests with a seed run alone so their samples are reproducible.

Read-only statistics: `batch_sizes` (observations per engine call, the latest 1024) and
`most_requests_merged` (the most requests one engine call has served), which is also logged each
time it grows, so a server's log shows whether concurrent callers really share forwards.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .engines.base import Engine, EngineOutput

log = logging.getLogger("vla_rl.rollout_server")

MAX_VERSION_RETRIES = 3


@dataclass
class _Request:
    images: np.ndarray
    instructions: list[str]
    temperature: float
    top_k: int
    greedy: bool
    seed: int | None
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        return (self.temperature, self.top_k, self.greedy)


class DynamicBatcher:
    def __init__(self, engine: Engine, max_batch_size: int, max_wait_ms: float) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._held: list[_Request] = []  # taken from the queue but not batchable with the last one
        # Observations per engine call, the latest ones (for metrics and tests).
        self.batch_sizes: deque[int] = deque(maxlen=1024)
        self.most_requests_merged = 0  # the most requests one engine call has served
        self._thread = threading.Thread(target=self._run, name="dynamic-batcher", daemon=True)
        self._stopped = False
        self._thread.start()

    def submit(
        self,
        images: np.ndarray,
        instructions: list[str],
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        seed: int | None = None,
    ) -> Future:
        """Queue a validated request; the future resolves to its EngineOutput."""
        if self._stopped:
            raise RuntimeError("the batcher is stopped")
        req = _Request(images, list(instructions), float(temperature), int(top_k), greedy, seed)
        self._queue.put(req)
        return req.future

    def queue_depth(self) -> int:
        """Requests waiting for the engine (queued, or taken and held for a later batch)."""
        return self._queue.qsize() + len(self._held)

    def close(self) -> None:
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> _Request | None:
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout)

    def _gather(self, first: _Request) -> list[_Request]:
        batch, size = [first], len(first.instructions)
        if first.seed is not None:
            return batch
        # Requests held back earlier (other sampling settings) join first. Without this, greedy
        # evaluation requests arriving beside sampled training ones left every held training
        # request to run alone, one engine call each: on an H200, collection took 47-54 s instead
        # of 6 s while an evaluation ran.
        kept: list[_Request] = []
        for req in self._held:
            n = len(req.instructions)
            if req.key == first.key and req.seed is None and size + n <= self.max_batch_size:
                batch.append(req)
                size += n
            else:
                kept.append(req)
        self._held = kept
        deadline = time.monotonic() + self.max_wait_s
        skipped: list[_Request] = []
        while size < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                req = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if req is None:  # close() sentinel: put it back for the main loop
                self._queue.put(None)
                break
            n = len(req.instructions)
            if req.key != first.key or req.seed is not None or size + n > self.max_batch_size:
                skipped.append(req)
                continue
            batch.append(req)
            size += n
        self._held.extend(skipped)
        return batch

    def _run(self) -> None:
        while True:
            first = self._next(timeout=None)
            if first is None:
                for req in self._held:
                    req.future.set_exception(RuntimeError("the rollout server is shutting down"))
                return
            batch = self._gather(first)
            self._execute(batch)

    def _execute(self, batch: list[_Request]) -> None:
        try:
            images = (
                batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])
            )
            instructions = [t for r in batch for t in r.instructions]
            out = self._engine_act(images, instructions, batch[0])
        except Exception as e:  # noqa: BLE001 - every caller must hear about the failure
            for req in batch:
                req.future.set_exception(e)
            return
        if len(batch) > self.most_requests_merged:
            self.most_requests_merged = len(batch)
            # Before the results: once a caller has its reply, the line is in the log.
            log.info(
                "dynamic batching: %d requests (%d observations) in one engine call, the most so far",
                len(batch),
                len(instructions),
            )
        start = 0
        for req in batch:
            n = len(req.instructions)
            req.future.set_result(
                EngineOutput(
                    out.action_tokens[start : start + n],
                    out.logprobs[start : start + n],
                    out.policy_version,
                )
            )
            start += n

    def _engine_act(
        self, images: np.ndarray, instructions: list[str], settings: _Request
    ) -> EngineOutput:
        """One engine call per `max_batch_size` observations: a single request may hold more (an
        env server with more envs than the limit; 420 images once ran as one forward pass). The
        reply carries one policy version, so if an adapter push lands between two slices the
        request is played again."""
        step, n = self.max_batch_size, len(instructions)
        for _ in range(MAX_VERSION_RETRIES):
            outs = []
            for start in range(0, n, step):
                outs.append(
                    self.engine.act(
                        images[start : start + step],
                        instructions[start : start + step],
                        temperature=settings.temperature,
                        top_k=settings.top_k,
                        greedy=settings.greedy,
                        seed=settings.seed,
                    )
                )
                self.batch_sizes.append(len(instructions[start : start + step]))
                metrics.BATCH_SIZE.observe(self.batch_sizes[-1])
            if len({o.policy_version for o in outs}) == 1:
                break
        else:
            raise RuntimeError("the policy version changed during every try of a large request")
        if len(outs) == 1:
            return outs[0]
        return EngineOutput(
            np.concatenate([o.action_tokens for o in outs]),
            np.concatenate([o.logprobs for o in outs]),
            outs[0].policy_version,
        )
