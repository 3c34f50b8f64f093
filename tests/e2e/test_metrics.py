"""Prometheus metrics of a real `vla-rl train` run: every service serves /metrics that
`promtool check metrics` accepts, with values that follow the run; the scrape config the launcher
writes passes `promtool check config`; and a real Prometheus server scrapes every service, loads
the alert rules, and returns data for every query of every Grafana dashboard."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_shutdown import TINY, _wait_for_line
from vla_rl.launch import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` of an exposition (labels given must match, others may exist)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in metric for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name}{labels} in the exposition")


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    reply = json.loads(_get(url))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason="prometheus is not installed")
def test_every_service_is_scraped_by_a_real_prometheus(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={tmp_path}",
         "runner.logger.experiment_name=run", "runner.max_epochs=1000", *TINY],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    prometheus = None
    try:
        _wait_for_line(proc, "iter    3/1000", timeout_s=300)
        config = tmp_path / "run" / "prometheus.yml"
        check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True,
                               text=True)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        jobs = {
            job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
            for job in yaml.safe_load(config.read_text())["scrape_configs"]
        }
        assert {k: len(v) for k, v in jobs.items()} == {
            "vla-rl-env": 1, "vla-rl-rollout": 1, "vla-rl-learner": 1
        }  # fmt: skip
        text = {job: _get(f"http://{targets[0]}/metrics") for job, targets in jobs.items()}
        for job, exposition in text.items():
            lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition,
                                  capture_output=True, text=True)  # fmt: skip
            assert lint.returncode == 0 and not lint.stdout.strip(), (job, lint.stdout, lint.stderr)
        env, rollout, learner = (text[f"vla-rl-{j}"] for j in ("env", "rollout", "learner"))
        assert _value(env, "vla_rl_env_steps_total", mode="train") >= 3 * 2 * 4
        assert _value(env, "vla_rl_env_segments_written_total") >= 6
        episodes = _value(env, "vla_rl_env_episodes_total", mode="train")
        assert _value(env, "vla_rl_env_episode_return_count", mode="train") == episodes >= 2
        assert _value(env, "vla_rl_env_collection_running") == 1
        assert _value(rollout, "vla_rl_rollout_actions_total") >= 3 * 2 * 4
        assert _value(rollout, "vla_rl_rollout_requests_total", code="OK") >= 12
        assert _value(rollout, "vla_rl_rollout_policy_version") >= 3
        assert _value(rollout, "vla_rl_rollout_adapter_pushes_total", result="loaded") >= 3
        assert _value(rollout, "vla_rl_rollout_adapter_load_seconds_count") >= 3
        assert _value(learner, "vla_rl_learner_iteration") >= 3
        assert _value(learner, "vla_rl_learner_samples_total") >= 3 * 2 * 4
        assert _value(learner, "vla_rl_learner_phase_seconds_total", phase="update") > 0
        assert _value(learner, "vla_rl_buffer_stream_entries") >= 6
        assert (
            _value(learner, "vla_rl_buffer_consumer_lag") >= 0
        )  # a count (NaN fails), exact in test_buffer

        port = free_port()
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        up = []
        while time.monotonic() < deadline:
            try:
                up = _query(base, "up == 1")
            except OSError:
                up = []
            if len(up) == 3:
                break
            time.sleep(1)
        assert sorted(s["metric"]["instance_name"] for s in up) == ["env0", "learner", "rollout0"]
        rules = json.loads(_get(f"{base}/api/v1/rules"))["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == 8
        assert _query(base, "vla_rl_learner_iteration >= 3")
        # Every query of every Grafana dashboard returns data from the running services (rates
        # need two scrapes of 5 s in their window).
        time.sleep(12)
        empty = [
            (board.name, panel["title"], target["expr"])
            for board in sorted(DASHBOARDS.glob("*.json"))
            for panel in json.loads(board.read_text())["panels"]
            for target in panel["targets"]
            if not _query(base, target["expr"])
        ]
        assert not empty, empty
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
