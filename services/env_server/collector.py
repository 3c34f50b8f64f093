"""The collection loop: step the env pool with actions from the rollout service and write one
trajectory segment per env and iteration to the buffer.

Each iteration resets every env and runs `max_episode_steps / action_chunk` decisions, so the time
limit of an env's first episode falls on the segment's last step and the final observation there
is the bootstrap observation. Envs whose episode terminates earlier auto-reset and keep collecting;
the learner sees those episodes cut by the segment end (a truncation it bootstraps from).

With `pipeline_stage_num` S the envs form S stages: while one stage steps its simulators, the
rollout service is already inferring for the others.

With `video_dir` set, each iteration of the server's first env (env 0 of stage 0) is also written
as an MP4 of the observations the policy saw (its segment's images and the bootstrap image): no
extra rendering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from vla_rl.buffer import Segment, TrajectoryBuffer
from vla_rl.evaluation import annotate, write_video

from . import metrics
from .env_pool import EnvPool, EnvPoolConfig, EnvWorkerDied

log = logging.getLogger("vla_rl.env_server")
T = TypeVar("T")

ROLLOUT_PATIENCE_S = 900.0
"""How long collection waits for an unavailable rollout service (a replica restarting loads its
model, minutes for a 7B) before it fails."""
# Attempts at one iteration whose env workers died before the run fails: a worker that dies once
# (the host ran short of memory) is replaced; one that dies every time is a bug to report.
MAX_WORKER_RESTARTS = 3


def record_steps(mode: str, steps: int, episodes: list[dict]) -> None:
    """Count env steps and finished episodes (with their success_once and return) for /metrics."""
    metrics.ENV_STEPS.labels(mode).inc(steps)
    if episodes:
        metrics.EPISODES.labels(mode).inc(len(episodes))
        metrics.SUCCESSES.labels(mode).inc(sum(bool(e.get("success_once")) for e in episodes))
        for episode in episodes:
            metrics.EPISODE_RETURN.labels(mode).observe(float(episode["return"]))


def _unavailable(error: BaseException) -> bool:
    """UNAVAILABLE from a gRPC call or a RolloutError (whose `code` is an attribute)."""
    code = getattr(error, "code", None)
    code = code() if callable(code) else code
    return code == grpc.StatusCode.UNAVAILABLE


@dataclass
class ActResult:
    action_tokens: np.ndarray  # int64 [B, K]
    actions: np.ndarray  # float32 [B, C, 7], un-normalised
    logprobs: np.ndarray  # float32 [B, K]
    policy_version: int


ActFn = Callable[[np.ndarray, list[str], float], Future]
"""(images [B,H,W,3] uint8, instructions, temperature) -> Future[ActResult]."""


@dataclass
class CollectionConfig:
    """One collection run (comes with StartCollection; the server keeps nothing else)."""

    run_id: str = "run"
    """Names the run in segment ids."""
    server_id: str = "env0"
    """This server's name in segment ids."""
    pool: EnvPoolConfig = field(default_factory=EnvPoolConfig)
    """The simulators (tasks, number of envs, backend, episode length, seed)."""
    pipeline_stage_num: int = 1
    """Stages the envs are split into for overlapping simulation and inference."""
    group_size: int = 1
    """GRPO: envs per group reset with the same seed (1 = no groups)."""
    iterations: int = 0
    """Iterations to collect (0 = until stopped)."""
    start_version: int = 0
    """First iteration (= the policy version it is collected with); the learner's on resume."""
    max_staleness: int = 0
    """How many versions collection may run ahead of the learner (0 = on-policy)."""
    temperature: float = 1.0
    """Sampling temperature asked of the rollout service."""
    action_chunk: int = 1
    """Actions per decision (the rollout service's policy says)."""
    steps_per_segment: int | None = None
    """Env steps per segment (None = the pool's max_episode_steps); at most max_episode_steps."""
    video_dir: str | None = None
    """Training videos: each iteration of env 0 of stage 0 (its segment's T observations and the
    bootstrap one, T+1 frames) as <video_dir>/<server_id>/iter<iteration:05d>_env0.mp4; None or
    "": no videos."""
    info_on_video: bool = True
    """Overlay step, reward and success on the video frames."""

    def __post_init__(self) -> None:
        n = self.pool.num_envs
        if self.pipeline_stage_num < 1 or n % self.pipeline_stage_num:
            raise ValueError(
                f"pipeline_stage_num ({self.pipeline_stage_num}) must divide num_envs ({n})"
            )
        if self.group_size < 1 or (n // self.pipeline_stage_num) % self.group_size:
            raise ValueError(
                f"group_size ({self.group_size}) must divide the envs of one pipeline stage "
                f"({n} envs / {self.pipeline_stage_num} stages)"
            )
        if self.iterations < 0 or self.max_staleness < 0 or self.action_chunk < 1:
            raise ValueError("iterations and max_staleness must be >= 0, action_chunk >= 1")

        limit = self.pool.max_episode_steps
        if limit is None or limit < self.action_chunk:
            raise ValueError("max_episode_steps must be set and at least one action chunk long")
        steps = self.steps_per_segment or limit
        if not self.action_chunk <= steps <= limit:
            # Longer segments would hold time-limit cuts whose final observation is lost to the
            # auto-reset; the learner could not bootstrap them correctly.
            raise ValueError(
                f"steps_per_segment ({steps}) must be between action_chunk ({self.action_chunk}) "
                f"and max_episode_steps ({limit})"
            )

    @property
    def decisions_per_segment(self) -> int:
        return (self.steps_per_segment or self.pool.max_episode_steps) // self.action_chunk


@dataclass
class CollectionStats:
    state: str = "idle"
    segments_written: int = 0
    env_steps: int = 0
    episodes: int = 0
    policy_version: int = -1
    error: str = ""
    # Seconds spent waiting for actions, stepping the envs, and waiting for a policy version.
    act_wait_s: float = 0.0
    env_step_s: float = 0.0
    policy_wait_s: float = 0.0


class _Trajectory:
    """Per-env lists of one segment under construction."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.instructions: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.terminated: list[bool] = []
        self.truncated: list[bool] = []
        self.success: list[bool] = []
        self.episodes: list[dict] = []
        self.versions: set[int] = set()


class Collector:
    def __init__(
        self,
        config: CollectionConfig,
        act: ActFn,
        current_version: Callable[[], int],
        buffer: TrajectoryBuffer,
        make_pool: Callable[[EnvPoolConfig], EnvPool] = EnvPool,
        rollout_patience_s: float = ROLLOUT_PATIENCE_S,
    ) -> None:
        self.config = config
        self.rollout_patience_s = rollout_patience_s
        self.act = act
        self.current_version = current_version
        self.buffer = buffer
        self.make_pool = make_pool
        self.stats = CollectionStats()
        self.stop_event = threading.Event()

    # -- seeds ------------------------------------------------------------------------------
    def _reset_seeds(self, iteration: int, stage: int, n: int) -> list[int]:
        """Envs of one GRPO group share a seed (same initial state); groups and iterations differ."""
        cfg = self.config
        base = cfg.pool.seed + 1_000_003 * iteration
        return [base + 7919 * (e // cfg.group_size) + 1 for e in range(stage * n, stage * n + n)]

    def _stage_tasks(self, stage: int, n: int) -> list[str]:
        """One task per env, the same for a whole GRPO group (its members must share a scene)."""
        tasks = self.config.pool.task_ids
        envs = range(stage * n, stage * n + n)
        return [tasks[(e // self.config.group_size) % len(tasks)] for e in envs]

    def _patiently(self, call: Callable[[], T], what: str) -> T:
        """call() again, with backoff, while the rollout service is UNAVAILABLE (a replica that
        restarts, or waits for the current policy) for up to rollout_patience_s; the episodes in
        flight continue where they were. Other errors, and a longer outage, fail the run."""
        deadline = time.monotonic() + self.rollout_patience_s
        delay = 0.5
        while True:
            try:
                return call()
            except Exception as e:
                if not _unavailable(e) or time.monotonic() > deadline or self.stop_event.is_set():
                    raise
                log.warning(
                    "%s: rollout service unavailable, retrying in %.1f s: %s", what, delay, e
                )
            self.stop_event.wait(delay)
            delay = min(2 * delay, 5.0)

    def _act_result(self, pending: Future, obs) -> ActResult:
        """The pending Act's result; while the rollout service is unavailable, the same
        observations are asked again."""
        try:
            return pending.result()
        except Exception as e:
            if not _unavailable(e):
                raise
        temperature = self.config.temperature
        return self._patiently(
            lambda: self.act(obs.images, list(obs.instructions), temperature).result(), "Act"
        )

    def _wait_for_version(self, wanted: int) -> int:
        while not self.stop_event.is_set():
            version = self._patiently(self.current_version, "GetPolicy")
            if version >= wanted:
                return version
            time.sleep(0.05)
        return -1

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> CollectionStats:
        cfg = self.config
        self.stats.state = "running"
        metrics.COLLECTION_RUNNING.set(1)
        stages = cfg.pipeline_stage_num
        per_stage = cfg.pool.num_envs // stages
        pools: list[EnvPool] = []
        try:
            if cfg.video_dir:  # an unusable directory fails the run before any env is built
                self._video_path(cfg.start_version).parent.mkdir(parents=True, exist_ok=True)
            for s in range(stages):
                pool_cfg = EnvPoolConfig(
                    **{
                        **vars(cfg.pool),
                        "num_envs": per_stage,
                        "task_ids": self._stage_tasks(s, per_stage),
                        "seed": cfg.pool.seed + 104_729 * s,
                    }
                )
                pools.append(self.make_pool(pool_cfg))
            # Iteration i is collected with policy version i (on-policy) or at most max_staleness
            # versions older; numbering from start_version keeps segment ids unique on resume.
            iteration, restarts = cfg.start_version, 0
            end = None if cfg.iterations == 0 else cfg.start_version + cfg.iterations
            while not self.stop_event.is_set() and (end is None or iteration < end):
                t0 = time.monotonic()
                version = self._wait_for_version(iteration - cfg.max_staleness)
                self.stats.policy_wait_s += time.monotonic() - t0
                if version < 0:
                    break
                try:
                    self._collect_iteration(iteration, pools, per_stage)
                except EnvWorkerDied as died:
                    restarts = self._replace_dead_workers(pools, died, restarts)
                    continue  # the same iteration again from its first reset: no segment of it was written
                restarts = 0
                iteration += 1
            self.stats.state = "idle"
        except Exception as e:  # noqa: BLE001 - reported through GetStatus, then logged
            log.exception("collection failed")
            self.stats.state = "failed"
            self.stats.error = f"{type(e).__name__}: {e}"
            metrics.COLLECTION_FAILURES.inc()
        finally:
            metrics.COLLECTION_RUNNING.set(0)
            for pool in pools:
                pool.close()
        return self.stats

    def _replace_dead_workers(
        self, pools: list[EnvPool], died: EnvWorkerDied, restarts: int
    ) -> int:
        """Replace the env workers that died (out of memory, a simulator or renderer crash) so
        that the collection, and the run, go on; a worker that keeps dying fails the run. The
        abandoned attempt's env steps and finished episodes stay counted in the status and
        /metrics (they were simulated), though none of them reaches a segment."""
        if restarts >= MAX_WORKER_RESTARTS:
            raise RuntimeError(
                f"env workers died in {restarts + 1} attempts at one iteration; last: {died}"
            ) from died
        replaced = sum(len(pool.restart_dead_workers()) for pool in pools)
        metrics.WORKER_RESTARTS.inc(replaced)
        log.warning("%s; replaced %d env worker(s), collecting the iteration again", died, replaced)
        return restarts + 1

    def _collect_iteration(self, iteration: int, pools: list[EnvPool], per_stage: int) -> None:
        cfg = self.config
        trajs = [[_Trajectory() for _ in range(per_stage)] for _ in pools]
        t0 = time.monotonic()
        obs = [
            pool.reset(self._reset_seeds(iteration, s, per_stage)) for s, pool in enumerate(pools)
        ]
        self.stats.env_step_s += time.monotonic() - t0  # resets render too
        task_ids = [list(o.task_ids) for o in obs]
        pending: list[Future] = [
            self.act(o.images, list(o.instructions), cfg.temperature) for o in obs
        ]
        decisions = cfg.decisions_per_segment
        last_final: list[np.ndarray] = [o.images for o in obs]
        for t in range(decisions):
            for s, pool in enumerate(pools):
                if self.stop_event.is_set():
                    return
                t0 = time.monotonic()
                result = self._act_result(pending[s], obs[s])
                t1 = time.monotonic()
                step = self._step_chunk(pool, result.actions)
                self.stats.act_wait_s += t1 - t0
                self.stats.env_step_s += time.monotonic() - t1
                for i, traj in enumerate(trajs[s]):
                    traj.images.append(obs[s].images[i])
                    traj.instructions.append(obs[s].instructions[i])
                    traj.tokens.append(result.action_tokens[i])
                    traj.logprobs.append(result.logprobs[i])
                    traj.rewards.append(float(step["rewards"][i]))
                    traj.terminated.append(bool(step["terminated"][i]))
                    traj.truncated.append(bool(step["truncated"][i]))
                    traj.success.append(bool(step["success"][i]))
                    traj.versions.add(int(result.policy_version))
                for i, stats in step["episodes"]:
                    trajs[s][i].episodes.append(stats)
                self.stats.episodes += len(step["episodes"])
                self.stats.env_steps += per_stage * cfg.action_chunk
                self.stats.policy_version = int(result.policy_version)
                record_steps(
                    "train", per_stage * cfg.action_chunk, [e for _, e in step["episodes"]]
                )
                metrics.POLICY_VERSION.set(result.policy_version)
                obs[s] = step["obs"]
                last_final[s] = step["final_images"]
                if t + 1 < decisions:  # the next inference overlaps the other stages' physics
                    pending[s] = self.act(obs[s].images, list(obs[s].instructions), cfg.temperature)
        if cfg.video_dir:
            self._write_video(iteration, task_ids[0][0], trajs[0][0], last_final[0][0])
        for s, stage_trajs in enumerate(trajs):
            for i, traj in enumerate(stage_trajs):
                env_index = s * per_stage + i
                self._write_segment(
                    iteration, env_index, task_ids[s][i], traj, last_final[s][i], obs[s], i
                )

    def _video_path(self, iteration: int) -> Path:
        cfg = self.config
        return Path(cfg.video_dir or ".") / cfg.server_id / f"iter{iteration:05d}_env0.mp4"

    def _write_video(
        self, iteration: int, task_id: str, traj: _Trajectory, bootstrap_image: np.ndarray
    ) -> None:
        """One MP4 of env 0's iteration: the T observations of its segment and the bootstrap one.

        Frame t > 0 is what the env showed after decision t-1 (after an auto-reset: the next
        episode's first frame, except the last frame, which is always the bootstrap one); its
        label gives that decision's env step, reward and success and the episode's return."""
        frames = [*traj.images, bootstrap_image]
        if self.config.info_on_video:
            chunk = self.config.action_chunk
            labels = [f"it {iteration} step 0 {task_id}"]
            ret = 0.0
            for t, reward in enumerate(traj.rewards):
                ret += reward
                label = f"step {(t + 1) * chunk} r {reward:.2f} ret {ret:.2f}"
                label += " success" if traj.success[t] else ""
                if traj.terminated[t] or traj.truncated[t]:
                    label += " done"
                    ret = 0.0
                labels.append(label)
            frames = [annotate(f, text) for f, text in zip(frames, labels, strict=True)]
        path = self._video_path(iteration)
        try:
            write_video(path, frames)
        except Exception as err:  # noqa: BLE001 - a lost video must not stop training
            log.warning("training video %s not written: %s", path, err)

    def _step_chunk(self, pool: EnvPool, actions: np.ndarray) -> dict:
        """Apply a chunk of C actions; rewards add up, dones and success are OR-ed over the chunk.

        An env that finishes mid-chunk auto-resets and plays the rest of the chunk in its next
        episode (the decision is still marked done, and its reward counts only up to the end)."""
        n, chunk = actions.shape[0], actions.shape[1]
        rewards = np.zeros(n, np.float32)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        success = np.zeros(n, bool)
        episodes: list = []
        for c in range(chunk):
            with metrics.STEP_SECONDS.time():
                res = pool.step(np.ascontiguousarray(actions[:, c], dtype=np.float32))
            live = ~(terminated | truncated)
            rewards += np.where(live, res.rewards, 0.0).astype(np.float32)
            success |= live & res.success
            terminated |= live & res.terminated
            truncated |= live & res.truncated & ~res.terminated
            episodes += [(i, s) for i, s in res.episodes if live[i]]
            # The image an env's decision ended on: where it finished, or the last step's.
            if c == 0:
                final_images = res.final_images
            else:
                final_images = np.where(live[:, None, None, None], res.final_images, final_images)
            obs = res.obs
        return {
            "obs": obs,
            "rewards": rewards,
            "terminated": terminated,
            "truncated": truncated,
            "success": success,
            "final_images": final_images,
            "episodes": episodes,
        }

    def _write_segment(
        self,
        iteration: int,
        env_index: int,
        task_id: str,
        traj: _Trajectory,
        bootstrap_image: np.ndarray,
        last_obs,
        i: int,
    ) -> None:
        cfg = self.config
        if len(traj.versions) != 1:
            log.warning("segment mixes policy versions %s", sorted(traj.versions))
        segment = Segment(
            segment_id=f"{cfg.run_id}-{cfg.server_id}-{iteration}-{env_index}",
            run_id=cfg.run_id,
            policy_version=min(traj.versions),
            iteration=iteration,
            group_id=(env_index // cfg.group_size) if cfg.group_size > 1 else -1,
            task_id=task_id,
            images=np.stack(traj.images),
            instructions=traj.instructions,
            action_tokens=np.stack(traj.tokens).astype(np.int64),
            behaviour_logprobs=np.stack(traj.logprobs).astype(np.float32),
            rewards=np.asarray(traj.rewards, np.float32),
            terminated=np.asarray(traj.terminated, bool),
            truncated=np.asarray(traj.truncated, bool),
            success=np.asarray(traj.success, bool),
            bootstrap_image=np.ascontiguousarray(bootstrap_image),
            bootstrap_instruction=last_obs.instructions[i],
            episodes=traj.episodes,
        )
        self.buffer.put(segment)
        self.stats.segments_written += 1
        metrics.SEGMENTS_WRITTEN.inc()
