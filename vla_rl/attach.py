"""`vla-rl attach`: drive a training run on services that something else started and restarts
(docker compose, Kubernetes, or by hand on several machines), as `vla-rl train` drives the ones
it launches itself: wait for every service, start collection on each env server at the learner's
iteration, start it again on an env server that comes back empty after a restart, stop on a
failed collection, and write summary.json once the rollout serves the final policy.

The services are given by address: rollout servers and the buffer from the config
(`rollout.addresses`, `buffer.url`), env servers and the learner as flags.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from vla_rl.config import ConfigError, TrainConfig, load_config
from vla_rl.launch import _start_collection, collection_request, run_summary
from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel, wait_for_health
from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc, learner_pb2, learner_pb2_grpc
from vla_rl.rpc.rollout_client import RolloutClient

POLL_S = 2.0


@dataclass
class Service:
    """A service this process did not start: its name and gRPC address."""

    name: str
    target: str


def _call(target: str, stub_cls, method: str, request):
    with make_channel(target) as channel:
        return getattr(stub_cls(channel), method)(request, timeout=DEFAULT_DEADLINE_S["status"])


def learner_status(target: str) -> learner_pb2.LearnerStatus | None:
    """The learner's status, or None while it does not answer (restarting, or finished)."""
    try:
        return _call(target, learner_pb2_grpc.LearnerServiceStub, "GetStatus",
                     learner_pb2.LearnerStatusRequest())  # fmt: skip
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None
        raise


def env_status(target: str) -> env_pb2.CollectionStatus | None:
    try:
        return _call(target, env_pb2_grpc.EnvServiceStub, "GetStatus", env_pb2.GetStatusRequest())
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None
        raise


def served_version(targets: list[str]) -> int | None:
    """The lowest policy version the rollout replicas serve; None if one does not answer."""
    versions = []
    for target in targets:
        client = RolloutClient(target)
        try:
            versions.append(int(client.policy().policy_version))
        except grpc.RpcError:
            return None
        finally:
            client.close()
    return min(versions)


def check_attachable(cfg: TrainConfig, env_targets: list[str]) -> None:
    if not cfg.rollout.addresses:
        raise ConfigError("rollout.addresses", "vla-rl attach needs the rollout servers' addresses")
    if not cfg.buffer.url:
        raise ConfigError("buffer.url", "vla-rl attach needs the buffer the services share")
    if len(env_targets) != cfg.env.train.num_servers:
        raise ConfigError(
            "env.train.num_servers",
            f"is {cfg.env.train.num_servers} but {len(env_targets)} env servers were given",
        )


def attach(
    config_path: str | None,
    overrides: list[str],
    env_targets: list[str],
    learner_target: str,
    wait_s: float = 600.0,
    log=print,
) -> int:
    cfg = load_config(config_path, overrides)
    check_attachable(cfg, env_targets)
    envs = [Service(f"env{i}", t) for i, t in enumerate(env_targets)]
    rollouts = list(cfg.rollout.addresses)
    for name, target in [*((e.name, e.target) for e in envs), ("learner", learner_target),
                         *((f"rollout{i}", t) for i, t in enumerate(rollouts))]:  # fmt: skip
        try:
            wait_for_health(target, timeout_s=wait_s)
        except TimeoutError as e:
            raise SystemExit(f"vla-rl attach: {name} at {target} is not serving: {e}") from None
    total = cfg.runner.max_epochs
    log(f"vla-rl attach: {len(envs)} env servers, {len(rollouts)} rollout servers, learner at "
        f"{learner_target}; {total} iterations")  # fmt: skip
    last_seen = time.monotonic()
    reported = -1
    while True:
        status = learner_status(learner_target)
        served = served_version(rollouts)
        if served is not None and served >= total and (status is None or status.phase == "done"):
            break
        now = time.monotonic()
        if status is None:
            if now - last_seen > wait_s:
                log(f"vla-rl attach: the learner at {learner_target} has not answered for "
                    f"{wait_s:.0f} s before the last iteration")  # fmt: skip
                return 1
        else:
            last_seen = now
            if status.iteration != reported:
                reported = status.iteration
                log(f"vla-rl attach: iteration {status.iteration}/{total}, rollout serves "
                    f"{served if served is not None else '?'}")  # fmt: skip
            failed = _start_where_needed(cfg, envs, rollouts, int(status.iteration), log)
            if failed:
                log(f"vla-rl attach: {failed}")
                return 1
        time.sleep(POLL_S)
    summary = run_summary(cfg, envs)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"vla-rl attach: done; the rollout serves version {served}; {out / 'summary.json'}")
    return 0


def _start_where_needed(
    cfg: TrainConfig, envs: list[Service], rollouts: list[str], iteration: int, log
) -> str:
    """StartCollection on every env server that has never collected (a new or restarted
    process), from the learner's iteration; the error of a failed collection, else ""."""
    for i, env in enumerate(envs):
        status = env_status(env.target)
        if status is None:
            continue  # restarting; started once it answers
        if status.state == "failed":
            return f"{env.name} collection failed: {status.error}"
        if status.state == "idle" and status.segments_written == 0:
            fields = collection_request(cfg, i, rollouts[i % len(rollouts)], iteration)
            _start_collection([env], [fields])
            log(f"vla-rl attach: {env.name} collects from iteration {iteration}")
    return ""
