"""The Helm chart (deploy/helm/vla-rl) rendered offline by Helm v4 (helm-python-sdk): the default
values and every example render, lint strictly and pass kubernetes-validate --strict; the run
config the chart assembles is one vla-rl accepts, with as many env servers and rollout addresses
as pods; every service's arguments parse with that service's own parser; the schema refuses bad
values. (No Kubernetes API server here: nothing is installed.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python.chart", reason="helm-python-sdk is not installed (pip)")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "vla-rl"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
VALIDATE = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))


def _render(values: dict) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="run", namespace="rl")
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d]


def _values(example: Path | None) -> dict:
    return yaml.safe_load(example.read_text()) if example else {}


CASES = [None, *EXAMPLES]
IDS = ["defaults", *(p.stem for p in EXAMPLES)]


@pytest.mark.parametrize("example", CASES, ids=IDS)
def test_renders_and_lints_strictly(example, tmp_path):
    values = _values(example)
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.34.0")
    assert not report["errors"], report
    assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]
    docs = _render(values)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "ConfigMap", "Job", "Role", "RoleBinding"} <= kinds
    if VALIDATE:
        files = []
        for i, doc in enumerate(docs):
            files.append(tmp_path / f"{i}.yaml")
            files[-1].write_text(yaml.safe_dump(doc))
        out = subprocess.run([VALIDATE, "--strict", "--quiet", "-k", "1.34.0", *map(str, files)],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr


def _by(docs: list[dict], kind: str, suffix: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc


@pytest.mark.parametrize("example", CASES, ids=IDS)
def test_the_run_config_and_every_command_are_ones_vla_rl_reads(example, tmp_path):
    from services.env_server.main import parse_args as env_args
    from services.learner.main import parse_args as learner_args
    from services.rollout_server.main import parse_args as rollout_args
    from vla_rl.cli import build_parser
    from vla_rl.config import load_config

    values = _values(example)
    docs = _render(values)
    config_text = _by(docs, "ConfigMap", "-config")["data"]["config.yaml"]
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    cfg = load_config(str(config), [])
    envs = _by(docs, "StatefulSet", "-env")["spec"]["replicas"]
    rollouts = _by(docs, "StatefulSet", "-rollout")["spec"]["replicas"]
    assert cfg.env.train.num_servers == envs and len(cfg.rollout.addresses) == rollouts

    def args_of(kind: str, suffix: str) -> list[str]:
        spec = _by(docs, kind, suffix)["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        return [str(config) if a == "/config/config.yaml" else a for a in args]

    rollout = args_of("StatefulSet", "-rollout")
    assert rollout[:2] == ["serve", "rollout"]
    assert rollout_args(rollout[2:]).checkpoint == cfg.actor.model.model_path
    env = args_of("StatefulSet", "-env")
    env_args(env[2:])
    learner = args_of("StatefulSet", "-learner")
    if learner[0] == "serve":
        learner_args(learner[2:])
    else:  # torchrun over the pod's GPUs
        assert f"--nproc_per_node={values['learner']['gpus']}" in learner
        learner_args(learner[learner.index("services.learner.main") + 1 :])
    nodes = values.get("learner", {}).get("nodes", 1)
    learner_set = _by(docs, "StatefulSet", "-learner")
    assert learner_set["spec"]["replicas"] == nodes
    if nodes > 1:  # one torchrun per pod, static rendezvous at pod 0 (global rank 0)
        name = learner_set["metadata"]["name"]
        assert {f"--nnodes={nodes}", "--node_rank=$(LEARNER_POD_INDEX)",
                f"--master_addr={name}-0.{name}"} <= set(learner)  # fmt: skip
        assert learner_set["spec"]["podManagementPolicy"] == "Parallel"
        container = learner_set["spec"]["template"]["spec"]["containers"][0]
        (index,) = [e for e in container["env"] if e["name"] == "LEARNER_POD_INDEX"]
        assert "apps.kubernetes.io/pod-index" in index["valueFrom"]["fieldRef"]["fieldPath"]
        assert cfg.actor.fsdp_config.world_size == nodes * values["learner"]["gpus"]
    # Prometheus scrapes the learner's pod 0 only.
    metrics_service = _by(docs, "Service", "-learner-metrics")
    assert metrics_service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"].endswith("-0")
    attach = args_of("Job", "-attach")
    parsed = build_parser().parse_args(attach)
    assert len(parsed.env) == envs


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"rollout": {"replicas": 0, "gpus": 0}}, "/rollout/replicas"),
        ({"learner": {"gpus": -1}}, "/learner/gpus"),
        ({"image": {"repository": "vla-rl", "tag": "cpu", "pullPolicy": "Sometimes"}},
         "/image/pullPolicy"),
        ({"redis": {"externalUrl": "http://not-redis:6379"}}, "/redis/externalUrl"),
        ({"replicas": 3}, "additional properties 'replicas'"),
        ({"rollout": {"replicas": 1, "gpus": 1, "startupFailureThreshold": 1}},
         "/rollout/startupFailureThreshold"),
    ],
    ids=["zero-rollout-replicas", "negative-gpus", "pull-policy", "redis-url", "unknown-key",
         "startup-probe-of-10-s"],
)  # fmt: skip
def test_the_schema_refuses_bad_values(bad, where):
    with pytest.raises(Exception, match="vla-rl") as refused:
        helm.Chart.load(str(CHART)).validate_schema(bad)
    assert where in str(refused.value)  # refused for this value, not another


PROMETHEUS = shutil.which("prometheus")
# A ServiceMonitor relabeling's keys (prometheus-operator's camelCase) as Prometheus's own.
RELABEL_KEYS = {"sourceLabels": "source_labels", "targetLabel": "target_label",
                "replacement": "replacement", "regex": "regex", "action": "action",
                "separator": "separator"}  # fmt: skip


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
def test_the_service_monitor_gives_the_labels_the_alerts_select(tmp_path):
    """Under a ServiceMonitor the job label would be the Service's name (run-vla-rl-env) and
    there would be no instance_name, so `up{job=~"vla-rl-.*"} == 0` (VlaRlServiceDown) could
    never fire and the dashboards' legends would be empty. The chart's relabelings, run by a real
    Prometheus on a target labelled as Kubernetes service discovery labels a pod, must give
    job vla-rl-env and instance_name = the pod's name. (The operator itself is not run here.)"""
    import json
    import time
    import urllib.parse
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter, start_http_server

    from vla_rl.launch import free_port

    (monitor,) = [d for d in _render({"metrics": {"serviceMonitor": True}})
                  if d["kind"] == "ServiceMonitor"]  # fmt: skip
    (endpoint,) = monitor["spec"]["endpoints"]
    relabel = [{RELABEL_KEYS[k]: v for k, v in r.items()} for r in endpoint["relabelings"]]
    registry = CollectorRegistry()
    Counter("vla_rl_env_steps", "stands in for an env server pod", registry=registry).inc()
    target_port, port = free_port(), free_port()
    server, _ = start_http_server(target_port, addr="127.0.0.1", registry=registry)
    pod = {"__meta_kubernetes_pod_label_app_kubernetes_io_component": "env",
           "__meta_kubernetes_pod_name": "run-vla-rl-env-0"}  # fmt: skip
    config = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "run-vla-rl-env", "relabel_configs": relabel,
                                  "static_configs": [{"targets": [f"127.0.0.1:{target_port}"],
                                                      "labels": pod}]}]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    (down,) = [r for g in alerts["groups"] for r in g["rules"] if r["alert"] == "VlaRlServiceDown"]
    selector = down["expr"].split("==")[0].strip()  # up{job=~"vla-rl-.*"}
    try:
        deadline, found = time.monotonic() + 60, []
        while time.monotonic() < deadline and not found:
            time.sleep(1)
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
                {"query": selector}
            )
            try:
                found = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
            except OSError:
                found = []
        assert [s["metric"] for s in found] == [
            {"__name__": "up", "job": "vla-rl-env", "instance_name": "run-vla-rl-env-0",
             "instance": f"127.0.0.1:{target_port}"}
        ]  # fmt: skip
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        server.shutdown()


