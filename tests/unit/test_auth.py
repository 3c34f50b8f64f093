"""Bearer tokens and TLS on real gRPC servers and channels on loopback (issue 10 §5): a call
without the run's token is UNAUTHENTICATED on every kind of method and on every service, health
checks stay open for probes, TLS and mutual TLS refuse clients that cannot prove who they are,
and credential variables are checked with errors that name them."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.tls import write_tls_files
from vla_rl import security
from vla_rl.rpc import ENV_SERVICE, LEARNER_SERVICE
from vla_rl.rpc.client import make_channel
from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc, learner_pb2, learner_pb2_grpc
from vla_rl.rpc.server import add_health_and_reflection, bind, make_server

TOKEN = "run-token-123"
ECHO = "test.Echo"


def _echo_handler() -> grpc.GenericRpcHandler:
    """One method of each kind: unary, server stream, client stream, bidirectional."""

    def unary(request, _context):
        return request

    def server_stream(request, _context):
        yield request
        yield request

    def client_stream(requests, _context):
        return b"".join(requests)

    def bidi(requests, _context):
        yield from requests

    return grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


def _call_all(channel: grpc.Channel) -> dict[str, bytes]:
    """Calls each Echo method once; the replies by method name."""
    return {
        "Unary": channel.unary_unary(f"/{ECHO}/Unary")(b"a", timeout=5),
        "ServerStream": b"".join(channel.unary_stream(f"/{ECHO}/ServerStream")(b"b", timeout=5)),
        "ClientStream": channel.stream_unary(f"/{ECHO}/ClientStream")(
            iter([b"c", b"d"]), timeout=5
        ),
        "Bidi": b"".join(channel.stream_stream(f"/{ECHO}/Bidi")(iter([b"e", b"f"]), timeout=5)),
    }


def _status_of_each(channel: grpc.Channel) -> dict[str, grpc.StatusCode]:
    calls = {
        "Unary": lambda: channel.unary_unary(f"/{ECHO}/Unary")(b"a", timeout=5),
        "ServerStream": lambda: list(
            channel.unary_stream(f"/{ECHO}/ServerStream")(b"b", timeout=5)
        ),
        "ClientStream": lambda: channel.stream_unary(f"/{ECHO}/ClientStream")(
            iter([b"c"]), timeout=5
        ),
        "Bidi": lambda: list(channel.stream_stream(f"/{ECHO}/Bidi")(iter([b"e"]), timeout=5)),
    }
    codes = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[name] = e.code()
    return codes


@pytest.fixture
def echo_server():
    """An Echo server with health, made with a token; yields (target, credentials)."""
    servers = []

    def start(creds: security.Credentials) -> str:
        server = make_server(max_workers=4, credentials=creds)
        server.add_generic_rpc_handlers([_echo_handler()])
        add_health_and_reflection(server, [ECHO])
        port = bind(server, "127.0.0.1:0", "echo")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_every_kind_of_call_needs_the_token(echo_server):
    target = echo_server(security.Credentials(token=TOKEN))
    with make_channel(target, credentials=security.Credentials()) as anonymous:
        assert set(_status_of_each(anonymous).values()) == {grpc.StatusCode.UNAUTHENTICATED}
        # Health checks answer without a token (Kubernetes probes cannot send one).
        assert _health(anonymous) == health_pb2.HealthCheckResponse.SERVING
    with make_channel(target, credentials=security.Credentials(token="wrong")) as wrong:
        assert set(_status_of_each(wrong).values()) == {grpc.StatusCode.UNAUTHENTICATED}
    with make_channel(target, credentials=security.Credentials(token=TOKEN)) as good:
        assert _call_all(good) == {
            "Unary": b"a",
            "ServerStream": b"bb",
            "ClientStream": b"cd",
            "Bidi": b"ef",
        }


def test_refusal_does_not_echo_the_token_sent(echo_server):
    target = echo_server(security.Credentials(token=TOKEN))
    secret = "another-runs-real-token"
    with make_channel(target, credentials=security.Credentials(token=secret)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/{ECHO}/Unary")(b"a", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert secret not in (info.value.details() or "")


def test_reflection_needs_the_token_too(echo_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    target = echo_server(security.Credentials(token=TOKEN))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for creds, expected in ((security.Credentials(), grpc.StatusCode.UNAUTHENTICATED),
                            (security.Credentials(token=TOKEN), grpc.StatusCode.OK)):  # fmt: skip
        with make_channel(target, credentials=creds) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            try:
                list(stub.ServerReflectionInfo(iter([request]), timeout=5))
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
        assert code == expected


def test_real_env_and_learner_services_refuse_calls_without_the_token():
    """The servicers of two of our services behind make_server (the rollout server's is in
    tests/e2e/test_security.py, with a model loaded)."""
    from services.env_server.servicer import EnvServicer

    creds = security.Credentials(token=TOKEN)
    server = make_server(max_workers=4, credentials=creds)
    env_pb2_grpc.add_EnvServiceServicer_to_server(EnvServicer("env-test"), server)

    class Learner(learner_pb2_grpc.LearnerServiceServicer):
        def GetStatus(self, request, context):
            return learner_pb2.LearnerStatus()

    learner_pb2_grpc.add_LearnerServiceServicer_to_server(Learner(), server)
    add_health_and_reflection(server, [ENV_SERVICE, LEARNER_SERVICE])
    port = bind(server, "127.0.0.1:0", "test")
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        for token, expected in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                (TOKEN, grpc.StatusCode.OK)):  # fmt: skip
            with make_channel(target, credentials=security.Credentials(token=token)) as ch:
                for call in (
                    lambda: env_pb2_grpc.EnvServiceStub(ch).GetStatus(
                        env_pb2.GetStatusRequest(), timeout=5
                    ),
                    lambda: learner_pb2_grpc.LearnerServiceStub(ch).GetStatus(
                        learner_pb2.LearnerStatusRequest(), timeout=5
                    ),
                ):
                    try:
                        call()
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        code = e.code()
                    assert code == expected
    finally:
        server.stop(None)


def _tls(files, *, mutual: bool = False, client: str = "server", **extra) -> security.Credentials:
    env = {
        security.TLS_CERT_ENV: str(files[client]),
        security.TLS_KEY_ENV: str(files[f"{client}_key"]),
        security.TLS_CA_ENV: str(files["ca"]),
        security.TOKEN_ENV: TOKEN,
        **extra,
    }
    if mutual:
        env[security.TLS_CLIENT_AUTH_ENV] = "1"
    return security.from_env(env)


def test_tls_server_refuses_plaintext_and_serves_clients_that_trust_its_ca(echo_server, tmp_path):
    files = write_tls_files(tmp_path)
    target = echo_server(_tls(files))
    with make_channel(target, credentials=security.Credentials(token=TOKEN)) as plaintext:
        assert set(_status_of_each(plaintext).values()) == {grpc.StatusCode.UNAVAILABLE}
    # A client trusting only the CA (no certificate of its own) is enough without mTLS.
    ca_only = security.from_env({security.TLS_CA_ENV: str(files["ca"]), security.TOKEN_ENV: TOKEN})
    with make_channel(target, credentials=ca_only) as channel:
        assert _call_all(channel)["Unary"] == b"a"
    (tmp_path / "other").mkdir()
    other_ca = write_tls_files(tmp_path / "other")
    untrusting = security.from_env({security.TLS_CA_ENV: str(other_ca["ca"])})
    with make_channel(target, credentials=untrusting) as channel:
        assert set(_status_of_each(channel).values()) == {grpc.StatusCode.UNAVAILABLE}


def test_mutual_tls_requires_a_client_certificate(echo_server, tmp_path):
    files = write_tls_files(tmp_path)
    target = echo_server(_tls(files, mutual=True))
    ca_only = security.from_env({security.TLS_CA_ENV: str(files["ca"]), security.TOKEN_ENV: TOKEN})
    with make_channel(target, credentials=ca_only) as channel:
        assert set(_status_of_each(channel).values()) == {grpc.StatusCode.UNAVAILABLE}
    with make_channel(target, credentials=_tls(files, mutual=True, client="client")) as channel:
        assert _call_all(channel)["Bidi"] == b"ef"


def test_server_name_override_for_certificates_of_another_name(echo_server, tmp_path):
    files = write_tls_files(tmp_path)
    target = echo_server(_tls(files))
    # Dialled as "localhost": the certificate names it; as 127.0.0.1 with an override to a name
    # the certificate lacks, the handshake fails.
    port = target.rsplit(":", 1)[1]
    with make_channel(f"localhost:{port}", credentials=_tls(files)) as channel:
        assert _call_all(channel)["Unary"] == b"a"
    wrong = _tls(files, **{security.TLS_SERVER_NAME_ENV: "not-in-the-cert.example"})
    with make_channel(target, credentials=wrong) as channel:
        assert set(_status_of_each(channel).values()) == {grpc.StatusCode.UNAVAILABLE}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({security.TOKEN_ENV: "a b"}, security.TOKEN_ENV),
        ({security.TOKEN_FILE_ENV: "/nonexistent/token"}, security.TOKEN_FILE_ENV),
        ({security.TLS_CERT_ENV: "/nonexistent/cert.pem"}, security.TLS_CERT_ENV),
        ({security.TLS_CLIENT_AUTH_ENV: "yes"}, security.TLS_CLIENT_AUTH_ENV),
        ({security.TLS_CLIENT_AUTH_ENV: "1"}, security.TLS_CLIENT_AUTH_ENV),
    ],
)
def test_bad_credential_variables_are_named(env, named):
    with pytest.raises(security.CredentialsError, match=named):
        security.from_env(env)


def test_cert_without_key_and_both_token_sources_are_refused(tmp_path):
    files = write_tls_files(tmp_path)
    with pytest.raises(security.CredentialsError, match=security.TLS_KEY_ENV):
        security.from_env({security.TLS_CERT_ENV: str(files["server"])})
    token_file = tmp_path / "token"
    token_file.write_text(" file-token \n")
    assert security.from_env({security.TOKEN_FILE_ENV: str(token_file)}).token == "file-token"
    with pytest.raises(security.CredentialsError, match="not both"):
        security.from_env({security.TOKEN_FILE_ENV: str(token_file), security.TOKEN_ENV: "x"})


def test_a_run_gets_fresh_secrets_unless_the_user_set_a_token():
    creds, child_env = security.for_run({}, local_redis=True)
    assert creds.token and child_env[security.TOKEN_ENV] == creds.token
    assert child_env[security.REDIS_PASSWORD_ENV] == creds.redis_password
    again, _ = security.for_run({}, local_redis=True)
    assert again.token != creds.token and again.redis_password != creds.redis_password
    mine, child_env = security.for_run({security.TOKEN_ENV: "mine"}, local_redis=False)
    assert mine.token == "mine" and child_env == {}  # children inherit the user's variable
    assert "mine" not in repr(mine) and creds.redis_password not in repr(creds)


def test_redact_url_hides_only_the_password():
    assert security.redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert security.redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
