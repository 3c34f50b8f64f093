"""The warm-start story a user follows, through `vla-rl experiment` (what `bash scripts/run.sh`
runs): scripted-expert demonstrations of PushCube-v1 and behaviour cloning into a cached base
(`vla-rl collect-demos`, `vla-rl bc`), the base evaluated in and out of distribution (`vla-rl
eval`), three PPO iterations from it with periodic evaluation and eval videos (`vla-rl train`),
the trained adapter evaluated on the same seeds (`vla-rl eval --adapter`), the before/after table
and the learning curve. Tiny sizes: this checks that every artefact is produced and consistent,
not that success rises (benchmarks/rl_gain.py measures that on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASK = "PushCube-v1"


def _vla_rl(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "vla_rl.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_experiment_base_eval_ppo_eval_table(tmp_path):
    out_dir, cache = tmp_path / "experiment", tmp_path / "cache"
    flags = [
        "--out", str(out_dir), "--cache", str(cache), "--task", TASK,
        "--demos", "2", "--bc-steps", "4", "--bc-batch", "4",
        "--episode-steps", "6", "--envs", "2", "--iterations", "3",
        "--eval-every", "2", "--periodic-eval-episodes", "2", "--videos",
        "--eval-episodes", "2", "--splits", "train,semantic",
        "--micro-batch", "4", "--mini-batches", "1", "--update-epochs", "1",
    ]  # fmt: skip
    out = _vla_rl("experiment", *flags)
    assert "building it once" in out
    base = cache / f"{TASK}_openvla" / "base"
    assert (base / "model.safetensors").is_file()
    demos = json.loads((cache / f"{TASK}_openvla" / "demos" / "meta.json").read_text())
    assert demos["task_id"] == TASK and demos["episodes_written"] == 2
    for i in (1, 2, 3):
        assert f"iter    {i}/3" in out

    # Periodic evaluation during training at version 2 and the final one at 3, with videos.
    run = out_dir / "train"
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == [
        "step_00002.json",
        "step_00003.json",
    ]
    final = json.loads((run / "eval" / "step_00003.json").read_text())
    assert [e["seed"] for e in final] == [1000, 1001]  # env.eval's own seeds, not training's
    assert all(Path(e["video"]).stat().st_size > 1000 for e in final)
    assert (run / "learning_curve.png").stat().st_size > 10_000

    # Before and after on the same episodes (tasks and seeds), in and out of distribution.
    before = json.loads((out_dir / "base_eval" / "eval_table.json").read_text())
    after = json.loads((out_dir / "after_eval" / "eval_table.json").read_text())
    assert before["label"] == "base" and after["label"] == "adapter v3"
    for table in (before, after):
        assert set(table["rows"]) == {"train", "semantic", "ood_average"}
    assert [e["task_id"] for e in after["episodes"]["semantic"]] == [
        f"{TASK}-semantic-colour",
        f"{TASK}-semantic-size",
    ]
    for split in ("train", "semantic"):
        assert [e["seed"] for e in before["episodes"][split]] == [
            e["seed"] for e in after["episodes"][split]
        ]
    assert all(e["policy_version"] == 3 for e in after["episodes"]["train"])
    videos = sorted((out_dir / "after_eval" / "video").rglob("*.mp4"))
    assert len(videos) == 4 and all(v.stat().st_size > 1000 for v in videos)

    comparison = json.loads((out_dir / "comparison.json").read_text())
    rows = comparison["rows"]
    assert set(rows) == {"train", "semantic", "ood_average"}
    for split, row in rows.items():
        assert row["base"] == before["rows"][split] and row["after"] == after["rows"][split]
        assert row["gain"] == pytest.approx(
            after["rows"][split]["success_rate"] - before["rows"][split]["success_rate"]
        )
    table = (out_dir / "comparison.md").read_text()
    assert "| train |" in table and "after PPO (3 iterations)" in table

    # A second run reuses the cached base instead of building it again.
    out = _vla_rl(
        "experiment", *flags, "--iterations", "1", "--eval-every", "-1", "--splits", "train"
    )
    assert "cached at" in out and "building it once" not in out
