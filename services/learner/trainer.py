"""The learner's loop: gather one iteration of segments, update the policy with PPO (GAE or GRPO
advantages), commit (checkpoint), publish adapter v+1 to the rollout replicas, then XACK.

Everything the loop talks to comes in as an object (buffer, adapter publisher, metric logger), so
it runs the same under `vla-rl train`, in tests and under torchrun. Under torchrun (FSDP) every
rank runs the batch building, the update and the adapter gathering (collectives); only rank 0
reads the buffer, writes checkpoints, publishes, acknowledges and logs.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vla_rl.buffer import Received, TrajectoryBuffer
from vla_rl.models import OpenVLAPolicy, PromptTokenizer
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
    """Checkpoint every this many iterations (the last one is always saved)."""
    keep_checkpoints: int = 2
    """Older checkpoints are deleted."""
    temperature: float = 1.0
    """The rollout's sampling temperature (the old log-probs must use the same)."""
    micro_batch_size: int = 8
    """Micro-batch of the no-grad recompute."""
    wait_log_s: float = 30.0
    """Log a line while waiting longer than this for segments."""


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
        self.generator = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.policy_version = 0
        self.phase = "starting"
        self.last_metrics: dict[str, float] = {}
        self._held: list[Received] = []  # segments of a later iteration (max_staleness > 0)
        self.stale_dropped = 0
        self.main = is_main()

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, blob: bytes, optim_state: dict) -> Path:
        """Write global_step_N/ (rank 0): adapter blob, optimizer state by parameter name (any
        world size can load it), iteration and version; then point `latest` at it."""
        root = self.loop.checkpoint_dir
        final = root / f"global_step_{self.iteration}"
        tmp = root / f".tmp_global_step_{self.iteration}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "adapter.safetensors").write_bytes(blob)
        torch.save(optim_state, tmp / "optimizer.pt")
        state = {"iteration": self.iteration, "policy_version": self.policy_version}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a checkpoint directory exists only once it is complete
        (root / "latest").write_text(final.name)
        steps = sorted(
            (p for p in root.glob("global_step_*") if p.is_dir()),
            key=lambda p: int(p.name.rsplit("_", 1)[1]),
        )
        for old in steps[: -self.loop.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self) -> bool:
        """Load the latest checkpoint, if any (all ranks); returns whether one was found."""
        payload = None
        latest = self.loop.checkpoint_dir / "latest"
        if self.main and latest.exists():
            path = self.loop.checkpoint_dir / latest.read_text().strip()
            payload = (
                json.loads((path / "state.json").read_text()),
                (path / "adapter.safetensors").read_bytes(),
            )
            optim = torch.load(path / "optimizer.pt", weights_only=True)
            log.info("resuming from %s", path)
        payload = broadcast_object(payload)
        if payload is None:
            return False
        state, blob = payload
        load_adapter_distributed(self.policy, blob)
        load_optimizer_state(self.policy, self.optimizer, optim if self.main else {})
        self.iteration = int(state["iteration"])
        self.policy_version = int(state["policy_version"])
        return True

    def publish_current(self) -> None:
        """Send the current adapter to every replica (at start-up after a resume)."""
        if self.policy_version > 0:
            blob = serialize_adapter_distributed(self.policy, self.policy_version)
            if self.main:
                self.publish(blob, self.policy_version)

    # -- one iteration ------------------------------------------------------------------------
    def gather(self, stop: Callable[[], bool] = lambda: False) -> list[Received] | None:
        """Block until this iteration's segments are in; None if stopped first."""
        want = self.loop.segments_per_iteration
        got = [r for r in self._held if r.segment.iteration == self.iteration]
        self._held = [r for r in self._held if r.segment.iteration != self.iteration]
        seen = {r.segment.segment_id for r in got}
        waited_since = time.monotonic()
        while len(got) < want:
            if stop():
                self._held.extend(got)
                return None
            for r in self.buffer.take(want - len(got), timeout_s=0.5):
                it = r.segment.iteration
                if it < self.iteration:
                    # Collected for an iteration already trained (a resume re-delivers them).
                    self.buffer.ack([r.entry_id])
                    self.stale_dropped += 1
                elif it > self.iteration:
                    self._held.append(r)
                elif r.segment.segment_id in seen:
                    self.buffer.ack([r.entry_id])  # redelivered within this iteration
                else:
                    seen.add(r.segment.segment_id)
                    got.append(r)
            if time.monotonic() - waited_since > self.loop.wait_log_s:
                log.info("waiting for segments: %d of %d", len(got), want)
                waited_since = time.monotonic()
        return got

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
        )
        t1 = time.monotonic()
        self.phase = "updating"
        metrics = {f"train/{k}": v for k, v in ppo_update(
            self.policy, self.optimizer, batch, self.update_cfg, self.generator
        ).items()}  # fmt: skip
        t2 = time.monotonic()
        self.iteration += 1
        self.policy_version += 1
        self.phase = "checkpointing"
        blob = serialize_adapter_distributed(self.policy, self.policy_version)  # collective
        save = self.iteration % self.loop.save_interval == 0 or (
            self.iteration >= self.loop.max_iterations
        )
        optim = optimizer_state(self.policy, self.optimizer) if save else None  # collective
        if not self.main:
            return metrics
        if save:
            self.save_checkpoint(blob, optim)
        t3 = time.monotonic()
        self.phase = "publishing"
        self.publish(blob, self.policy_version)
        t4 = time.monotonic()
        self.buffer.ack([r.entry_id for r in received])
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
                "rollout/num_segments": float(len(segments)),
            }
        )
        self.last_metrics = metrics
        self.log_metrics(metrics, self.iteration)
        self.phase = "collecting"
        return metrics

    def run(self, stop: Callable[[], bool] = lambda: False, print_line=print) -> None:
        """Train until max_iterations or until `stop()` (read on rank 0, which tells the others
        by broadcasting None instead of the segments)."""
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
        self.phase = "done"


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
    return "  ".join(parts)
