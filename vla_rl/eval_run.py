"""`vla-rl eval`: a checkpoint (the base, or with a trained adapter) on the training split and on
out-of-distribution splits in RL4VLA's three categories, through the same services as training:
a rollout server and env servers started here, episodes played through EnvService sessions.

The OOD splits are ManiSkill task variants registered by the env server's task module
`services.env_server.ood_tasks` (`<Task>-<category>-<variant>`); a split is just a list of task
ids, so any config can also train or evaluate on them by name. Writes `eval_table.md` and
`eval_table.json` (success per split with 95% Wilson intervals, and the OOD average) and, with
env.eval.video_cfg.save_video, one MP4 per episode.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from vla_rl import security
from vla_rl.config import TrainConfig, load_config
from vla_rl.evaluation import EvalResult, evaluate
from vla_rl.report import success_summary

if TYPE_CHECKING:
    from vla_rl.launch import Launch

OOD_TASK_MODULE = "services.env_server.ood_tasks"
OOD_VARIANTS: dict[str, tuple[str, ...]] = {
    "vision": ("vision-light", "vision-table", "vision-camera"),
    "semantic": ("semantic-colour", "semantic-size", "semantic-paraphrase"),
    "execution": ("execution-region", "execution-moved"),
}
SPLITS = ("train", *OOD_VARIANTS)


def split_tasks(task_ids: list[str], split: str) -> list[str]:
    """The task ids of a split: the training tasks themselves, or their variants of a category."""
    if split == "train":
        return list(task_ids)
    if split not in OOD_VARIANTS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    return [f"{task}-{variant}" for task in task_ids for variant in OOD_VARIANTS[split]]


def play_episodes(
    args: dict, env_targets: list[str], rollout_targets: list[str], video_dir: Path | None
) -> EvalResult:
    """args["episodes"] episodes (`evaluate` arguments) in contiguous chunks over the env servers,
    so that the episodes (tasks, seeds) are those one server would play."""
    episodes = args["episodes"]
    bounds = [episodes * i // len(env_targets) for i in range(len(env_targets) + 1)]

    def play(i: int) -> EvalResult:
        return evaluate(
            env_targets[i],
            rollout_targets[i % len(rollout_targets)],
            **{**args, "episodes": bounds[i + 1] - bounds[i], "video_dir": video_dir},
            first_episode=bounds[i],
        )

    with ThreadPoolExecutor(len(env_targets)) as pool:
        results = list(pool.map(play, range(len(env_targets))))
    return EvalResult([e for r in results for e in r.episodes])


def table_rows(results: dict[str, EvalResult]) -> dict[str, dict]:
    """Per split: episodes, successes, rate and 95% interval; plus 'ood_average', the mean of
    the OOD splits' rates (RL4VLA's and RLinf's OOD figure)."""
    rows = {name: success_summary(r.episodes)["all"] for name, r in results.items()}
    ood = [rows[name]["success_rate"] for name in rows if name != "train"]
    if ood:
        rows["ood_average"] = {"success_rate": sum(ood) / len(ood), "splits": len(ood)}
    return rows


