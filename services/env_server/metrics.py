"""The env server's Prometheus metrics (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Summary

from vla_rl.telemetry import LATENCY_BUCKETS

ENV_STEPS = Counter(
    "vla_rl_env_steps_total",
    "Simulator steps, summed over envs, by mode (train: collection; eval: sessions)",
    ["mode"],
)
EPISODES = Counter("vla_rl_env_episodes_total", "Episodes finished, by mode", ["mode"])
SUCCESSES = Counter(
    "vla_rl_env_episode_successes_total",
    "Episodes finished that succeeded at least once (success_once), by mode",
    ["mode"],
)
EPISODE_RETURN = Summary(
    "vla_rl_env_episode_return",
    "Return (sum of the env's rewards, before any algorithm.reward_scale) of finished episodes, "
    "by mode; _sum / _count is the mean",
    ["mode"],
)
STEP_SECONDS = Histogram(
    "vla_rl_env_step_seconds",
    "Time of one vectorised step of a collection stage's envs (physics and rendering)",
    buckets=LATENCY_BUCKETS,
)
SEGMENTS_WRITTEN = Counter(
    "vla_rl_env_segments_written_total", "Trajectory segments written to the buffer"
)
COLLECTION_RUNNING = Gauge(
    "vla_rl_env_collection_running", "1 while a training collection runs, else 0"
)
COLLECTION_FAILURES = Counter(
    "vla_rl_env_collection_failures_total", "Collections that ended with an error"
)
WORKER_RESTARTS = Counter(
    "vla_rl_env_worker_restarts_total",
    "Env worker processes that died during collection and were replaced (the iteration is "
    "collected again)",
)
ROLLOUT_RETRIES = Counter(
    "vla_rl_env_rollout_retries_total",
    "Calls to the rollout service retried because it was unavailable (a restart)",
)
POLICY_VERSION = Gauge(
    "vla_rl_env_policy_version", "Policy version of the latest actions collection received"
)
EVAL_SESSIONS = Gauge("vla_rl_env_eval_sessions", "Evaluation sessions open")

# Every mode's series exists from the start (at 0), so rates and ratios have data before the
# first eval episode.
for _mode in ("train", "eval"):
    for _family in (ENV_STEPS, EPISODES, SUCCESSES, EPISODE_RETURN):
        _family.labels(_mode)
