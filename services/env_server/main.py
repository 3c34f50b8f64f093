"""Entry point: `python -m services.env_server.main --port N`. Stateless: what to collect comes
with StartCollection."""

from __future__ import annotations

import argparse
import logging
import socket

from vla_rl.rpc import ENV_SERVICE
from vla_rl.rpc.gen.v1 import env_pb2_grpc
from vla_rl.rpc.server import add_health_and_reflection, bind, make_server, serve_until_signal
from vla_rl.telemetry import serve_metrics

from . import metrics
from .servicer import EnvServicer

log = logging.getLogger("vla_rl.env_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="An env server: ManiSkill3 envs streaming to rollout.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--server-id", default=None, help="names this server in segment ids")
    p.add_argument("--grace-s", type=float, default=5.0)
    p.add_argument("--task-modules", nargs="*", default=[],
                   help="user task modules (import paths) requests may name; importing runs "
                        "their code, so only these and the built-in OOD variants are allowed")  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free one; unset: off)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s env %(levelname)s %(message)s")
    args = parse_args(argv)
    servicer = EnvServicer(
        args.server_id or f"{socket.gethostname()}:{args.port}", task_modules=args.task_modules
    )
    server = make_server()
    env_pb2_grpc.add_EnvServiceServicer_to_server(servicer, server)
    add_health_and_reflection(server, [ENV_SERVICE])
    address = f"{args.host}:{args.port}"
    bind(server, address, "env server")
    if args.metrics_port is not None:
        serve_metrics(args.metrics_port, args.host, "env server")
        metrics.EVAL_SESSIONS.set_function(servicer.open_sessions)
    server.start()
    log.info("env server %s listening on %s", servicer.server_id, address)
    serve_until_signal(server, args.grace_s, on_stop=servicer.stop)


if __name__ == "__main__":
    main()
