"""The Grafana dashboards and provisioning files are well formed: every panel reads the
provisioned datasource, ids and refIds are unique, and the README lists every panel. (Every
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


def test_three_dashboards_on_the_provisioned_datasource():
    boards = _boards()
    assert set(boards) == {"training", "throughput", "health"}
    source = yaml.safe_load(
        (DEPLOY / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    for name, board in boards.items():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == uid, (name, panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), (name, panel["title"])
            assert all(
                t["expr"].strip() and t["datasource"]["uid"] == uid for t in panel["targets"]
            )


def test_the_readme_lists_every_panel():
    for name, board in _boards().items():
        for panel in board["panels"]:
            assert panel["title"] in README, (name, panel["title"])
