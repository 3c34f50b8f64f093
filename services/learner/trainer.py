"""The learner's loop: gather one iteration of segments, update the policy with PPO (GAE or GRPO
advantages), commit (checkpoint), publish adapter v+1 to the rollout replicas, then XACK.
With max_staleness > 0 the publish runs in the background while the next iteration is gathered
and prepared (collection may run a version behind, so nothing waits for it); the next publish,
and the end of the run, wait for it first.

Everything the loop talks to comes in as an object (buffer, adapter publisher, metric logger), so
it runs the same under `vla-rl train`, in tests and under torchrun. Under torchrun (FSDP) every
rank runs the batch building, the update and the adapter gathering (collectives); only rank 0
reads the buffer, writes checkpoints, publishes, acknowledges and logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vla_rl.buffer import Received, TrajectoryBuffer
from vla_rl.models import OpenVLAPolicy, PromptTokenizer
from vla_rl.training.checkpoints import (
    CheckpointState,
    read_checkpoint,
    resume_source,
    save_checkpoint,
)
from vla_rl.training.distributed import (
    broadcast_object,
    is_main,
    load_adapter_distributed,
    load_optimizer_state,
    optimizer_state,
    serialize_adapter_distributed,
)
from vla_rl.training.update import PPOUpdateConfig, ppo_update

from .batch import AdvantageConfig, build_train_batch, stack_segments

log = logging.getLogger("vla_rl.learner")

Publish = Callable[[bytes, int], None]
"""(adapter blob, version) -> None; raises if a replica could not be updated."""


@dataclass
class LoopSettings:
    """What the loop needs beyond the update itself (filled from the run's TrainConfig)."""

    segments_per_iteration: int
    """Segments (env trajectories) one iteration trains on: all envs of all env servers."""
    max_iterations: int
    """Stop after this many iterations in total (runner.max_epochs)."""
    checkpoint_dir: Path
    """Where global_step_N/ checkpoints go."""
    save_interval: int = 1
    """Checkpoint every this many iterations. The last one trained is always saved, also when the
    run is stopped early (SIGINT/SIGTERM, `--minutes`)."""
    keep_checkpoints: int = 2
    """Older checkpoints are deleted."""
    resume_dir: str | None = None
    """Checkpoint to start from when checkpoint_dir has none (runner.resume_dir)."""
    temperature: float = 1.0
    """The rollout's sampling temperature (the old log-probs must use the same)."""
    micro_batch_size: int = 8
    """Micro-batch of the no-grad recompute."""
    recompute_logprobs: bool = True
    """Recompute the old log-probs before the update; false: the rollout's are the old ones."""
    critic_warmup_steps: int = 0
    """Iterations 1..N train only the value head (actor.optim.critic_warmup_steps)."""
    max_staleness: int = 0
    """Segments collected by a policy more than this many versions older than the learner's are
    dropped (and counted) instead of trained on."""
    wait_log_s: float = 30.0
    """Log a line while waiting longer than this for segments."""
    segment_timeout_s: float = 600.0
    """Fail when no segment arrives for this long (runner.segment_timeout_s; 0: wait forever)."""
    run_id: str = ""
    """Train only on segments of this run id (one launch of the run); "" accepts any. Policy
    version numbers restart with every launch that starts from the same checkpoint, so a
    segment of an earlier launch with a matching version may come from other weights."""


class SegmentTimeout(RuntimeError):
    """No segment arrived within LoopSettings.segment_timeout_s."""


def segment_source(seg) -> str:
    """The env server that wrote a segment: ids are `<run_id>-<server>-<iteration>-<env>`."""
    rest = seg.segment_id[len(seg.run_id) + 1 :] if seg.segment_id.startswith(seg.run_id) else ""
    parts = rest.rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[0] else "unknown"


def waiting_message(got: list[Received], want: int, iteration: int) -> str:
    """'3 of 4 segments for iteration 5 (env0: 2, env1: 1)': what has come, by env server."""
    by_server: dict[str, int] = {}
    for r in got:
        source = segment_source(r.segment)
        by_server[source] = by_server.get(source, 0) + 1
    sources = ", ".join(f"{k}: {v}" for k, v in sorted(by_server.items())) or "none yet"
    return f"{len(got)} of {want} segments for iteration {iteration} ({sources})"


class Learner:
    def __init__(
        self,
        policy: OpenVLAPolicy,
        prompts_of: PromptTokenizer,
        optimizer: torch.optim.Optimizer,
        buffer: TrajectoryBuffer,
        publish: Publish,
        update_cfg: PPOUpdateConfig,
        adv_cfg: AdvantageConfig,
        loop: LoopSettings,
        log_metrics: Callable[[dict[str, float], int], None] = lambda m, step: None,
        seed: int = 0,
        while_waiting: Callable[[], None] = lambda: None,
    ) -> None:
        self.policy = policy
        self.prompts_of = prompts_of
        self.optimizer = optimizer
        self.buffer = buffer
        self.publish = publish
        self.update_cfg = update_cfg
        self.adv_cfg = adv_cfg
        self.loop = loop
        self.log_metrics = log_metrics
        self.while_waiting = while_waiting
        """Called every few seconds while segments are awaited (re-push the adapter to a
        replica that restarted)."""
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.policy_version = 0
        self.saved_iteration = 0  # the iteration of the newest checkpoint this run wrote or resumed
        self.phase = "starting"
        self.last_metrics: dict[str, float] = {}
        self._held: list[Received] = []  # segments of a later iteration (max_staleness > 0)
        self.stale_dropped = 0
        self.foreign_rejected = 0  # segments of a policy version never published: dead letters
        self.earlier_launch_dropped = 0
        self.duplicates_dropped = 0
        self.main = is_main()
        self._publishing: Future | None = None  # a publish in the background (max_staleness > 0)
        self._publisher: ThreadPoolExecutor | None = None

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, blob: bytes, optim_state: dict) -> Path:
        """Write global_step_N/ (rank 0): adapter blob, optimizer state by parameter name (any
        world size can load it), iteration and version; then point `latest` at it."""
        return save_checkpoint(
            self.loop.checkpoint_dir,
            CheckpointState(self.iteration, self.policy_version),
            blob,
            optim_state,
            keep=self.loop.keep_checkpoints,
        )

    def resume(self) -> bool:
        """Load this run's latest checkpoint, else loop.resume_dir's, if any (all ranks);
        returns whether one was loaded."""
        payload = optim = None
        if self.main:
            path = resume_source(self.loop.checkpoint_dir, self.loop.resume_dir, warn=log.warning)
            if path is not None:
                state, blob, optim = read_checkpoint(path)
                payload = (state, blob)
                log.info("resuming from %s (iteration %d)", path, state.iteration)
        payload = broadcast_object(payload)
        if payload is None:
            return False
        state, blob = payload
        load_adapter_distributed(self.policy, blob)
        load_optimizer_state(self.policy, self.optimizer, optim if self.main else {})
        self.iteration = state.iteration
        self.policy_version = state.policy_version
        self.saved_iteration = state.iteration
        return True

    def publish_current(self) -> None:
        """Send the current adapter to every replica (at start-up after a resume)."""
        if self.policy_version > 0:
            blob = serialize_adapter_distributed(self.policy, self.policy_version)
            if self.main:
                self.publish(blob, self.policy_version)

    # -- one iteration ------------------------------------------------------------------------
    def gather(self, stop: Callable[[], bool] = lambda: False) -> list[Received] | None:
        """Block until this iteration's segments are in; None if stopped first.

        Segments of a later iteration are held for it; segments of an earlier iteration (a
        resume re-delivers them), repeated segment ids and segments whose policy is more than
        `max_staleness` versions behind are acknowledged and dropped, and counted. When nothing
        arrives for `segment_timeout_s`, SegmentTimeout says what came from which env server:
        a stalled collection is an error to act on, never a silent hang.
        """
        want = self.loop.segments_per_iteration
        got: list[Received] = []
        seen: set[str] = set()
        held, self._held = self._held, []
        logged_at = last_arrival = last_check = time.monotonic()
        while True:
            for r in held:
                self._sort(r, got, seen)
            if len(got) >= want:
                return got
            if stop():
                self._held.extend(got)
                return None
            held = self.buffer.take(want - len(got), timeout_s=0.5)
            now = time.monotonic()
            if held:
                last_arrival = now
            idle = now - last_arrival
            if 0 < self.loop.segment_timeout_s < idle:
                raise SegmentTimeout(
                    f"no segment arrived for {idle:.0f} s (runner.segment_timeout_s): "
                    f"{waiting_message(got, want, self.iteration + 1)} on stream "
                    f"{self.buffer.stream!r}. Every env server must be running and collecting "
                    "for this run into this buffer: see their logs"
                )
            if now - last_check > 2.0:
                if self._publishing is None or self._publishing.done():
                    self.while_waiting()  # (a resync beside a running publish would race it)
                last_check = now
            if now - logged_at > self.loop.wait_log_s:
                log.info("waiting: %s", waiting_message(got, want, self.iteration + 1))
                logged_at = now

    def _sort(self, r: Received, got: list[Received], seen: set[str]) -> None:
        """Put one received segment where it belongs: this iteration, held, or dropped."""
        seg = r.segment
        lag = self.policy_version - seg.policy_version
        if self.loop.run_id and seg.run_id != self.loop.run_id:
            self.buffer.ack([r.entry_id])  # left in the stream by an earlier launch
            self.earlier_launch_dropped += 1
        elif lag < 0:
            # Stamped with a version this learner never published: not from our policy (a
            # foreign push to a rollout server, or a stream shared by another run).
            self.buffer.reject(
                r,
                f"segment {seg.segment_id} says policy version {seg.policy_version}, but this "
                f"learner has published only up to {self.policy_version}",
            )
            self.foreign_rejected += 1
        elif seg.iteration > self.iteration:
            self._held.append(r)
        elif seg.iteration < self.iteration or lag > self.loop.max_staleness:
            # Collected for an iteration already trained, or by a policy too old to correct for.
            self.buffer.ack([r.entry_id])
            self.stale_dropped += 1
        elif seg.segment_id in seen:
            self.buffer.ack([r.entry_id])  # redelivered within this iteration
            self.duplicates_dropped += 1
        else:
            seen.add(seg.segment_id)
            got.append(r)

    def train_iteration(self, received: list[Received]) -> dict[str, float]:
        t0 = time.monotonic()
        segments = [r.segment for r in received]
        self.phase = "preparing"
        seg = stack_segments(segments)
        batch, stats = build_train_batch(
            self.policy,
            self.prompts_of,
            seg,
            self.adv_cfg,
            self.loop.temperature,
            self.loop.micro_batch_size,
            recompute_logprobs=self.loop.recompute_logprobs,
        )
        t1 = time.monotonic()
        self.phase = "updating"
        warming_up = self.iteration < self.loop.critic_warmup_steps
        update_cfg = replace(self.update_cfg, train_policy=False) if warming_up else self.update_cfg
        metrics = {f"train/{k}": v for k, v in ppo_update(
            self.policy, self.optimizer, batch, update_cfg, self.generator
        ).items()}  # fmt: skip
        if self.loop.critic_warmup_steps > 0:
            metrics["train/critic/warmup"] = float(warming_up)
        t2 = time.monotonic()
        self.iteration += 1
        self.policy_version += 1
        self.phase = "checkpointing"
        blob = serialize_adapter_distributed(self.policy, self.policy_version)  # collective
        save = self.iteration % self.loop.save_interval == 0 or (
            self.iteration >= self.loop.max_iterations
        )
        if save:
            self.commit_checkpoint(blob)
        if not self.main:
            return metrics
        t3 = time.monotonic()
        self.phase = "publishing"
        self.finish_publish()  # the previous version's first: replicas get versions in order
        if self.loop.max_staleness > 0:
            # Collection may run a version behind, so nothing needs this push before the next
            # iteration's gather and prepare: it runs beside them. Its segments are acknowledged
            # now, as the synchronous path does after its push (a checkpoint due this iteration
            # is already written); held one more iteration, the buffer could claim them back
            # from this consumer as idle.
            self._publisher = self._publisher or ThreadPoolExecutor(1, "vla-rl-publish")
            self._publishing = self._publisher.submit(self.publish, blob, self.policy_version)
        else:
            self.publish(blob, self.policy_version)
        self.buffer.ack([r.entry_id for r in received])
        t4 = time.monotonic()
        metrics.update(stats)
        metrics.update(env_metrics(segments))
        metrics.update(
            {
                "time/prepare_s": t1 - t0,
                "time/update_s": t2 - t1,
                "time/checkpoint_s": t3 - t2,
                "time/publish_s": t4 - t3,
                "rollout/policy_version": float(self.policy_version),
                "rollout/stale_segments_dropped": float(self.stale_dropped),
                "rollout/foreign_segments_rejected": float(self.foreign_rejected),
                "rollout/earlier_launch_segments_dropped": float(self.earlier_launch_dropped),
                "rollout/duplicate_segments_dropped": float(self.duplicates_dropped),
                "rollout/policy_lag": float(
                    sum(self.policy_version - 1 - s.policy_version for s in segments)
                    / len(segments)
                ),
                "rollout/num_segments": float(len(segments)),
                "rollout/env_steps": float(sum(len(s.rewards) for s in segments)),
            }
        )
        self.last_metrics = metrics
        self.log_metrics(metrics, self.iteration)
        self.phase = "collecting"
        return metrics

    def finish_publish(self) -> None:
        """Wait for the publish running in the background, if any; a failed one raises here."""
        future, self._publishing = self._publishing, None
        if future is not None:
            future.result()

    def run(self, stop: Callable[[], bool] = lambda: False, print_line=print) -> None:
        """Train until max_iterations or until `stop()` (read on rank 0, which tells the others
        by broadcasting None instead of the segments). Returns once the last version is
        published."""
        try:
            self._run(stop, print_line)
            self.save_last()
            self.finish_publish()
        except BaseException:
            future, self._publishing = self._publishing, None
            if future is not None and future.exception() is not None:  # waits for it to end
                log.error("the background publish failed too: %s", future.exception())
            raise
        finally:
            if self._publisher is not None:
                self._publisher.shutdown(wait=True)
                self._publisher = None
        self.phase = "done"

    def commit_checkpoint(self, blob: bytes) -> Path | None:
        """Checkpoint this iteration with its adapter `blob` (every rank calls it: the optimizer
        state is gathered collectively; rank 0 writes it and gets the path). Every rank records
        the iteration, so save_last's collectives run on all ranks or on none."""
        optim = optimizer_state(self.policy, self.optimizer)  # collective
        self.saved_iteration = self.iteration
        return self.save_checkpoint(blob, optim) if self.main else None

    def save_last(self) -> None:
        """Checkpoint the last trained iteration if save_interval skipped it (all ranks). A run
        stopped at iteration 35 with save_interval 10 keeps the policy of iteration 35, not that
        of 30."""
        if self.iteration == self.saved_iteration or self.loop.checkpoint_dir is None:
            return
        self.phase = "checkpointing"
        blob = serialize_adapter_distributed(self.policy, self.policy_version)  # collective
        path = self.commit_checkpoint(blob)
        if path is not None:
            log.info("stopped at iteration %d: saved %s", self.iteration, path)

    def _run(self, stop: Callable[[], bool], print_line) -> None:
        while self.iteration < self.loop.max_iterations:
            self.phase = "collecting"
            t0 = time.monotonic()
            received = None
            if self.main and not stop():
                received = self.gather(stop)
            received = broadcast_object(received)
            if received is None:
                break
            wait = time.monotonic() - t0
            metrics = self.train_iteration(received)
            if not self.main:
                continue
            metrics["time/collect_wait_s"] = wait
            metrics["time/iteration_s"] = time.monotonic() - t0
            self.log_metrics(
                {k: metrics[k] for k in ("time/collect_wait_s", "time/iteration_s")},
                self.iteration,
            )
            print_line(format_line(metrics, self.iteration, self.loop.max_iterations))


