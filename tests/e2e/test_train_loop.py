"""The whole loop through the real services: `vla-rl train` starts a real redis-server, a rollout
server, an env server (ManiSkill3 rendering on the CPU) and the learner as processes; two
iterations of PPO (torch engine) and of GRPO (vLLM engine, CPU build) must advance the policy
version on the rollout server, write the RLinf metric names, and consume every segment once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

COMMON = [
    "runner.max_epochs=2",
    "env.train.total_num_envs=2",
    "env.train.max_episode_steps=6",
    "env.train.max_steps_per_rollout_epoch=6",
    "actor.micro_batch_size=3",
    "actor.global_batch_size=6",
]
ACTOR = [
    "train/actor/approx_kl",
    "train/actor/clip_fraction",
    "train/actor/clipped_ratio",
    "train/actor/grad_norm",
    "train/actor/lr",
    "train/actor/policy_loss",
    "train/entropy_loss",
    "train/loss",
    "rollout/advantages_max",
    "rollout/advantages_mean",
    "rollout/advantages_min",
    "rollout/rewards",
    "env/episode_len",
    "env/return",
    "env/reward",
    "env/success_once",
    "time/update_s",
    "time/iteration_s",
]
CRITIC = [
    "train/critic/value_loss",
    "train/critic/value_clip_ratio",
    "train/critic/explained_variance",
]


def _train(tmp_path: Path, overrides: list[str]) -> tuple[Path, str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    args = [f"runner.logger.log_path={tmp_path}", *COMMON, *overrides]
    proc = subprocess.run(
        [sys.executable, "-m", "vla_rl.cli", "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    stdout = proc.stdout + proc.stderr  # the learner's log lines go to stderr
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert runs, f"no run directory: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run_dir = runs[0]
    logs = "\n".join(
        f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}"
        for p in (run_dir / "logs").glob("*")
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
    return run_dir, stdout


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_run(run_dir: Path, stdout: str, expected_tags: list[str]) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    # The rollout server serves the learner's last adapter.
    assert [r["policy_version"] for r in summary["rollout"]] == [2]
    assert summary["rollout"][0]["adapter_sha256"]
    # Every segment written was consumed exactly once: none pending, none dead, each acked once,
    # and the learner trained on exactly as many as were written.
    written = sum(e["segments_written"] for e in summary["env"])
    assert written == 4  # 2 envs x 2 iterations
    # Where collection's time went: every step waited for an action and stepped the envs, and
    # iteration 2 waited for version 1 (on-policy).
    for env in summary["env"]:
        seconds = env["seconds"]
        assert seconds["act_wait"] > 0 and seconds["env_step"] > 0, env
        assert seconds["policy_wait"] > 0, env
    buffer = summary["buffer"]
    assert buffer["pending"] == 0 and buffer["dead_letters"] == 0
    assert buffer["acked_segments"] == written == buffer["length"]
    scalars = _scalars(run_dir)
    missing = [t for t in expected_tags if t not in scalars]
    assert not missing, f"metrics not written: {missing}"
    assert sum(v for _, v in scalars["rollout/num_segments"]) == written
    assert [s for s, _ in scalars["train/actor/policy_loss"]] == [1, 2]
    assert [v for _, v in scalars["rollout/policy_version"]] == [1.0, 2.0]
    assert (run_dir / "checkpoints" / "global_step_2" / "adapter.safetensors").exists()
    assert "iter    1/2" in stdout and "iter    2/2" in stdout
    assert (run_dir / "learning_curve.png").stat().st_size > 10_000


@pytest.mark.slow
def test_ppo_two_iterations_torch_engine(tmp_path):
    run_dir, stdout = _train(
        tmp_path,
        [
            "runner.logger.experiment_name=ppo_torch",
            "env.eval.video_cfg.save_video=true",
            "env.eval.total_num_envs=2",
            "env.eval.max_episode_steps=4",
        ],
    )
    _check_run(run_dir, stdout, ACTOR + CRITIC + ["eval/success_once", "eval/episode_len"])
    # Evaluation of the final policy through EnvService sessions, one video per episode.
    episodes = json.loads((run_dir / "eval.json").read_text())
    assert [e["policy_version"] for e in episodes] == [2, 2]
    assert all(e["episode_len"] == 4 or e["success_once"] for e in episodes)
    import cv2

    frames = 0
    capture = cv2.VideoCapture(episodes[0]["video"])
    while capture.read()[0]:
        frames += 1
    assert frames == episodes[0]["episode_len"] + 1  # the reset frame and one per step

    # `vla-rl eval` of the trained adapter on the same base: the table names the adapter, and
    # says its actions were sampled (the greedy tables are test_warm_start's).
    out = tmp_path / "eval_table"
    proc = subprocess.run(
        [sys.executable, "-m", "vla_rl.cli", "eval", "--adapter",
         str(run_dir / "checkpoints" / "global_step_2"), "--splits", "train,semantic",
         "--episodes", "2",
         "--out", str(out), f"actor.model.model_path={run_dir / 'tiny_model'}",
         "env.eval.max_steps_per_rollout_epoch=2", "rollout.sampling_params.temperature_eval=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = json.loads((out / "eval_table.json").read_text())
    assert table["label"] == "adapter v2 (sampled, T=1)" and table["temperature"] == 1.0
    assert table["rows"]["train"]["episodes"] == 2
    assert table["rows"]["semantic"]["episodes"] == 2 and "ood_average" in table["rows"]
    assert [e["task_id"] for e in table["episodes"]["semantic"]] == [
        "PickCube-v1-semantic-colour",
        "PickCube-v1-semantic-size",
    ]
    assert [e["policy_version"] for e in table["episodes"]["train"]] == [2, 2]


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_two_iterations_vllm_engine(tmp_path):
    run_dir, stdout = _train(
        tmp_path,
        [
            "runner.logger.experiment_name=grpo_vllm",
            "algorithm.adv_type=grpo",
            "algorithm.loss_type=actor",
            "algorithm.group_size=2",
            "rollout.engine=vllm",
        ],
    )
    _check_run(run_dir, stdout, ACTOR)
    assert "train/critic/value_loss" not in _scalars(run_dir)


@pytest.mark.slow
def test_fsdp_learner_then_resume(tmp_path):
    """Iteration 1 with the learner as 2 data-parallel processes (gloo; no_shard, what the GPU
    examples use; tests/e2e/test_multinode_learner.py runs full_shard), then a rerun of the same
    run resumes from its checkpoint with one process: the run reaches version 2 with every
    segment of both launches acknowledged once (the Redis AOF carries the stream across
    launches)."""
    name = "runner.logger.experiment_name=fsdp"
    two = ["actor.fsdp_config.world_size=2", "actor.fsdp_config.sharding_strategy=no_shard"]
    run_dir, stdout = _train(tmp_path, [name, "runner.max_epochs=1", *two])
    assert "iter    1/1" in stdout and "(2 learner processes)" in stdout
    run_dir, stdout = _train(tmp_path, [name])
    assert "iter    2/2" in stdout and "iter    1/2" not in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["policy_version"] for r in summary["rollout"]] == [2]
    assert summary["buffer"]["pending"] == 0
    assert summary["buffer"]["acked_segments"] == summary["buffer"]["length"] == 4


@pytest.mark.slow
def test_stale_collection_trains_with_decoupled_ppo_and_evaluates_periodically(tmp_path):
    """max_staleness 1: collection runs one version ahead of the learner, and the loss corrects
    with the rollout's log-probs (decoupled PPO). val_check_interval 1: env.eval runs beside
    training on the served policy and once more on the final one. The buffer is the served
    in-process one (what a machine without redis-server gets), read once more by the launcher
    for summary.json."""
    run_dir, stdout = _train(
        tmp_path,
        [
            "runner.logger.experiment_name=stale",
            "buffer.backend=memory",
            "runner.max_epochs=3",
            "runner.val_check_interval=1",
            "algorithm.max_staleness=1",
            "env.eval.total_num_envs=1",
            "env.eval.max_steps_per_rollout_epoch=2",
        ],
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["policy_version"] for r in summary["rollout"]] == [3]
    written = sum(e["segments_written"] for e in summary["env"])
    assert written == 6 and summary["buffer"]["pending"] == 0
    scalars = _scalars(run_dir)
    trained = sum(v for _, v in scalars["rollout/num_segments"])
    dropped = scalars["rollout/stale_segments_dropped"][-1][1]
    assert trained + dropped == written and dropped == 0
    # Decoupled PPO's importance weights were applied (and logged) in every iteration.
    assert [s for s, _ in scalars["train/actor/behaviour_weight_mean"]] == [1, 2, 3]
    assert all(0 <= v <= 1 for _, v in scalars["rollout/policy_lag"])
    # The final evaluation, plus at least one while training.
    steps = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "eval").glob("step_*.json"))
    assert steps[-1] == 3 and len(steps) >= 2, steps
    assert len(scalars["eval/success_once"]) == len(steps)
    assert "iter    3/3" in stdout
