"""`vla-rl attach` drives a run on services it did not start, as docker compose or Kubernetes
would start them (here: by hand, as real processes on loopback, with the flags `launch_plan`
gives `vla-rl train`): it starts collection at the learner's iteration, starts it again on an env
server that was killed and brought back by someone else, and finishes when the rollout serves
the final policy."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.e2e.test_shutdown import TINY, _wait_for_line
from vla_rl.config import dump_yaml, load_config
from vla_rl.launch import free_port, launch_plan
from vla_rl.models import tiny_config
from vla_rl.models.tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 8  # room for the env restart: attach polls, so it may see iterations skip by


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_attach_drives_services_started_elsewhere_and_survives_an_env_restart(tmp_path):
    port = free_port()
    procs: list[subprocess.Popen] = [subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )]  # fmt: skip
    attach = None
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        model = write_tiny_checkpoint(tmp_path / "model", tiny_config(), seed=0)
        cfg = load_config(None, [f"runner.logger.log_path={tmp_path}", "runner.logger.experiment_name=run",
                                 f"runner.max_epochs={ITERATIONS}", *TINY])  # fmt: skip
        plan = launch_plan(cfg, 0, model_path=str(model), buffer_url=f"redis://127.0.0.1:{port}/0")
        run_dir = Path(plan.config.run_dir)
        run_dir.mkdir(parents=True)
        dump_yaml(plan.config, run_dir / "config.yaml")
        (rollout,), (env,) = plan.rollout, plan.env
        procs.append(_start(rollout.args, tmp_path / "rollout.log"))
        env_proc = _start(env.args, tmp_path / "env.log")
        procs.append(_start(plan.learner.args, tmp_path / "learner.log"))
        attach = subprocess.Popen(
            [sys.executable, "-m", "vla_rl.cli", "attach", "--config", str(run_dir / "config.yaml"),
             "--env", env.target, "--learner", plan.learner.target],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # The first iteration past 0 that attach reports (it polls, so it may skip some); the
        # learner needs the env for the ones after it (max_staleness 0: no segments ahead).
        out = _wait_for_line(attach, re.compile(rf"iteration [1-9]/{ITERATIONS}"), timeout_s=300)
        env_proc.send_signal(signal.SIGKILL)  # what an orchestrator's restart policy sees
        env_proc.wait()
        env_proc = _start(env.args, tmp_path / "env.log")
        procs.append(env_proc)
        code = attach.wait(timeout=300)
        out += attach.stdout.read() or ""
        assert code == 0, out[-3000:]
    finally:
        if attach is not None and attach.poll() is None:
            attach.kill()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    assert out.count("env0 collects from iteration") == 2, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["policy_version"] for r in summary["rollout"]] == [ITERATIONS]
    assert summary["buffer"]["pending"] == 0 and summary["buffer"]["dead_letters"] == 0
