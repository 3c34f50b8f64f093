"""Client-side gRPC helpers: channels with our message limits and a retry policy for idempotent
calls only, default deadlines per kind of call, and waiting for a server to report SERVING."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vla_rl import security
from vla_rl.rpc import ENV_SERVICE, LEARNER_SERVICE, ROLLOUT_SERVICE
from vla_rl.rpc.auth import channel_credentials, secure_channel_options, with_token
from vla_rl.rpc.server import MAX_MESSAGE_BYTES

# Seconds; pass as `timeout=` on every call. Generous: they catch a hung peer, not a slow one.
DEFAULT_DEADLINE_S: Mapping[str, float] = MappingProxyType(
    {
        "status": 10.0,  # GetStatus, GetPolicy, health Check
        "act": 60.0,  # Act: one batch; a 7B model on a cold or CPU engine is slow
        "push_adapter": 300.0,  # PushAdapter: upload and load a LoRA + value head
        "collection": 60.0,  # StartCollection (checks the tasks' controllers), StopCollection
        "reset": 120.0,  # Reset: may build a ManiSkill scene
        "step": 60.0,  # Step: one action or one action chunk
    }
)

# Retried on UNAVAILABLE: calls that change nothing on the server (sampling in Act has no side
# effects). PushAdapter, StartCollection, StopCollection, Reset and Step are never retried by the
# channel: a retry after a lost reply could apply them twice.
IDEMPOTENT_METHODS: tuple[tuple[str, str], ...] = (
    (ROLLOUT_SERVICE, "GetPolicy"),
    (ROLLOUT_SERVICE, "Act"),
    (ENV_SERVICE, "GetStatus"),
    (LEARNER_SERVICE, "GetStatus"),
)

SERVICE_CONFIG: dict[str, Any] = {
    # Spreads calls over every address a name resolves to (a headless Service's replica pods);
    # the same as pick_first where there is one address.
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": s, "method": m} for s, m in IDEMPOTENT_METHODS],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}

CHANNEL_OPTIONS: Mapping[str, Any] = {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.enable_retries": 1,
    "grpc.service_config": json.dumps(SERVICE_CONFIG),
    # A call is only retried while its request fits the retry buffer (default 256 KiB), which an
    # Act with a batch of images does not.
    "grpc.per_rpc_retry_buffer_size": MAX_MESSAGE_BYTES,
    # Notice a dead peer on a quiet long-lived stream (ActStream); server.py permits these pings.
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    # Reconnect to a restarted replica within seconds, not gRPC's default of up to 2 min.
    "grpc.max_reconnect_backoff_ms": 5_000,
}


def make_channel(
    target: str,
    *,
    options: Mapping[str, Any] | None = None,
    credentials: security.Credentials | None = None,
) -> grpc.Channel:
    """A channel to `target` ("host:port", "dns:///name:port", "unix:path") with
    CHANNEL_OPTIONS, overridden by `options`, carrying this process's bearer token and TLS
    (`credentials`, default security.current())."""
    creds = credentials if credentials is not None else security.current()
    tls = channel_credentials(creds)
    merged = {**CHANNEL_OPTIONS, **(options or {})}
    if tls is None:
        channel = grpc.insecure_channel(target, options=list(merged.items()))
    else:
        merged.update(secure_channel_options(creds))
        channel = grpc.secure_channel(target, tls, options=list(merged.items()))
    return with_token(channel, creds)


def wait_for_health(target: str, service: str = "", timeout_s: float = 60.0) -> None:
    """Returns once `target` reports SERVING for `service` ("" = the whole server) through
    grpc.health.v1 Check; raises TimeoutError, with the last answer, after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    # Short reconnect backoff: a server that is still loading its model gets polled often.
    fast_reconnect = {
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 500,
    }
    with make_channel(target, options=fast_reconnect) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = stub.Check(request, timeout=min(remaining, 1.0), wait_for_ready=True)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            else:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        f"{target} did not report SERVING for service {service!r} within {timeout_s} s "
        f"(last answer: {last})"
    )
