"""The rollout server's Prometheus metrics (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from vla_rl.telemetry import LATENCY_BUCKETS, SIZE_BUCKETS

REQUESTS = Counter(
    "vla_rl_rollout_requests_total",
    "Act requests answered, by gRPC status code",
    ["code"],
)
REQUEST_SECONDS = Histogram(
    "vla_rl_rollout_request_seconds",
    "Time to answer one Act request, queueing in the batcher included",
    buckets=LATENCY_BUCKETS,
)
ACTIONS = Counter(
    "vla_rl_rollout_actions_total",
    "Observations answered with an action (one per env per decision; a chunk counts once)",
)
BATCH_SIZE = Histogram(
    "vla_rl_rollout_batch_size",
    "Observations per engine forward (requests merged by the dynamic batcher)",
    buckets=SIZE_BUCKETS,
)
QUEUE_DEPTH = Gauge("vla_rl_rollout_queue_depth", "Act requests waiting for the engine")
POLICY_VERSION = Gauge(
    "vla_rl_rollout_policy_version", "Adapter version the engine serves (0: the base)"
)
ADAPTER_PUSHES = Counter(
    "vla_rl_rollout_adapter_pushes_total",
    "PushAdapter calls, by result (loaded or refused)",
    ["result"],
)
ADAPTER_LOAD_SECONDS = Histogram(
    "vla_rl_rollout_adapter_load_seconds",
    "Time the engine took to load a pushed adapter (checks, staging and the weight switch)",
    buckets=LATENCY_BUCKETS,
)

for _result in ("loaded", "refused"):
    ADAPTER_PUSHES.labels(_result)
