"""Does RL make a warm-started VLA better? Issue 9's table, in phases that each fit one call on a
lent GPU (state is kept under --work, results land under --out):

  base   scripted-expert demonstrations of --task -> behaviour cloning of a tiny OpenVLA-
         architecture model, checkpointed after each of --bc-steps -> every checkpoint evaluated
         greedily on the training split -> the one whose success is closest to --target-base is
         the base -> the base's table on every split (train, vision, semantic, execution).
  rl     `vla-rl train` from --base with PPO or GRPO through the services (periodic evaluation
         every --eval-every iterations), stopped after --minutes or --iterations, then the table of
         its last checkpoint on every split and the learning curve PNG.

Everything goes through the user-facing commands (`vla-rl collect-demos`, `bc`, `eval`, `train`)
so the figures are what a user gets. On the lent GPU (benchmarks/README.md says how ManiSkill gets
there):

    python3 benchmarks/rl_gain.py base --out $OUT
    python3 benchmarks/rl_gain.py rl --algorithm ppo --base $OUT/base --minutes 7 --out $OUT
    python3 benchmarks/rl_gain.py rl --algorithm grpo --base $OUT/base --minutes 7 --out $OUT

and at laptop scale, as the tests do: `--demos 4 --bc-steps 20 --eval-episodes 4 --envs 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # vla_rl, where the package is not installed (a lent GPU machine)

from vla_rl.cli import BC_SIZES  # noqa: E402
from vla_rl.experiment import (  # noqa: E402
    Setup,
    comparison,
    latest_checkpoint,
    model_overrides,
    rl_overrides,
    run_cli,
    setup_from_args,
)
from vla_rl.experiment import env_overrides as _env_overrides  # noqa: E402
from vla_rl.experiment import eval_table as _eval_table  # noqa: E402

SPLITS = "train,vision,semantic,execution"


def setup_of(args: argparse.Namespace) -> Setup:
    return setup_from_args(args, work=args.work)


def env_overrides(args: argparse.Namespace) -> list[str]:
    return _env_overrides(setup_of(args))


def eval_table(
    args: argparse.Namespace,
    base: str,
    out: Path,
    adapter: str | None,
    splits: str | None = None,
    episodes: int | None = None,
    temperature: float = 0.0,
) -> dict:
    """`vla-rl eval` on `splits` (default --splits), `episodes` per split (default
    --eval-episodes), greedy unless `temperature` > 0; returns eval_table.json."""
    return _eval_table(
        setup_of(args),
        base,
        out,
        adapter,
        splits or args.splits,
        episodes or args.eval_episodes,
        temperature,
    )


def sampled_table(
    args: argparse.Namespace, base: str, out: Path, adapter: str | None
) -> dict | None:
    """The table of the policy RL trains, actions sampled at the training --temperature, on
    --sampled-splits (none: skipped). The greedy table plays each token's argmax, which RL at
    temperature 1 need not improve: at lr 1e-3 both PPO and GRPO lost greedy success while
    their sampled success held or rose (benchmarks/README.md)."""
    if not args.sampled_splits:
        return None
    return eval_table(args, base, out, adapter, args.sampled_splits, None, args.temperature)


def train_success(table: dict) -> float:
    return table["rows"]["train"]["success_rate"]


def phase_base(args: argparse.Namespace) -> None:
    work, out = Path(args.work), Path(args.out)
    demos = work / "demos" / f"{args.task}_noise{args.demo_noise:g}"
    if not (demos / "meta.json").is_file():
        rc = run_cli(
            "collect-demos", "--task", args.task, "--episodes", str(args.demos),
            "--seed", "0", "--out", str(demos), "--max-episode-steps", str(args.episode_steps),
            "--quiet", "--overwrite", "--action-noise", str(args.demo_noise),
        )  # fmt: skip
        if rc != 0:
            raise SystemExit("collect-demos failed")
    candidates: list[dict] = []
    previous, done = None, 0
    for steps in args.bc_steps:
        ckpt = work / f"bc_{steps}"
        cmd = ["bc", "--demos", str(demos), "--out", str(ckpt), "--steps", str(steps - done),
               "--batch-size", str(args.bc_batch), "--lr", str(args.bc_lr),
               "--device", args.device, "--seed", str(args.seed)]  # fmt: skip
        cmd += (
            ["--init", str(previous)] if previous else ["--model", args.model, "--size", args.size]
        )
        if args.model == "openvlaoft":
            cmd += ["--chunk", str(args.chunk)]
        if run_cli(*cmd, log=work / f"bc_{steps}.log") != 0:
            raise SystemExit("bc failed")
        previous, done = ckpt, steps
        table = eval_table(
            args, str(ckpt), work / f"select_{steps}", None, "train", args.select_episodes,
            args.temperature if args.select_by == "sampled" else 0.0,
        )  # fmt: skip
        candidates.append(
            {"bc_steps": steps, "checkpoint": str(ckpt), "train": train_success(table),
             "select_by": args.select_by}
        )  # fmt: skip
        print(
            f"[rl_gain] bc {steps} steps: {args.select_by} success {candidates[-1]['train']:.2f}",
            flush=True,
        )
    best = min(candidates, key=lambda c: abs(c["train"] - args.target_base))
    base = out / "base"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(best["checkpoint"], base)
    table = eval_table(args, str(base), out / "base_table", None)
    sampled = sampled_table(args, str(base), out / "base_sampled_table", None)
    result = {"phase": "base", "args": vars(args), "candidates": candidates, "chosen": best,
              "table": table, "sampled_table": sampled, **machine()}  # fmt: skip
    (out / "rl_gain_base.json").write_text(json.dumps(result, indent=2))
    print(f"[rl_gain] base = bc {best['bc_steps']} steps; wrote {out / 'rl_gain_base.json'}")


def train_overrides(args: argparse.Namespace, runs: Path, name: str) -> list[str]:
    """The `vla-rl train` overrides of phase rl; --set ones come last, so they win."""
    setup = setup_of(args)
    return [*model_overrides(setup, args.base), *env_overrides(args),
            *rl_overrides(setup, args.algorithm, args.group_size, args.lr, args.update_epochs,
                          args.mini_batches, args.micro_batch, args.temperature, args.value_coef,
                          args.reward_scale, args.max_staleness),
            f"runner.logger.log_path={runs}", f"runner.logger.experiment_name={name}",
            f"runner.max_epochs={args.iterations}", f"runner.val_check_interval={args.eval_every}",
            f"runner.save_interval={args.save_every}", f"runner.seed={args.seed}",
            *args.set]  # fmt: skip


def phase_rl(args: argparse.Namespace) -> None:
    out = Path(args.out)
    name = f"{args.algorithm}_{args.model}"
    runs = Path(args.work) / "runs"
    run_dir = runs / name
    if not args.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["train", *train_overrides(args, runs, name)]
    t0 = time.monotonic()
    run_cli(*cmd, log=out / f"{name}_train.log", deadline_s=args.minutes * 60)
    train_s = time.monotonic() - t0
    checkpoint = latest_checkpoint(run_dir)
    from vla_rl.report import plot_learning_curve

    env_steps_per_iteration = args.envs * args.envs_per_server * args.episode_steps
    curve = plot_learning_curve(run_dir, env_steps_per_iteration, title=name)
    shutil.copy(curve, out / f"{name}_learning_curve.png")
    table = sampled = None
    if not args.no_table:
        table = eval_table(args, args.base, out / f"{name}_table", str(checkpoint))
        sampled = sampled_table(args, args.base, out / f"{name}_sampled_table", str(checkpoint))
    periodic = {
        p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("step_*.json"))
    }
    result = {"phase": "rl", "args": vars(args), "train_wall_s": train_s,
              "checkpoint": checkpoint.name, "iterations": int(checkpoint.name.split("_")[-1]),
              "table": table, "sampled_table": sampled, "periodic_eval": {k: _eval_rate(v) for k, v in periodic.items()},
              "against_base": against_base(out, table, sampled, name), **machine()}  # fmt: skip
    (out / f"rl_gain_{name}.json").write_text(json.dumps(result, indent=2))
    shutil.copytree(run_dir / "tensorboard", out / f"{name}_tensorboard", dirs_exist_ok=True)
    print(f"[rl_gain] wrote {out / f'rl_gain_{name}.json'}", flush=True)


def against_base(out: Path, table: dict | None, sampled: dict | None, name: str) -> dict:
    """Each table against the base's of the same kind in --out (phase base wrote them), paired
    by start (McNemar's exact test); printed, and returned for the result JSON."""
    found = {}
    for kind, after in (("greedy", table), ("sampled", sampled)):
        base_file = out / f"base{'_sampled' if kind == 'sampled' else ''}_table" / "eval_table.json"
        if after is None or not base_file.is_file():
            continue
        try:
            rows, markdown = comparison(
                json.loads(base_file.read_text()), after, f"{name} ({kind})"
            )
        except ValueError as e:  # other starts than the base's: the run's tables still count
            print(f"[rl_gain] no paired comparison ({kind}): {e}", flush=True)
            found[kind] = {"error": str(e)}
            continue
        print(markdown, flush=True)
        found[kind] = rows
    return found


def _eval_rate(episodes: list[dict]) -> float | None:
    """Success rate of one periodic evaluation (eval/step_N.json holds its episodes)."""
    return sum(bool(e["success_once"]) for e in episodes) / len(episodes) if episodes else None


def machine() -> dict:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": {"gpu": gpu, "cpus": os.cpu_count(), "platform": platform.platform()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=["base", "rl"])
    p.add_argument("--out", default="benchmarks/results/rl_gain")
    p.add_argument("--work", default="/tmp/rl_gain")
    p.add_argument("--task", default="PushCube-v1")
    p.add_argument("--model", choices=["openvla", "openvlaoft"], default="openvla")
    p.add_argument("--chunk", type=int, default=5, help="OFT chunk (divides --episode-steps)")
    p.add_argument("--size", choices=BC_SIZES, default="tiny",
                   help="base: the BC model's size (vla-rl bc --size)")  # fmt: skip
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episode-steps", type=int, default=50)
    p.add_argument("--envs", type=int, default=16, help="env servers")
    p.add_argument("--envs-per-server", type=int, default=1,
                   help="training envs per server (more than 1: subprocesses)")  # fmt: skip
    p.add_argument("--splits", default=SPLITS)
    p.add_argument("--ignore-terminations", action="store_true",
                   help="training episodes run to their time limit (success does not end them)")  # fmt: skip
    p.add_argument("--reward-mode", choices=["normalized_dense", "dense", "sparse"],
                   default="normalized_dense", help="training reward (sparse: success)")  # fmt: skip
    p.add_argument("--eval-episodes", type=int, default=200, help="per split (+-7 points)")
    p.add_argument("--sampled-splits", default="train",
                   help="also a table with actions sampled at --temperature on these splits "
                        "('' for none)")  # fmt: skip
    # base
    p.add_argument("--demos", type=int, default=100)
    p.add_argument("--demo-noise", type=float, default=0.0,
                   help="collect-demos --action-noise (DART-style; labels stay the expert's)")  # fmt: skip
    p.add_argument("--bc-steps", type=int, nargs="+", default=[300, 600, 1200, 2400])
    p.add_argument("--bc-batch", type=int, default=64)
    p.add_argument("--bc-lr", type=float, default=3e-4)
    p.add_argument("--select-episodes", type=int, default=64)
    p.add_argument("--target-base", type=float, default=0.45)
    p.add_argument("--select-by", choices=["greedy", "sampled"], default="greedy",
                   help="pick the base by its greedy success or by its success sampled at "
                        "--temperature (the policy RL trains)")  # fmt: skip
    # rl
    p.add_argument("--algorithm", choices=["ppo", "grpo"], default="ppo")
    p.add_argument("--base", default=None, help="the base checkpoint (phase base's out/base)")
    p.add_argument("--minutes", type=float, default=7.0)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=5, help="checkpoints (a stop keeps the last)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --work from its latest checkpoint (e.g. a second call)",
    )
    p.add_argument("--no-table", action="store_true", help="skip the final evaluation table")
    p.add_argument("--periodic-eval-episodes", type=int, default=32)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--update-epochs", type=int, default=1)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--value-coef", type=float, default=1.0,
                   help="PPO: weight of the value loss in the LoRA's gradient (algorithm.value_coef)")  # fmt: skip
    p.add_argument("--reward-scale", type=float, default=1.0,
                   help="PPO: rewards x this before GAE (algorithm.reward_scale)")  # fmt: skip
    p.add_argument("--max-staleness", type=int, default=0,
                   help="collection runs up to this many versions ahead (algorithm.max_staleness)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="rl: one more `vla-rl train` override, given last so it wins (repeatable), "
                        "e.g. --set algorithm.logprob_type=token_level")  # fmt: skip
    args = p.parse_args(argv)
    if args.phase == "rl" and not args.base:
        p.error("rl needs --base")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    (phase_base if args.phase == "base" else phase_rl)(args)


if __name__ == "__main__":
    main()