def _merged(example: Path | None) -> dict:
    """The chart's defaults under an example's values (what Helm renders with)."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = (
                merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            )
        return out

    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), _values(example))


@pytest.mark.parametrize("example", CASES, ids=IDS)
def test_scheduling_disruption_and_rbac_follow_the_values(example):
    """What a GPU cluster relies on, rendered as the values say: nvidia.com/gpu requests and
    limits per pod, node selectors and tolerations, env/rollout pods spread over nodes, a
    PodDisruptionBudget per component, startup probes long enough to load a 7B checkpoint, and
    the learner's Role limited to reading EndpointSlices."""
    values, docs = _merged(example), _render(_values(example))
    for component in ("env", "rollout", "learner"):
        want = values[component]
        pod = _by(docs, "StatefulSet", f"-{component}")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        for kind in ("requests", "limits"):
            gpus = container["resources"].get(kind, {}).get("nvidia.com/gpu")
            assert gpus == (want["gpus"] or None), (component, kind, gpus)
        assert pod.get("nodeSelector", {}) == want["nodeSelector"], component
        assert pod.get("tolerations", []) == want["tolerations"], component
        if component != "learner":
            spread = pod.get("topologySpreadConstraints")
            assert bool(spread) == values["topologySpread"], component
        if "startupFailureThreshold" in want:
            probe = container["startupProbe"]
            assert probe["failureThreshold"] == want["startupFailureThreshold"]
            assert probe["failureThreshold"] * probe.get("periodSeconds", 10) >= 600, component
    budgets = {d["metadata"]["name"].rsplit("-", 1)[-1] for d in docs
               if d["kind"] == "PodDisruptionBudget"}  # fmt: skip
    assert budgets == ({"env", "rollout"} if values["podDisruptionBudget"]["enabled"] else set())
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]  # fmt: skip
