"""benchmarks/env_startup.py: layouts parse or fail by name, and one real env is built, reset and
stepped through the env servers' EnvPool with the results written as JSON and markdown."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks.env_startup import main, parse_layout


def test_layouts_parse_or_name_the_bad_one():
    assert parse_layout("8x8") == (8, 8) and parse_layout("16X2") == (16, 2)
    for bad in ("8", "0x4", "ax2"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad):
            parse_layout(bad)


def test_one_env_is_built_stepped_and_reported(tmp_path, capsys):
    out = tmp_path / "startup.json"
    main(["--layouts", "1x1", "--steps", "3", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["layout"] == "1x1" and row["envs"] == 1 and row["build_vs_baseline"] == 1.0
    assert row["build_s"] > 0 and row["env_steps_per_s"] > 0
    assert "| 1x1 | 1 |" in out.with_suffix(".md").read_text()
    assert "1 envs built in" in capsys.readouterr().out
