"""The alert rules (deploy/prometheus/alerts.yml) checked by promtool: the file is valid, and
each alert fires on the series it is for, with its labels and annotations, and stays quiet on
healthy series (`promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)"
)

ENV0 = {"job": "vla-rl-env", "instance": "127.0.0.1:9101", "instance_name": "env0"}
LEARNER = {"job": "vla-rl-learner", "instance": "127.0.0.1:9103", "instance_name": "learner"}
ROLLOUT = {"job": "vla-rl-rollout", "instance": "127.0.0.1:9102", "instance_name": "rollout0"}


def _series(name: str, labels: dict, values: str) -> dict:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _buckets(labels: dict, counts: dict[str, str]) -> list[dict]:
    return [_series("vla_rl_rollout_request_seconds_bucket", {**labels, "le": le}, values)
            for le, values in counts.items()]  # fmt: skip


# alert -> (input series, [(eval time, expected labels or None for "not firing", summary)])
CASES = {
    "VlaRlServiceDown": (
        [_series("up", ENV0, "1 1 0 0 0 0")],
        [("1m", None, ""), ("4m", ENV0, "env0 (vla-rl-env) does not answer scrapes")],
    ),
    "VlaRlNoEnvSteps": (
        [
            _series("vla_rl_env_collection_running", ENV0, "1x20"),
            _series("vla_rl_env_steps_total", {**ENV0, "mode": "train"}, "0+10x5 50x15"),
        ],
        [
            ("4m", None, ""),
            ("12m", {}, "No training env steps for 5 minutes while collection runs"),
        ],
    ),
    "VlaRlPolicyVersionStalled": (
        [_series("vla_rl_learner_policy_version", LEARNER, "0+1x10 10x30")],
        [
            ("20m", None, ""),
            ("31m", LEARNER, "The learner has published no new policy for 20 minutes"),
        ],
    ),
    "VlaRlBufferBacklogGrowing": (
        [_series("vla_rl_buffer_pending_entries", LEARNER, "0x10 0+2x30")],
        [
            ("8m", None, ""),
            ("30m", LEARNER, "Segments taken by the learner and not acknowledged keep growing"),
        ],
    ),
    "VlaRlBufferLagGrowing": (
        [_series("vla_rl_buffer_consumer_lag", LEARNER, "0x10 0+3x30")],
        [
            ("8m", None, ""),
            ("30m", LEARNER, "Segments the learner has not read keep piling up in the buffer"),
        ],
    ),
    "VlaRlRolloutSlow": (
        _buckets(ROLLOUT, {"1": "0x20", "10": "0x20", "30": "0+10x20", "+Inf": "0+10x20"}),
        [("3m", None, ""), ("12m", {}, "p99 Act latency above 10 s")],
    ),
    "VlaRlDeadLetters": (
        [_series("vla_rl_buffer_dead_letters", LEARNER, "0 0 0 0 1 1")],
        [
            ("3m", None, ""),
            ("5m", LEARNER, "Trajectory segments were moved to the dead-letter stream"),
        ],
    ),
    "VlaRlCollectionFailed": (
        [_series("vla_rl_env_collection_failures_total", ENV0, "0 0 0 1 1")],
        [("2m", None, ""), ("4m", ENV0, "A training collection ended with an error on env0")],
    ),
}
# Healthy series: no alert at all.
QUIET = [
    _series("up", ENV0, "1x30"),
    _series("vla_rl_env_collection_running", ENV0, "1x30"),
    _series("vla_rl_env_steps_total", {**ENV0, "mode": "train"}, "0+10x30"),
    _series("vla_rl_learner_policy_version", LEARNER, "0+1x30"),
    _series("vla_rl_buffer_pending_entries", LEARNER, "0 4 0 4 0 4 0 4 0 4 0 4 0 4 0 4 0 4 0 4"),
    _series("vla_rl_buffer_consumer_lag", LEARNER, "0 6 0 6 0 6 0 6 0 6 0 6 0 6 0 6 0 6 0 6"),
    _series("vla_rl_buffer_dead_letters", LEARNER, "0x30"),
    _series("vla_rl_env_collection_failures_total", ENV0, "0x30"),
    *_buckets(ROLLOUT, {"1": "0+10x30", "10": "0+10x30", "30": "0+10x30", "+Inf": "0+10x30"}),
]


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def test_the_rules_file_is_valid():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_case_and_says_what_to_do():
    rules = _rules()
    assert set(rules) == set(CASES)
    for name, rule in rules.items():
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name


def test_each_alert_fires_on_its_series_and_not_before(tmp_path):
    rules = _rules()
    tests = []
    for alert, (series, checks) in CASES.items():
        rule_tests = []
        for at, labels, summary in checks:
            expected = []
            if labels is not None:
                expected = [{
                    "exp_labels": {**labels, "severity": rules[alert]["labels"]["severity"]},
                    "exp_annotations": {
                        "summary": summary,
                        "description": rules[alert]["annotations"]["description"],
                    },
                }]  # fmt: skip
            rule_tests.append({"eval_time": at, "alertname": alert, "exp_alerts": expected})
        tests.append({"interval": "1m", "input_series": series, "alert_rule_test": rule_tests})
    quiet = [{"eval_time": "25m", "alertname": a, "exp_alerts": []} for a in CASES]
    tests.append({"interval": "1m", "input_series": QUIET, "alert_rule_test": quiet})
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump(
        {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}
    ))  # fmt: skip
    out = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