def markdown_table(rows: dict[str, dict], label: str) -> str:
    lines = [f"| split | {label}: success | 95% CI | episodes |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        if name == "ood_average":
            lines.append(f"| OOD average | {row['success_rate']:.1%} | | {row['splits']} splits |")
        else:
            low, high = row["ci95"]
            lines.append(
                f"| {name} | {row['success_rate']:.1%} | {low:.1%}-{high:.1%} | {row['episodes']} |"
            )
    return "\n".join(lines) + "\n"


def evaluation_arguments(cfg: TrainConfig, tasks: list[str], episodes: int) -> dict:
    """`evaluate` arguments from env.eval, for the given task ids."""
    from vla_rl.launch import evaluation_args

    ev = cfg.env.eval
    args = evaluation_args(cfg, force=True)
    modules = list(ev.task_modules)
    if any(t not in cfg.env.train.task_ids for t in tasks) and OOD_TASK_MODULE not in modules:
        modules.append(OOD_TASK_MODULE)
    return {**args, "task_ids": tasks, "episodes": episodes, "task_modules": modules}


def run(
    config_path: str | None,
    overrides: list[str],
    adapter: str | None,
    splits: list[str],
    episodes: int | None,
    out_dir: str | None,
    num_gpus: int | None = None,
) -> dict[str, dict]:
    """Start a rollout server (loading `adapter`, if given) and env.eval.num_servers env servers,
    evaluate every split, write the table; returns its rows."""
    from vla_rl.launch import Launch

    cfg = load_config(config_path, overrides)
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    out = Path(out_dir or Path(cfg.run_dir) / "eval_table")
    out.mkdir(parents=True, exist_ok=True)
    launch = Launch(out)
    with security.use(launch.credentials()):
        return _run(cfg, launch, out, adapter, splits, episodes, num_gpus)


def _run(
    cfg: TrainConfig,
    launch: Launch,
    out: Path,
    adapter: str | None,
    splits: list[str],
    episodes: int | None,
    num_gpus: int,
) -> dict[str, dict]:
    from vla_rl.launch import launch_plan, prepare_model, wait_until_healthy
    from vla_rl.rpc.rollout_client import RolloutClient

    try:
        model_path = prepare_model(cfg, out)
        plan = launch_plan(cfg, num_gpus, model_path=model_path, buffer_url="memory://unused")
        py = sys.executable
        servers = plan.env[: cfg.env.eval.num_servers]
        for proc in plan.rollout + servers:
            launch.start(proc.name, [py, *proc.args], gpus=proc.gpus, target=proc.target)
        wait_until_healthy(launch)
        rollout_targets = plan.config.rollout.addresses
        label = "base"
        if adapter:
            label = _push_adapter(Path(adapter), rollout_targets, RolloutClient)
        temperature = cfg.rollout.sampling_params.temperature_eval
        if temperature > 0:  # a sampled table must not pass for a greedy one
            label += f" (sampled, T={temperature:g})"
        results: dict[str, EvalResult] = {}
        count = episodes or cfg.env.eval.total_num_envs
        video_root = (
            cfg.env.eval.video_cfg.video_base_dir if cfg.env.eval.video_cfg.save_video else None
        )
        for split in splits:
            tasks = split_tasks(list(cfg.env.eval.task_ids), split)
            args = evaluation_arguments(cfg, tasks, count)
            video_dir = Path(video_root) / split if video_root else None
            results[split] = play_episodes(
                args, [s.target for s in servers], rollout_targets, video_dir
            )
            row = success_summary(results[split].episodes)["all"]
            print(
                f"{split:10s} success {row['success_rate']:.2f} (95% CI {row['ci95'][0]:.2f}-"
                f"{row['ci95'][1]:.2f}) over {row['episodes']} episodes on {tasks}",
                flush=True,
            )
        rows = table_rows(results)
        (out / "eval_table.json").write_text(
            json.dumps(
                {
                    "label": label,
                    "temperature": temperature,
                    "rows": rows,
                    "episodes": {k: r.episodes for k, r in results.items()},
                },
                indent=2,
            )
        )
        (out / "eval_table.md").write_text(markdown_table(rows, label))
        print(markdown_table(rows, label), flush=True)
        print(f"wrote {out / 'eval_table.md'} and eval_table.json", flush=True)
        return rows
    finally:
        launch.stop()


def _push_adapter(path: Path, targets: list[str], client_cls) -> str:
    """Load a trained adapter (adapter.safetensors, or a checkpoint directory holding one) into
    every rollout replica; returns a label naming it."""
    from vla_rl.models.lora import adapter_metadata

    file = path / "adapter.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no adapter.safetensors there")
    blob = file.read_bytes()
    version = int(adapter_metadata(blob)["policy_version"])
    for target in targets:
        client = client_cls(target)
        try:
            client.push_adapter(blob, version)
        finally:
            client.close()
    return f"adapter v{version}"
