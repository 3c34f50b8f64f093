"""A crash is survived (issue 10 §1): kill -9 an env server, then the rollout server, then
redis-server in the middle of one `vla-rl train`, and the run still finishes every iteration
without a manual rerun. Real processes: the launcher, redis-server (AOF), a rollout server, an env
server and the learner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_shutdown import TINY, _descendants, _wait_for_line
from vla_rl.report import read_scalars

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 9


def _pid_of(launcher: int, needle: str) -> int:
    """The one process below `launcher` whose command line holds `needle`."""
    found = []
    for pid in _descendants(launcher):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(pid)
    assert len(found) == 1, (needle, found)
    return found[0]


@pytest.mark.slow
def test_killed_env_rollout_and_redis_are_restarted_and_the_run_finishes(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={tmp_path}",
         "runner.logger.experiment_name=run", f"runner.max_epochs={ITERATIONS}", *TINY],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = ""
    try:
        out += _wait_for_line(proc, f"iter    2/{ITERATIONS}", timeout_s=300)
        os.kill(_pid_of(proc.pid, "services.env_server.main"), signal.SIGKILL)
        out += _wait_for_line(proc, "env0 is back", timeout_s=180)
        out += _wait_for_line(proc, f"iter    4/{ITERATIONS}", timeout_s=180)
        os.kill(_pid_of(proc.pid, "services.rollout_server.main"), signal.SIGKILL)
        out += _wait_for_line(proc, "rollout0 is back", timeout_s=180)
        out += _wait_for_line(proc, f"iter    6/{ITERATIONS}", timeout_s=180)
        os.kill(_pid_of(proc.pid, "redis-server"), signal.SIGKILL)
        out += _wait_for_line(proc, "redis is back", timeout_s=180)
        code = proc.wait(timeout=300)
        out += proc.stdout.read() or ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, out[-4000:]
    for name in ("env0", "rollout0", "redis"):
        assert f"{name} was killed by SIGKILL; restarting it (1 of 3)" in out
    # Every iteration ran once, in order: the policy version never went backwards.
    lines = [line.split()[1] for line in out.splitlines() if line.startswith("iter ")]
    assert lines == [f"{i}/{ITERATIONS}" for i in range(1, ITERATIONS + 1)], lines

    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == {"env0": 1, "rollout0": 1, "redis": 1}
    assert summary["lost_envs"] == 2  # the env server's in-flight episodes
    assert [r["policy_version"] for r in summary["rollout"]] == [ITERATIONS]
    buffer = summary["buffer"]
    assert buffer["pending"] == 0 and buffer["dead_letters"] == 0
    # Segment accounting from the learner's own counters: each entry in the stream was trained
    # on once or dropped as stale or a repeat, except repeats of the last iteration that nobody
    # read (the restarted env server rewrote at most its 2 segments of one iteration).
    scalars = read_scalars(run_dir / "tensorboard")
    trained = 2 * ITERATIONS
    dropped = sum(
        scalars[key][-1][1]
        for key in ("rollout/stale_segments_dropped", "rollout/duplicate_segments_dropped")
    )
    assert scalars["rollout/foreign_segments_rejected"][-1][1] == 0
    unread = buffer["length"] - trained - dropped
    assert 0 <= unread <= 2, (buffer, dropped)


@pytest.mark.slow
def test_a_killed_learner_resumes_in_place_from_its_checkpoint(tmp_path):
    """With runner.save_interval=1 every pushed version is checkpointed first, so a learner killed
    with SIGKILL restarts at the version the rollout serves and the run finishes."""
    iterations = 6
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={tmp_path}",
         "runner.logger.experiment_name=run", f"runner.max_epochs={iterations}",
         "runner.save_interval=1", *TINY],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = ""
    try:
        out += _wait_for_line(proc, f"iter    2/{iterations}", timeout_s=300)
        os.kill(_pid_of(proc.pid, "services.learner.main"), signal.SIGKILL)
        code = proc.wait(timeout=300)
        out += proc.stdout.read() or ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, out[-4000:]
    assert "the learner was killed by SIGKILL; restarting it from version" in out
    done = [int(line.split()[1].split("/")[0]) for line in out.splitlines()
            if line.startswith("iter ")]  # fmt: skip
    assert done == sorted(set(done)) and done[-1] == iterations, done  # never backwards
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["restarts"] == {"learner": 1}
    assert [r["policy_version"] for r in summary["rollout"]] == [iterations]
    assert summary["buffer"]["pending"] == 0 and summary["buffer"]["dead_letters"] == 0