def env_metrics(segments) -> dict[str, float]:
    """env/* over the episodes that finished in these segments, and the mean step reward."""
    episodes = [e for s in segments for e in s.episodes]
    out = {"env/reward": float(sum(float(s.rewards.mean()) for s in segments) / len(segments))}
    if episodes:
        n = len(episodes)
        out["env/success_once"] = sum(float(e["success_once"]) for e in episodes) / n
        out["env/episode_len"] = sum(float(e["episode_len"]) for e in episodes) / n
        out["env/return"] = sum(float(e["return"]) for e in episodes) / n
        out["env/num_episodes"] = float(n)
    return out


def format_line(m: dict[str, float], iteration: int, total: int) -> str:
    """One console line per iteration."""
    parts = [f"iter {iteration:4d}/{total}"]
    for key, label, fmt in (
        ("env/success_once", "success", ".2f"),
        ("env/return", "return", ".3f"),
        ("train/actor/policy_loss", "pg_loss", "+.4f"),
        ("train/actor/approx_kl", "kl", ".4f"),
        ("train/critic/value_loss", "v_loss", ".4f"),
        ("time/collect_wait_s", "collect", ".1f"),
        ("time/update_s", "update", ".1f"),
    ):
        if key in m:
            parts.append(f"{label} {m[key]:{fmt}}")
    if m.get("train/critic/warmup"):
        parts.append("(critic warm-up: the policy did not change)")
    return "  ".join(parts)
