"""The learner's Prometheus metrics (served on --metrics-port): training progress, phase times,
losses, the segments it dropped, and the trajectory buffer it reads."""

from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

from vla_rl.telemetry import LATENCY_BUCKETS, safely

ITERATION = Gauge("vla_rl_learner_iteration", "Training iterations finished")
POLICY_VERSION = Gauge("vla_rl_learner_policy_version", "Latest adapter version published")
ITERATION_SECONDS = Histogram(
    "vla_rl_learner_iteration_seconds",
    "Wall time of one iteration (waiting for segments included)",
    buckets=LATENCY_BUCKETS + (120, 300, 600),
)
PHASE_SECONDS = Counter(
    "vla_rl_learner_phase_seconds_total",
    "Time spent per phase (collect_wait, prepare, update, checkpoint, publish)",
    ["phase"],
)
SAMPLES = Counter("vla_rl_learner_samples_total", "Env steps (decisions) trained on")
LOSS = Gauge("vla_rl_learner_loss", "Loss terms of the latest update (policy, value)", ["term"])
APPROX_KL = Gauge("vla_rl_learner_approx_kl", "Approximate KL of the latest update")
TRAIN_SUCCESS = Gauge(
    "vla_rl_learner_train_success_ratio",
    "success_once over the episodes that finished in the latest iteration's segments",
)
POLICY_LAG = Gauge(
    "vla_rl_learner_policy_lag",
    "Mean versions between the policy that collected a segment and the one trained (staleness)",
)
SEGMENTS_DROPPED = Counter(
    "vla_rl_learner_segments_dropped_total",
    "Segments not trained on, by reason (stale, duplicate, earlier_launch, foreign)",
    ["reason"],
)
REPLICA_RESYNCS = Counter(
    "vla_rl_learner_replica_resyncs_total",
    "Adapters re-pushed to a rollout replica that was behind (restarted or newly discovered)",
)
BUFFER_ENTRIES = Gauge("vla_rl_buffer_stream_entries", "Entries in the trajectory stream")
BUFFER_PENDING = Gauge(
    "vla_rl_buffer_pending_entries", "Entries delivered to the learner and not yet acknowledged"
)
BUFFER_LAG = Gauge(
    "vla_rl_buffer_consumer_lag",
    "Entries in the trajectory stream not yet delivered to the learner's consumer group",
)
BUFFER_DEAD_LETTERS = Gauge("vla_rl_buffer_dead_letters", "Entries moved to the dead-letter stream")

_PHASES = ("collect_wait", "prepare", "update", "checkpoint", "publish")
_LOSSES = {"train/actor/policy_loss": "policy", "train/critic/value_loss": "value"}
_DROPS = {
    "rollout/stale_segments_dropped": "stale",
    "rollout/duplicate_segments_dropped": "duplicate",
    "rollout/earlier_launch_segments_dropped": "earlier_launch",
    "rollout/foreign_segments_rejected": "foreign",
}


# Every label's series exists from the start (at 0).
for _phase in _PHASES:
    PHASE_SECONDS.labels(_phase)
for _reason in _DROPS.values():
    SEGMENTS_DROPPED.labels(_reason)


class Exporter:
    """Turns the learner's per-iteration metrics (the TensorBoard dict) into the families above."""

    def __init__(self) -> None:
        self._dropped = dict.fromkeys(_DROPS, 0.0)  # the learner reports running totals

    def watch_buffer(self, buffer) -> None:
        """Read the buffer's sizes at scrape time."""
        BUFFER_ENTRIES.set_function(safely(buffer.length))
        BUFFER_PENDING.set_function(safely(buffer.pending))
        BUFFER_LAG.set_function(safely(lambda: _or_nan(buffer.lag())))
        BUFFER_DEAD_LETTERS.set_function(safely(buffer.dead_letters))

    def log(self, values: dict[str, float], step: int) -> None:
        ITERATION.set(step)
        for phase in _PHASES:
            if f"time/{phase}_s" in values:
                PHASE_SECONDS.labels(phase).inc(values[f"time/{phase}_s"])
        if "time/iteration_s" in values:
            ITERATION_SECONDS.observe(values["time/iteration_s"])
        if "rollout/policy_version" in values:
            POLICY_VERSION.set(values["rollout/policy_version"])
        if "rollout/env_steps" in values:
            SAMPLES.inc(values["rollout/env_steps"])
        for key, term in _LOSSES.items():
            if key in values:
                LOSS.labels(term).set(values[key])
        if "train/actor/approx_kl" in values:
            APPROX_KL.set(values["train/actor/approx_kl"])
        if "env/success_once" in values:
            TRAIN_SUCCESS.set(values["env/success_once"])
        if "rollout/policy_lag" in values:
            POLICY_LAG.set(values["rollout/policy_lag"])
        for key, reason in _DROPS.items():
            if key in values and values[key] > self._dropped[key]:
                SEGMENTS_DROPPED.labels(reason).inc(values[key] - self._dropped[key])
                self._dropped[key] = values[key]


def _or_nan(value: int | None) -> float:
    """A count the backend could not give (None) is NaN on the gauge, not 0."""
    return math.nan if value is None else float(value)
