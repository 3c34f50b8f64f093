"""Prometheus metrics: each service serves its own /metrics over HTTP (`--metrics-port`; the
metric families are defined beside the code that updates them, in each service's metrics.py).
Names follow Prometheus conventions: a `vla_rl_<service>_` prefix, base units (`_seconds`),
`_total` for counters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from prometheus_client import start_http_server

log = logging.getLogger(__name__)

# Latencies from a 1 ms tiny-model batch on a GPU to a 7B model's minute-long cold call.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Observations per engine call or per request.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def serve_metrics(port: int, host: str, service: str) -> int:
    """Serve /metrics on host:port (0: any free port) in a daemon thread; returns the port. A
    taken port exits with one line naming the service, before any model loads."""
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as e:
        raise SystemExit(
            f"{service}: cannot serve metrics on {host}:{port} ({e.strerror})"
        ) from None
    bound = int(server.server_port)
    log.info("%s: Prometheus metrics on http://%s:%d/metrics", service, host, bound)
    return bound


def safely(read: Callable[[], float]) -> Callable[[], float]:
    """A gauge callback that reports NaN instead of failing the whole scrape when what it reads
    (Redis, an engine) is briefly unavailable."""

    def value() -> float:
        try:
            return float(read())
        except Exception:  # noqa: BLE001 - a scrape must not fail for one value
            return math.nan

    return value
