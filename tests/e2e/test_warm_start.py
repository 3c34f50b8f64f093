"""The warm-start story a user follows, through the real commands and services: scripted-expert
demonstrations of PushCube-v1 (`vla-rl collect-demos`), behaviour cloning into an OpenVLA-layout
checkpoint (`vla-rl bc`), three PPO iterations from it with periodic evaluation and eval videos
(`vla-rl train`), and the evaluation table of the trained adapter in and out of distribution
(`vla-rl eval --adapter`). Tiny sizes: this checks that every artefact is produced and
consistent, not that success rises (benchmarks/rl_gain.py measures that on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASK = "PushCube-v1"
STEPS = 6  # env steps per episode and per iteration


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
def test_demos_bc_ppo_and_eval_table(tmp_path):
    demos, base, runs = tmp_path / "demos", tmp_path / "base", tmp_path / "runs"
    _vla_rl("collect-demos", "--task", TASK, "--episodes", "2", "--out", str(demos), "--quiet")
    assert json.loads((demos / "meta.json").read_text())["task_id"] == TASK

    out = _vla_rl("bc", "--demos", str(demos), "--out", str(base), "--steps", "4",
                  "--batch-size", "4", "--device", "cpu")  # fmt: skip
    assert "token accuracy" in out and (base / "model.safetensors").is_file()

    env = [
        f"actor.model.model_path={base}",
        f"env.train.task_ids=[{TASK}]",
        f"env.eval.task_ids=[{TASK}]",
        "env.train.total_num_envs=2",
        f"env.train.max_episode_steps={STEPS}",
        f"env.train.max_steps_per_rollout_epoch={STEPS}",
        "env.eval.total_num_envs=2",
        f"env.eval.max_episode_steps={STEPS}",
        f"env.eval.max_steps_per_rollout_epoch={STEPS}",
        "rollout.sampling_params.temperature_eval=0",
    ]
    out = _vla_rl(
        "train", *env,
        f"runner.logger.log_path={runs}", "runner.logger.experiment_name=from_bc",
        "runner.max_epochs=3", "runner.val_check_interval=2",
        "env.eval.video_cfg.save_video=true",
        "actor.micro_batch_size=4", "actor.global_batch_size=12",
    )  # fmt: skip
    run = runs / "from_bc"
    for i in (1, 2, 3):
        assert f"iter    {i}/3" in out
    # Periodic evaluation at version 2, and the final one at 3, each with its episodes' videos.
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == [
        "step_00002.json",
        "step_00003.json",
    ]
    final = json.loads((run / "eval" / "step_00003.json").read_text())
    assert [e["seed"] for e in final] == [1000, 1001]  # env.eval's own seeds, not training's
    assert all(Path(e["video"]).stat().st_size > 1000 for e in final)
    assert (run / "learning_curve.png").stat().st_size > 10_000

    table_dir = tmp_path / "table"
    adapter = run / "checkpoints" / "global_step_3"
    out = _vla_rl(
        "eval", "--adapter", str(adapter), "--splits", "train,semantic", "--episodes", "2",
        "--out", str(table_dir), *env,
        f"runner.logger.log_path={tmp_path / 'eval_runs'}",
    )  # fmt: skip
    table = json.loads((table_dir / "eval_table.json").read_text())
    assert table["label"] == "adapter v3"
    assert set(table["rows"]) == {"train", "semantic", "ood_average"}
    assert [e["task_id"] for e in table["episodes"]["semantic"]] == [
        f"{TASK}-semantic-colour",
        f"{TASK}-semantic-size",
    ]
    assert all(e["policy_version"] == 3 for e in table["episodes"]["train"])
    assert "| train |" in (table_dir / "eval_table.md").read_text()
