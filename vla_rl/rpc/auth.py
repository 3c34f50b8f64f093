"""Bearer-token authentication and TLS for our gRPC servers and channels (vla_rl.security says
where the credentials come from)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from vla_rl.security import Credentials

logger = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
# Health checks answer without a token: Kubernetes' native gRPC probes and load balancers cannot
# send one, and the answer (SERVING or not) tells nothing about the run.
_OPEN_SERVICES = (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,)


def _open(method: str) -> bool:
    """`method` is "/package.Service/Method"."""
    return method.lstrip("/").split("/", 1)[0] in _OPEN_SERVICES


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <token>` with UNAUTHENTICATED, before
    the servicer sees its request. The comparison takes the same time for any wrong token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: tuple) -> bool:
        for key, value in metadata or ():
            if key == AUTH_HEADER:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or _open(method)
            or self._authorized(handler_call_details.invocation_metadata)
        ):
            return handler
        logger.warning("%s: refused a call without a valid bearer token", method)
        return _refusal(handler)


def _deny(_request: Any, context: grpc.ServicerContext) -> None:
    # Never echo what was sent: it may be a real token for another run.
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or streaming, each way) that aborts."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        _deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call of a channel. An interceptor rather than call credentials:
    gRPC attaches call credentials only on TLS channels, and the local default is plaintext on
    the loopback interface."""

    def __init__(self, token: str) -> None:
        self._header = (AUTH_HEADER, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def server_interceptors(creds: Credentials) -> list[grpc.ServerInterceptor]:
    return [TokenInterceptor(creds.token)] if creds.token else []


def server_credentials(creds: Credentials) -> grpc.ServerCredentials | None:
    """TLS for a server's port (None: plaintext)."""
    if not creds.tls_server:
        return None
    return grpc.ssl_server_credentials(
        [(creds.tls_key, creds.tls_cert)],
        root_certificates=creds.tls_ca if creds.client_auth else None,
        require_client_auth=creds.client_auth,
    )


def secure_channel_options(creds: Credentials) -> dict[str, str]:
    return {"grpc.ssl_target_name_override": creds.server_name} if creds.server_name else {}


def channel_credentials(creds: Credentials) -> grpc.ChannelCredentials | None:
    """TLS for a channel (None: plaintext). The client presents its own certificate only where
    servers ask for one (mutual TLS)."""
    if not creds.tls_client:
        return None
    mutual = creds.client_auth and creds.tls_cert is not None
    return grpc.ssl_channel_credentials(
        root_certificates=creds.tls_ca,
        private_key=creds.tls_key if mutual else None,
        certificate_chain=creds.tls_cert if mutual else None,
    )


def with_token(channel: grpc.Channel, creds: Credentials) -> grpc.Channel:
    return grpc.intercept_channel(channel, _BearerToken(creds.token)) if creds.token else channel
