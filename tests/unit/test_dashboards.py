"""The Grafana dashboards and provisioning files are well formed: every panel reads the
datasource variable, ids and refIds are unique, and the README lists every panel. (Every
query returns data from a real run: tests/e2e/test_metrics.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _boards() -> dict[str, dict]:
    return {
        p.stem: json.loads(p.read_text()) for p in sorted((DEPLOY / "dashboards").glob("*.json"))
    }


def test_three_dashboards_read_a_datasource_variable_the_provisioning_satisfies():
    """Panels name no datasource uid of ours: a cluster's Grafana (the Helm chart's ConfigMap)
    has its own Prometheus uid, and a fixed one left every panel without data there. They read
    the `datasource` variable, which Grafana fills with a Prometheus datasource: under compose the
    provisioned one, the default and only one."""
    boards = _boards()
    assert set(boards) == {"training", "throughput", "health"}
    source = yaml.safe_load(
        (DEPLOY / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (provisioned,) = source["datasources"]
    assert provisioned["type"] == "prometheus" and provisioned["isDefault"] is True
    variable = {"type": "prometheus", "uid": "${datasource}"}
    for name, board in boards.items():
        (var,) = board["templating"]["list"]
        assert (var["name"], var["type"], var["query"]) == (
            "datasource",
            "datasource",
            "prometheus",
        )
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            assert panel["datasource"] == variable, (name, panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), (name, panel["title"])
            assert all(t["expr"].strip() and t["datasource"] == variable for t in panel["targets"])


def test_the_readme_lists_every_panel():
    for name, board in _boards().items():
        for panel in board["panels"]:
            assert panel["title"] in README, (name, panel["title"])
