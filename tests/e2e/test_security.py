"""A whole `vla-rl train` run with TLS and a bearer token from a file (issue 10 §5): it trains,
every service refuses calls without the token and plaintext connections, the redis-server the
launcher started refuses clients without this run's password, and no secret reaches a log.
Real processes: the launcher, redis-server, a rollout server, an env server and the learner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.test_shutdown import TINY, _descendants, _wait_for_line
from tests.helpers.tls import write_tls_files
from vla_rl import security
from vla_rl.rpc.client import make_channel
from vla_rl.rpc.gen.v1 import (
    env_pb2,
    env_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-3f9a2c"


def _service_ports(pid: int) -> dict[str, int]:
    """'rollout' / 'env' / 'learner' -> port, from the command lines below `pid`."""
    ports = {}
    for child in _descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "--port" not in argv:
            continue
        port = int(argv[argv.index("--port") + 1])
        for name in ("rollout_server", "env_server", "learner"):
            if f"services.{name}.main" in argv:
                ports[name.split("_")[0]] = port
    return ports


def _status_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _calls(channel: grpc.Channel) -> dict[str, object]:
    """A read-only call on each of our services, by service."""
    return {
        "rollout": lambda: rollout_pb2_grpc.RolloutServiceStub(channel).GetPolicy(
            rollout_pb2.GetPolicyRequest(), timeout=10
        ),
        "env": lambda: env_pb2_grpc.EnvServiceStub(channel).GetStatus(
            env_pb2.GetStatusRequest(), timeout=10
        ),
        "learner": lambda: learner_pb2_grpc.LearnerServiceStub(channel).GetStatus(
            learner_pb2.LearnerStatusRequest(), timeout=10
        ),
    }


@pytest.mark.slow
def test_tls_and_token_run_refuses_strangers_and_keeps_secrets_out_of_logs(tmp_path):
    tls = write_tls_files(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = dict(
        os.environ,
        **{
            security.TOKEN_FILE_ENV: str(token_file),
            security.TLS_CERT_ENV: str(tls["server"]),
            security.TLS_KEY_ENV: str(tls["server_key"]),
            security.TLS_CA_ENV: str(tls["ca"]),
        },
    )
    env.pop(security.TOKEN_ENV, None)
    run = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={run}",
         "runner.logger.experiment_name=run", "runner.max_epochs=1000", *TINY],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # Iteration 2 needs the adapter of iteration 1 pushed to the rollout server and segments
        # through the ACL-protected Redis: every link of the loop works with TLS and the token.
        out = _wait_for_line(proc, "iter    2/1000", timeout_s=300)
        ports = _service_ports(proc.pid)
        assert set(ports) == {"rollout", "env", "learner"}, ports
        buffer_url = yaml.safe_load((run / "run" / "config.yaml").read_text())["buffer"]["url"]

        trusted = security.Credentials(token=TOKEN, tls_ca=tls["ca"].read_bytes())
        no_token = security.Credentials(tls_ca=tls["ca"].read_bytes())
        plaintext = security.Credentials(token=TOKEN)
        for name in ("rollout", "env", "learner"):
            target = f"127.0.0.1:{ports[name]}"
            for creds, expected in ((trusted, grpc.StatusCode.OK),
                                    (no_token, grpc.StatusCode.UNAUTHENTICATED),
                                    (plaintext, grpc.StatusCode.UNAVAILABLE)):  # fmt: skip
                with make_channel(target, credentials=creds) as channel:
                    assert _status_code(_calls(channel)[name]) == expected, (name, creds)
            with make_channel(target, credentials=no_token) as channel:  # probes need no token
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

        stranger = redis.Redis.from_url(buffer_url, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            stranger.ping()
        stranger.close()
        conf = run / "run" / "redis" / "redis.conf"
        assert conf.stat().st_mode & 0o777 == 0o600
        password = conf.read_text().split(">", 1)[1].split()[0]
        assert len(password) >= 32

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        out += proc.stdout.read() or ""
    finally:
        if proc.poll() is None:  # a failed assertion: stop the run's services too
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    secrets = {"token": TOKEN, "redis password": password,
               "tls key": tls["server_key"].read_text().splitlines()[1]}  # fmt: skip
    logs = {"console": out}
    logs.update({str(p): p.read_text(errors="replace") for p in (run / "run" / "logs").iterdir()})
    for where, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in {where}"
