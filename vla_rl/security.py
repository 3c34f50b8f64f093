"""Credentials of one process: the bearer token every gRPC call carries, TLS files, and the Redis
user and password. They come from environment variables (never from a command line, which `ps`
shows to every user of the machine, and never from the run's config, which is written to disk):

    VLA_RL_TOKEN or VLA_RL_TOKEN_FILE   bearer token; servers refuse calls without it
                                        (UNAUTHENTICATED), clients send it
    VLA_RL_TLS_CERT, VLA_RL_TLS_KEY     PEM files: this process's certificate chain and key.
                                        Servers listen with TLS; with VLA_RL_TLS_CLIENT_AUTH=1
                                        clients present them too (mutual TLS)
    VLA_RL_TLS_CA                       PEM file: the CA clients check server certificates
                                        against (and servers check client ones, with mTLS).
                                        Set alone, clients use TLS and servers stay plaintext
    VLA_RL_TLS_CLIENT_AUTH              "1": servers require a client certificate signed by the CA
    VLA_RL_TLS_SERVER_NAME              the name clients expect in server certificates, when it
                                        is not the host of the address they dial
    VLA_RL_REDIS_USERNAME, VLA_RL_REDIS_PASSWORD or VLA_RL_REDIS_PASSWORD_FILE
                                        a Redis ACL user (or only a password: `requirepass`)

`vla-rl train` and `vla-rl eval` generate a random token (and a Redis password for the
redis-server they start) for every run when none is set, and hand them to their children
through the environment: the local default needs no configuration and still keeps other users of
the machine out. `current()` is what this process uses; `use()` sets it for a block.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

TOKEN_ENV = "VLA_RL_TOKEN"
TOKEN_FILE_ENV = "VLA_RL_TOKEN_FILE"
TLS_CERT_ENV = "VLA_RL_TLS_CERT"
TLS_KEY_ENV = "VLA_RL_TLS_KEY"
TLS_CA_ENV = "VLA_RL_TLS_CA"
TLS_CLIENT_AUTH_ENV = "VLA_RL_TLS_CLIENT_AUTH"
TLS_SERVER_NAME_ENV = "VLA_RL_TLS_SERVER_NAME"
REDIS_USERNAME_ENV = "VLA_RL_REDIS_USERNAME"
REDIS_PASSWORD_ENV = "VLA_RL_REDIS_PASSWORD"
REDIS_PASSWORD_FILE_ENV = "VLA_RL_REDIS_PASSWORD_FILE"


class CredentialsError(ValueError):
    """A credential variable is malformed or names a file that cannot be read."""


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None
    client_auth: bool = False
    server_name: str | None = None
    redis_username: str | None = None
    redis_password: str | None = None

    def __repr__(self) -> str:  # secrets never reach a log through a repr
        shown = {
            "token": self.token is not None,
            "tls": self.tls_cert is not None,
            "ca": self.tls_ca is not None,
            "client_auth": self.client_auth,
            "redis_password": self.redis_password is not None,
        }
        return "Credentials(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"

    @property
    def tls_server(self) -> bool:
        """Servers listen with TLS."""
        return self.tls_cert is not None

    @property
    def tls_client(self) -> bool:
        """Clients dial with TLS."""
        return self.tls_cert is not None or self.tls_ca is not None


def _read(environ: Mapping[str, str], name: str) -> bytes | None:
    path = environ.get(name)
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CredentialsError(f"{name}={path} cannot be read: {e.strerror}") from None


def from_env(environ: Mapping[str, str] = os.environ) -> Credentials:
    """The credentials the variables above describe; CredentialsError names the bad variable."""
    token = environ.get(TOKEN_ENV) or None
    token_file = _read(environ, TOKEN_FILE_ENV)
    if token is not None and token_file is not None:
        raise CredentialsError(f"set {TOKEN_ENV} or {TOKEN_FILE_ENV}, not both")
    if token_file is not None:
        token = token_file.decode("utf-8", "replace").strip()
        if not token:
            raise CredentialsError(f"{TOKEN_FILE_ENV}={environ[TOKEN_FILE_ENV]} is empty")
    if token is not None and (any(c.isspace() for c in token) or not token.isprintable()):
        raise CredentialsError(f"{TOKEN_ENV}: a token is printable ASCII without spaces")
    cert, key = _read(environ, TLS_CERT_ENV), _read(environ, TLS_KEY_ENV)
    if (cert is None) != (key is None):
        raise CredentialsError(f"{TLS_CERT_ENV} and {TLS_KEY_ENV} are set together")
    client_auth = environ.get(TLS_CLIENT_AUTH_ENV, "0")
    if client_auth not in ("0", "1"):
        raise CredentialsError(f"{TLS_CLIENT_AUTH_ENV} is 0 or 1, not {client_auth!r}")
    ca = _read(environ, TLS_CA_ENV)
    if client_auth == "1" and (ca is None or cert is None):
        raise CredentialsError(
            f"{TLS_CLIENT_AUTH_ENV}=1 needs {TLS_CA_ENV}, {TLS_CERT_ENV} and {TLS_KEY_ENV}"
        )
    redis_password = environ.get(REDIS_PASSWORD_ENV) or None
    password_file = _read(environ, REDIS_PASSWORD_FILE_ENV)
    if redis_password is not None and password_file is not None:
        raise CredentialsError(f"set {REDIS_PASSWORD_ENV} or {REDIS_PASSWORD_FILE_ENV}, not both")
    if password_file is not None:
        redis_password = password_file.decode("utf-8", "replace").strip() or None
    return Credentials(
        token=token,
        tls_cert=cert,
        tls_key=key,
        tls_ca=ca,
        client_auth=client_auth == "1",
        server_name=environ.get(TLS_SERVER_NAME_ENV) or None,
        redis_username=environ.get(REDIS_USERNAME_ENV) or None,
        redis_password=redis_password,
    )


_override: Credentials | None = None


def current() -> Credentials:
    """What this process uses: the credentials set by `use`, else the environment's."""
    return _override if _override is not None else from_env()


@contextmanager
def use(credentials: Credentials) -> Iterator[Credentials]:
    """Every channel, server and Redis client made inside uses `credentials`."""
    global _override
    previous, _override = _override, credentials
    try:
        yield credentials
    finally:
        _override = previous


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def for_run(environ: Mapping[str, str], *, local_redis: bool) -> tuple[Credentials, dict[str, str]]:
    """The credentials of one `vla-rl train` / `vla-rl eval` and the variables its children get:
    the environment's, plus a fresh token when none is set and a fresh Redis password for a
    redis-server the launcher starts itself."""
    creds = from_env(environ)
    child_env: dict[str, str] = {}
    if creds.token is None:
        creds = replace(creds, token=new_secret())
        child_env[TOKEN_ENV] = creds.token
    if local_redis:  # its default user gets the password (launch.write_redis_acl)
        creds = replace(creds, redis_username=None, redis_password=new_secret())
        child_env[REDIS_USERNAME_ENV] = child_env[REDIS_PASSWORD_FILE_ENV] = ""
        child_env[REDIS_PASSWORD_ENV] = creds.redis_password
    return creds, child_env


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***, for logs and summaries."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
