"""benchmarks/placements.py's placements as config overrides: 'overlapped' is the 1-GPU baseline
with collection overlapping the update, --set reaches every placement, and a bad placement or
override is refused before anything starts."""

from __future__ import annotations

import sys

import pytest

from benchmarks import placements
from vla_rl.config.loader import load_config


def _config(name: str, gpus: int, extra: list[str]):
    args = placements.argparse.Namespace(
        iterations=2, micro=4, global_batch=8, sharding="no_shard", envs=4, servers=1,
        episode_steps=10, rollout_batch=8, gpus=gpus,
    )  # fmt: skip
    overrides = placements.common_overrides(args, "/ckpt", placements.Path("/runs"))
    return load_config(overrides=overrides + placements.placement_overrides(name, gpus) + extra)


def test_overlapped_is_the_one_gpu_baseline_with_collection_overlapping_the_update():
    base = _config("baseline", 1, [])
    over = _config("overlapped", 1, ["rollout.engine=vllm"])
    assert over.cluster.component_placement == base.cluster.component_placement
    assert (base.rollout.pipeline_stage_num, base.algorithm.max_staleness) == (1, 0)
    assert (over.rollout.pipeline_stage_num, over.algorithm.max_staleness) == (2, 1)
    assert over.rollout.engine == "vllm" and base.rollout.engine == "torch"


def test_placements_that_need_two_gpus_are_refused_on_one():
    with pytest.raises(SystemExit, match="at least 2 GPUs"):
        placements.placement_overrides("disaggregated", 1)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--placements", "overlapped", "--set", "rollout.engine=vllmx"], "rollout.engine"),
        (["--placements", "baseline", "--set", "rollout.bogus=1"], "rollout.bogus"),
        (["--placements", "sideways"], "unknown placements"),
    ],
)
def test_bad_placements_and_overrides_are_refused_before_anything_runs(
    argv, words, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["placements.py", "--gpus", "1", "--work", str(tmp_path),
                                      "--out", str(tmp_path / "out"), *argv])  # fmt: skip
    with pytest.raises(SystemExit, match=words):
        placements.main()
    assert not (tmp_path / "openvla-7b-random").exists()  # no checkpoint was written
