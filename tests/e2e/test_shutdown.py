"""Start-up and shutdown of `vla-rl train` as a user meets them (issue 10 §3): SIGTERM stops every
service as Ctrl-C does, a second Ctrl-C during the shutdown cannot leave children behind, and a
service that dies at start-up is reported at once with its log (not after the 300 s health wait).
Real processes: the launcher, a redis-server, a rollout server, an env server and the learner."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "env.train.total_num_envs=2",
    "env.train.max_episode_steps=4",
    "env.train.max_steps_per_rollout_epoch=4",
    "actor.micro_batch_size=4",
    "actor.global_batch_size=8",
]


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _assert_all_exit(pids: set[int], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "a service outlived vla-rl train"


def _port_free(target: str) -> bool:
    """Nothing listens on `target`. SO_REUSEADDR: a server that closed its connections first
    leaves them in TIME_WAIT on its port for a minute, which a plain bind also refuses; a
    listening socket still makes this bind fail."""
    host, port = target.rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def _start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={tmp_path}",
         "runner.logger.experiment_name=run", *TINY, *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for_line(proc: subprocess.Popen, needle: str | re.Pattern, timeout_s: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout_s
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if needle.search(line) if isinstance(needle, re.Pattern) else needle in line:
                return "".join(seen)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.1)
    raise AssertionError(f"no {needle!r} within {timeout_s} s:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_sigterm_then_ctrl_c_during_shutdown_stops_every_service(tmp_path):
    proc = _start(tmp_path, "runner.max_epochs=1000")
    try:
        _wait_for_line(proc, "iter    1/1000", timeout_s=300)
        children = _descendants(proc.pid)
        assert len(children) >= 3  # rollout server, env server, learner (and redis-server)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # a second, impatient Ctrl-C while services stop
        code = proc.wait(timeout=60)
        out = proc.stdout.read() or ""
        assert code == 130, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted: stopping every service" in out
    _assert_all_exit(children)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for target in config["rollout"]["addresses"]:
        assert _port_free(target), f"{target} is still bound"


@pytest.mark.slow
def test_a_service_that_dies_at_start_up_is_reported_at_once(tmp_path):
    """A rollout server that cannot build its model exits at once; the launcher says which
    service died, with its log's last lines, within seconds (it used to wait out the 300 s
    health timeout)."""
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")  # readable, but no model in it
    start = time.monotonic()
    proc = _start(tmp_path, "runner.max_epochs=1", f"actor.model.model_path={bad}")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "rollout0 exited with code" in out, out[-3000:]
    assert "Traceback" in out  # the log's last lines come with it
    assert time.monotonic() - start < 120


@pytest.mark.parametrize("content", [None, "{ not json"])
def test_a_missing_or_unreadable_model_path_is_one_line_before_anything_starts(tmp_path, content):
    model = tmp_path / "model"
    if content is not None:
        model.mkdir()
        (model / "config.json").write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={tmp_path}",
         f"actor.model.model_path={model}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("config error: actor.model.model_path") and str(model) in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("logs"))  # no service was started


@pytest.mark.parametrize(
    "override, key",
    [
        ("env.train.task_ids=[PushCube-v9]", "env.train.task_ids"),
        ("env.eval.task_ids=[NoSuchTask-v1]", "env.eval.task_ids"),
    ],
)
def test_an_unknown_task_is_a_config_error_before_anything_starts(tmp_path, override, key):
    proc = subprocess.run(
        [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={tmp_path}",
         override],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"config error: {key}") and "unknown task" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("logs"))  # no service was started


@pytest.mark.slow
def test_a_rerun_after_a_stop_without_checkpoint_finishes(tmp_path):
    """Stopped after iteration 1 (save_interval -1: only at the end), the run checkpoints the
    last iteration it trained. With that checkpoint removed (as after a crash), the same command
    run again starts at iteration 0 on the same Redis stream (AOF in the run directory) and
    finishes. Segment ids used to repeat across launches: the rerun's were dropped as
    duplicates of acked ones and the learner waited for segments forever."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    overrides = ("runner.max_epochs=3", "runner.save_interval=-1", "buffer.backend=redis")
    first = _start(tmp_path, *overrides)
    try:
        out = _wait_for_line(first, "iter    1/3", timeout_s=300)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 130
        out += first.stdout.read() or ""  # the learner logs to the launcher's console
    finally:
        if first.poll() is None:
            first.kill()
    checkpoints = tmp_path / "run" / "checkpoints"
    (saved,) = checkpoints.glob("global_step_*")  # the end of a stopped run is an end too
    last = int(saved.name.removeprefix("global_step_"))
    assert last in (1, 2) and f"stopped at iteration {last}: saved" in out, out[-3000:]
    # ... and reports like a finished run: the summary and the learning curve.
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env"] and summary["env"][0]["episodes"] > 0
    shutil.rmtree(checkpoints)
    rerun = _start(tmp_path, *overrides)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    assert "iter    1/3" in out and "iter    3/3" in out
    assert (tmp_path / "run" / "checkpoints" / "global_step_3").is_dir()


@pytest.mark.slow
def test_a_learner_killed_with_sigkill_is_reported_and_everything_stops(tmp_path):
    """kill -9 of the learner used to end `vla-rl train` with no message at all."""
    proc = _start(tmp_path, "runner.max_epochs=1000")
    try:
        _wait_for_line(proc, "iter    1/1000", timeout_s=300)
        children = _descendants(proc.pid)
        (learner,) = [
            p for p in children
            if b"services.learner.main" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]  # fmt: skip
        os.kill(learner, signal.SIGKILL)
        assert proc.wait(timeout=60) == 137
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the learner was killed by SIGKILL" in out and "resumes from the latest" in out
    _assert_all_exit(children)
