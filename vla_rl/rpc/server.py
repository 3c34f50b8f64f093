"""Server-side gRPC helpers: a server with our message limits, the bearer-token check and TLS of
this process's credentials (vla_rl.security), health + reflection, graceful shutdown on
SIGTERM/SIGINT, and the exception -> status mapping every servicer method uses."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vla_rl import security
from vla_rl.rpc.auth import server_credentials, server_interceptors

logger = logging.getLogger(__name__)

# A batch of 32 224x224x3 uint8 images is 4.8 MB and an adapter chunk may be several MB; gRPC's
# default 4 MiB receive limit is too small. Both directions, both ends use this.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVER_OPTIONS: Mapping[str, int] = {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    # Fail loudly when the port is taken instead of silently sharing it with another server.
    "grpc.so_reuseport": 0,
    # Accept the keepalive pings our clients send (client.py) on long-lived ActStream calls;
    # the default (one every 5 min) would answer them with GOAWAY "too_many_pings".
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.min_recv_ping_interval_without_data_ms": 10_000,
}

# Health servicer of each server made by add_health_and_reflection, for serve_until_signal.
_HEALTH: weakref.WeakKeyDictionary[grpc.Server, health.HealthServicer] = weakref.WeakKeyDictionary()
# Credentials each server was made with, so that `bind` listens with the same TLS.
_CREDENTIALS: weakref.WeakKeyDictionary[grpc.Server, security.Credentials] = (
    weakref.WeakKeyDictionary()
)


def make_server(
    max_workers: int = 16,
    *,
    options: Mapping[str, Any] | None = None,
    credentials: security.Credentials | None = None,
) -> grpc.Server:
    """A thread-pool gRPC server with SERVER_OPTIONS (overridden by `options`) that refuses calls
    without this process's bearer token (`credentials`, default security.current()). Not
    started. A malformed credential variable exits with one line naming it."""
    try:
        creds = credentials if credentials is not None else security.current()
    except security.CredentialsError as e:
        raise SystemExit(f"credentials: {e}") from None
    merged = {**SERVER_OPTIONS, **(options or {})}
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=server_interceptors(creds),
        options=list(merged.items()),
    )
    _CREDENTIALS[server] = creds
    return server


def bind(server: grpc.Server, address: str, service: str) -> int:
    """Listen on `address` (host:port; port 0 = any), or exit with one line naming the service
    and the address. grpcio raises RuntimeError when the port is taken (with so_reuseport off);
    it never returns 0, so the old `add_insecure_port(...) == 0` checks could not fire. Bind
    before loading a model, so a taken port costs seconds, not a model load. With TLS
    credentials (make_server's) the port speaks TLS only."""
    tls = server_credentials(_CREDENTIALS.get(server, security.Credentials()))
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls)
    except RuntimeError:
        port = 0
    if port == 0:
        raise SystemExit(f"{service}: cannot listen on {address} (the port is in use, or the host "
                         "is not an address of this machine)")  # fmt: skip
    return port


def add_health_and_reflection(
    server: grpc.Server, service_names: Iterable[str]
) -> health.HealthServicer:
    """Registers grpc.health.v1 (SERVING for each service and for "", the whole server) and
    server reflection for the given full service names, e.g. "vla_rl.v1.RolloutService"."""
    names = list(service_names)
    health_servicer = health.HealthServicer()
    for name in [*names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*names, health_name, reflection.SERVICE_NAME], server)
    _HEALTH[server] = health_servicer
    return health_servicer


def serve_until_signal(
    server: grpc.Server, grace_s: float = 5.0, on_stop: Callable[[], None] | None = None
) -> int:
    """Blocks until SIGTERM or SIGINT, then shuts down and returns the signal number.

    Shutdown: health goes NOT_SERVING (so probes and balancers stop sending), the server stops
    taking calls and gives those in flight `grace_s` seconds, then `on_stop` runs (release the
    engine, flush buffers). A second signal during the grace period cancels the calls in flight.
    The server must already be started; call this from the main thread (Python only delivers
    signals there).
    """
    received: list[int] = []
    stopping = threading.Event()
    cancel = threading.Event()

    # The handler only records the signal: calling into grpc from a signal handler, while the
    # main thread it interrupted may be inside grpc itself (server.stop takes the server's lock),
    # can deadlock. The main thread acts on it.
    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():
            cancel.set()
            return
        received.append(signum)
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A timed wait, so the main thread comes back to run the Python-level handler promptly.
        while not stopping.wait(0.5):
            pass
        logger.info(
            "%s: stopping gRPC server (grace %.1f s)", signal.Signals(received[0]).name, grace_s
        )
        health_servicer = _HEALTH.get(server)
        if health_servicer is not None:
            health_servicer.enter_graceful_shutdown()
        done = server.stop(grace_s)
        while not done.wait(0.1):
            if cancel.is_set():
                logger.warning("second signal: cancelling calls in flight")
                server.stop(None)
                cancel.clear()
        if on_stop is not None:
            on_stop()
        logger.info("gRPC server stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0]


# Exceptions that say what the caller did wrong, and their status; anything else is a bug here.
class PermissionDenied(Exception):
    """A request asks for something this server does not allow (PERMISSION_DENIED)."""


_CALLER_ERRORS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)
# Statuses of a failed call to another service that are passed on unchanged, so the caller's own
# retry policy and deadline handling apply end to end.
_PASSED_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def status_of(exc: Exception, context: grpc.ServicerContext) -> grpc.StatusCode:
    """The status `map_errors` answers `exc` with (for metrics counting answers by code)."""
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code  # set by context.abort
    for exc_type, status in _CALLER_ERRORS:
        if isinstance(exc, exc_type):
            return status
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call) and exc.code() in _PASSED_ON:
        return exc.code()
    return grpc.StatusCode.INTERNAL


def _abort_with_status(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        # The method chose a status itself (context.abort raises a bare Exception): keep it.
        raise exc
    for exc_type, status in _CALLER_ERRORS:
        if isinstance(exc, exc_type):
            logger.info("%s: %s: %s", method, status.name, exc)
            context.abort(status, str(exc) or type(exc).__name__)
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        if exc.code() in _PASSED_ON:
            logger.warning("%s: call to another service failed: %s", method, exc.details())
            context.abort(exc.code(), f"call to another service failed: {exc.details()}")
    logger.error("%s failed", method, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


F = TypeVar("F", bound=Callable[..., Any])


def map_errors(method: F) -> F:
    """Decorates a servicer method (unary or streaming reply) so that an exception becomes a
    status instead of gRPC's generic UNKNOWN: ValueError -> INVALID_ARGUMENT with its message,
    PermissionDenied -> PERMISSION_DENIED,
    NotImplementedError -> UNIMPLEMENTED, UNAVAILABLE / DEADLINE_EXCEEDED from a call to another
    service -> the same code, anything else -> INTERNAL, logged with its traceback. A status the
    method set itself (context.abort) is kept. The context must be the last argument.
    """
    name = method.__qualname__

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(*args: Any) -> Any:
            try:
                yield from method(*args)
            except Exception as exc:
                _abort_with_status(exc, args[-1], name)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(*args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:
            _abort_with_status(exc, args[-1], name)

    return wrapper  # type: ignore[return-value]
