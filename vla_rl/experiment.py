"""`vla-rl experiment`: does RL make a warm-started VLA better? One command that tells the whole
story through the user-facing ones, each a subprocess with the real services:

  1. the warm-start base: scripted-expert demonstrations (`vla-rl collect-demos`) cloned into an
     OpenVLA-layout checkpoint (`vla-rl bc`); built once and cached under --cache, reused while its
     recipe (task, model, demos, BC steps, batch, lr, seed) is unchanged;
  2. the base evaluated greedily (`vla-rl eval`);
  3. PPO or GRPO from it (`vla-rl train`), a progress line per iteration;
  4. the trained adapter evaluated on the same seeds (`vla-rl eval --adapter`);
  5. a before/after table (success with 95% Wilson intervals, the difference) as markdown and JSON,
     and the learning curve PNG.

benchmarks/rl_gain.py uses the same pieces at GPU scale.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vla_rl.report import paired_outcomes

REPO = Path(__file__).resolve().parents[1]
# What a subprocess shows on our stdout (all of it goes to its log file): progress and results.
SHOW = re.compile(
    r"^(iter |eval |bc: |bc step .*0{2}/|\||train |vision |semantic |execution |"
    r"Traceback|\w*Error|error|config error|collect-demos|.*success)"
)


def run_cli(*args: str, log: Path | None = None, deadline_s: float | None = None) -> int:
    """Run `python -m vla_rl.cli ARGS` from the repository root, its output to `log` (progress
    lines also to stdout). Past `deadline_s` it gets SIGINT (the launcher's Ctrl-C path: every
    service stops, the latest checkpoint stays) and counts as a success."""
    cmd = [sys.executable, "-m", "vla_rl.cli", *args]
    print("$ vla-rl " + " ".join(args), flush=True)
    sink = open(log, "a") if log else None  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    start, stopped = time.monotonic(), False
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            line = proc.stdout.readline()
            if line:
                if SHOW.search(line):
                    print(line, end="", flush=True)
                if sink:
                    sink.write(line)
                continue
            if proc.poll() is not None:
                rest = proc.stdout.read() or ""
                print("".join(x for x in rest.splitlines(True) if SHOW.search(x)), end="")
                if sink:
                    sink.write(rest)
                break
            if deadline_s is not None and not stopped and time.monotonic() - start > deadline_s:
                print(f"{deadline_s:.0f} s passed: stopping the run (SIGINT)", flush=True)
                proc.send_signal(signal.SIGINT)
                stopped = True
            time.sleep(0.05)
    finally:
        if sink:
            sink.close()
        if proc.poll() is None:
            proc.kill()
    return proc.returncode if not stopped else 0


@dataclass
class Setup:
    """What the base, the evaluations and the RL run share (benchmarks/rl_gain.py fills it from
    its own flags)."""

    task: str = "PushCube-v1"
    model: str = "openvla"
    """'openvla' (7 tokens one after another) or 'openvlaoft' (a chunk in parallel)."""
    chunk: int = 5
    """OFT action chunk (divides episode_steps)."""
    device: str = "cpu"
    """'cpu' or 'cuda' (component placement and BC device)."""
    episode_steps: int = 50
    envs: int = 2
    """Env servers (evaluation plays one episode per server at a time)."""
    envs_per_server: int = 1
    reward_mode: str = "normalized_dense"
    ignore_terminations: bool = False
    periodic_eval_episodes: int = 2
    lora_rank: int = 32
    eval_videos: bool = False
    work: str = "runs/experiment"
    """Logs and the eval runs' directories."""


def setup_from_args(args: argparse.Namespace, work: str, eval_videos: bool = False) -> Setup:
    """The Setup of a command line that has Setup's flags (this module's, benchmarks/rl_gain.py)."""
    return Setup(
        task=args.task, model=args.model, chunk=args.chunk, device=args.device,
        episode_steps=args.episode_steps, envs=args.envs, envs_per_server=args.envs_per_server,
        reward_mode=args.reward_mode, ignore_terminations=args.ignore_terminations,
        periodic_eval_episodes=args.periodic_eval_episodes, lora_rank=args.lora_rank,
        eval_videos=eval_videos, work=work,
    )  # fmt: skip


def model_overrides(s: Setup, base: str) -> list[str]:
    oft = s.model == "openvlaoft"
    return [
        f"actor.model.model_path={base}",
        f"actor.model.model_type={'openvla_oft' if oft else 'openvla'}",
        f"actor.model.num_action_chunks={s.chunk if oft else 1}",
        f"actor.lora.rank={s.lora_rank}",
        f"actor.lora.alpha={s.lora_rank}",
    ]


def env_overrides(s: Setup) -> list[str]:
    """Training and evaluation envs on the same `s.envs` env servers, `s.episode_steps` long
    episodes, greedy evaluation (as the tables are)."""
    placement = "cpu" if s.device == "cpu" else "0"
    steps = s.episode_steps
    return [
        f"cluster.component_placement={{actor: {placement}, rollout: {placement}, env: {placement}}}",
        f"env.train.task_ids=[{s.task}]",
        f"env.eval.task_ids=[{s.task}]",
        f"env.train.total_num_envs={s.envs * s.envs_per_server}",
        f"env.train.num_servers={s.envs}",
        f"env.train.max_episode_steps={steps}",
        f"env.train.max_steps_per_rollout_epoch={steps}",
        f"env.train.ignore_terminations={str(s.ignore_terminations).lower()}",
        f"env.train.reward_mode={s.reward_mode}",
        f"env.eval.num_servers={s.envs}",
        f"env.eval.total_num_envs={s.periodic_eval_episodes}",
        f"env.eval.max_episode_steps={steps}",
        f"env.eval.max_steps_per_rollout_epoch={steps}",
        f"env.eval.video_cfg.save_video={str(s.eval_videos).lower()}",
        "rollout.sampling_params.temperature_eval=0",
    ]


def eval_table(
    s: Setup,
    base: str,
    out: Path,
    adapter: str | None,
    splits: str,
    episodes: int,
    temperature: float = 0.0,
) -> dict:
    """`vla-rl eval` of `base` (with `adapter`) on `splits`; returns eval_table.json. The
    actions are greedy unless `temperature` > 0 (then sampled, as training samples them)."""
    cmd = ["eval", "--splits", splits, "--episodes", str(episodes), "--out", str(out)]
    if adapter:
        cmd += ["--adapter", adapter]
    cmd += model_overrides(s, base) + env_overrides(s)
    if temperature > 0:
        cmd += [f"rollout.sampling_params.temperature_eval={temperature}"]
    cmd += [
        f"runner.logger.log_path={s.work}/eval_runs",
        f"runner.logger.experiment_name={out.name}",
    ]
    if s.eval_videos:
        cmd += [f"env.eval.video_cfg.video_base_dir={out / 'video'}"]
    log = out.with_suffix(".log")
    if run_cli(*cmd, log=log) != 0:
        raise SystemExit(f"vla-rl eval failed; see {log}")
    return json.loads((out / "eval_table.json").read_text())


@dataclass
class BaseRecipe:
    """How the warm-start base is made; the cache is reused only for the same recipe."""

    task: str
    model: str
    chunk: int
    demos: int
    demo_noise: float
    bc_steps: int
    bc_batch: int
    bc_lr: float
    seed: int


def ensure_base(recipe: BaseRecipe, cache: Path, device: str) -> Path:
    """The cached base checkpoint for `recipe`, built from scripted-expert demonstrations first
    when missing or made by another recipe."""
    base, stamp = cache / "base", cache / "recipe.json"
    if (base / "model.safetensors").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == asdict(recipe):
            print(f"warm-start base: cached at {base} ({recipe.bc_steps} BC steps)", flush=True)
            return base
    print(f"warm-start base: building it once into {cache}", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    demos = cache / "demos"
    rc = run_cli(
        "collect-demos", "--task", recipe.task, "--episodes", str(recipe.demos),
        "--seed", str(recipe.seed), "--out", str(demos), "--quiet",
        "--action-noise", str(recipe.demo_noise), log=cache / "collect_demos.log",
    )  # fmt: skip
    if rc != 0:
        raise SystemExit(f"collect-demos failed; see {cache / 'collect_demos.log'}")
    cmd = ["bc", "--demos", str(demos), "--out", str(base), "--steps", str(recipe.bc_steps),
           "--batch-size", str(recipe.bc_batch), "--lr", str(recipe.bc_lr),
           "--device", device, "--seed", str(recipe.seed), "--model", recipe.model]  # fmt: skip
    if recipe.model == "openvlaoft":
        cmd += ["--chunk", str(recipe.chunk)]
    if run_cli(*cmd, log=cache / "bc.log") != 0:
        raise SystemExit(f"bc failed; see {cache / 'bc.log'}")
    stamp.write_text(json.dumps(asdict(recipe), indent=2))
    return base


def rl_overrides(
    s: Setup,
    algorithm: str,
    group_size: int,
    lr: float,
    update_epochs: int,
    mini_batches: int,
    micro_batch: int,
    temperature: float,
    value_coef: float = 1.0,
    reward_scale: float = 1.0,
    max_staleness: int = 0,
) -> list[str]:
    """The algorithm and actor keys of an RL run from the base (one iteration = one episode of
    every training env). max_staleness > 0 lets collection run that many versions ahead of the
    learner (decoupled PPO), so collecting and updating overlap."""
    if algorithm == "grpo" and (value_coef != 1.0 or reward_scale != 1.0):
        raise SystemExit("--value-coef and --reward-scale are PPO's (GRPO has no critic)")
    algo = (
        ["algorithm.adv_type=grpo", "algorithm.loss_type=actor",
         f"algorithm.group_size={group_size}", "algorithm.normalize_advantages=false"]
        if algorithm == "grpo" else ["algorithm.adv_type=gae", "algorithm.loss_type=actor_critic",
                                     f"algorithm.value_coef={value_coef}",
                                     f"algorithm.reward_scale={reward_scale}"]
    )  # fmt: skip
    decisions = decisions_per_iteration(s)
    batch = max(1, decisions // mini_batches)
    # The learner needs global_batch_size to be a multiple of micro_batch_size.
    micro = max(d for d in range(1, min(micro_batch, batch) + 1) if batch % d == 0)
    return [
        *algo,
        f"algorithm.update_epoch={update_epochs}",
        f"algorithm.max_staleness={max_staleness}",
        f"actor.optim.lr={lr}",
        f"actor.global_batch_size={batch}",
        f"actor.micro_batch_size={micro}",
        f"rollout.sampling_params.temperature_train={temperature}",
    ]


def decisions_per_iteration(s: Setup) -> int:
    per_env = s.episode_steps // (s.chunk if s.model == "openvlaoft" else 1)
    return s.envs * s.envs_per_server * per_env


def latest_checkpoint(run_dir: Path) -> Path:
    steps = sorted(
        run_dir.glob("checkpoints/global_step_*"), key=lambda p: int(p.name.split("_")[-1])
    )
    if not steps:
        raise SystemExit(f"no checkpoint under {run_dir}/checkpoints")
    return steps[-1]


def comparison(before: dict, after: dict, after_label: str) -> tuple[dict, str]:
    """Rows of base vs after RL per split (rate, 95% interval, episodes) and whether the change
    is significant. Both evaluations play the same starts, so each split is tested paired by
    start (McNemar's exact test, 5% level: how many starts RL gained and lost); a table without
    its episodes falls back to the Wilson intervals not overlapping, which is weaker."""
    rows = {}
    for split, b in before["rows"].items():
        a = after["rows"].get(split)
        if a is None:
            continue
        row = {"base": b, "after": a, "gain": a["success_rate"] - b["success_rate"]}
        if "ci95" not in b:  # the OOD average: a mean of rates, no test of its own
            row["verdict"] = "-"
        else:
            paired = _paired(before, after, split)
            if paired is not None:
                row["paired"] = paired
                significant = paired["p_value"] < 0.05
                up = paired["gained"] > paired["lost"]
            else:
                significant = b["ci95"][0] > a["ci95"][1] or a["ci95"][0] > b["ci95"][1]
                up = a["success_rate"] > b["success_rate"]
            row["verdict"] = (
                ("better" if up else "worse") if significant else "no significant change"
            )
        rows[split] = row
    lines = [
        f"| split | base | {after_label} | gain | starts gained / lost (McNemar p) | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for split, r in rows.items():
        paired = r.get("paired")
        flips = (
            f"{paired['gained']} / {paired['lost']} (p = {paired['p_value']:.3g})"
            if paired
            else "-"
        )
        lines.append(
            f"| {split} | {_pct(r['base'])} | {_pct(r['after'])} | {100 * r['gain']:+.1f} pts "
            f"| {flips} | {r['verdict']} |"
        )
    return rows, "\n".join(lines) + "\n"


def _paired(before: dict, after: dict, split: str) -> dict | None:
    """McNemar's test of one split, or None when a table lacks that split's episodes."""
    b, a = before.get("episodes", {}).get(split), after.get("episodes", {}).get(split)
    if not b or not a:
        return None
    return paired_outcomes(b, a)


def _pct(row: dict) -> str:
    if "ci95" not in row:
        return f"{100 * row['success_rate']:.1f}%"
    low, high = row["ci95"]
    return (
        f"{100 * row['success_rate']:.1f}% ({100 * low:.0f}-{100 * high:.0f}), n={row['episodes']}"
    )


def run_experiment(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    setup = setup_from_args(args, work=str(out), eval_videos=args.videos)
    recipe = BaseRecipe(
        task=args.task, model=args.model, chunk=args.chunk, demos=args.demos,
        demo_noise=args.demo_noise, bc_steps=args.bc_steps, bc_batch=args.bc_batch,
        bc_lr=args.bc_lr, seed=args.seed,
    )  # fmt: skip
    t0 = time.monotonic()
    cache = Path(args.cache) / f"{args.task}_{args.model}"
    run_dir = out / "train"
    cmd = ["train", *model_overrides(setup, str(cache / "base")), *env_overrides(setup),
           *rl_overrides(setup, args.algorithm, args.group_size, args.lr, args.update_epochs,
                         args.mini_batches, args.micro_batch, args.temperature, args.value_coef, args.reward_scale,
                         args.max_staleness),
           f"runner.logger.log_path={out}", "runner.logger.experiment_name=train",
           f"runner.max_epochs={args.iterations}", f"runner.val_check_interval={args.eval_every}",
           f"runner.save_interval={args.save_every}", f"runner.seed={args.seed}"]  # fmt: skip
    # The training config is checked before minutes go into the base and its evaluation.
    check = subprocess.run(
        [sys.executable, "-m", "vla_rl.cli", *cmd, "--print-config"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if check.returncode != 0:
        raise SystemExit(f"the training config is refused: {check.stderr.strip()}")
    base = ensure_base(recipe, cache, args.device)
    out.mkdir(parents=True, exist_ok=True)
    before = eval_table(setup, str(base), out / "base_eval", None, args.splits, args.eval_episodes)
    shutil.rmtree(run_dir, ignore_errors=True)
    deadline = args.minutes * 60 if args.minutes else None
    if run_cli(*cmd, log=out / "train.log", deadline_s=deadline) != 0:
        raise SystemExit(f"vla-rl train failed; see {out / 'train.log'}")
    checkpoint = latest_checkpoint(run_dir)
    after = eval_table(
        setup, str(base), out / "after_eval", str(checkpoint), args.splits, args.eval_episodes
    )
    label = f"after {args.algorithm.upper()} ({checkpoint.name.split('_')[-1]} iterations)"
    rows, table = comparison(before, after, label)
    result = {"setup": asdict(setup), "base_recipe": asdict(recipe), "base": str(base),
              "algorithm": args.algorithm, "checkpoint": str(checkpoint), "rows": rows,
              "wall_s": time.monotonic() - t0}  # fmt: skip
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    (out / "comparison.md").write_text(table)
    curve = run_dir / "learning_curve.png"
    print(table, end="")
    print(
        f"wrote {out / 'comparison.md'}, comparison.json and the learning curve {curve} "
        f"({result['wall_s'] / 60:.1f} min)",
        flush=True,
    )
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`vla-rl experiment`'s flags; the defaults are the laptop-scale run of `bash scripts/run.sh`."""
    p.add_argument("--out", default="runs/experiment", help="tables, logs, the RL run")
    p.add_argument("--cache", default="checkpoints/warm_start", help="where the base is cached")
    p.add_argument("--task", default="PushCube-v1")
    p.add_argument("--model", choices=["openvla", "openvlaoft"], default="openvla")
    p.add_argument("--chunk", type=int, default=5, help="OFT chunk (divides --episode-steps)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episode-steps", type=int, default=50)
    p.add_argument("--envs", type=int, default=2, help="env servers")
    p.add_argument("--envs-per-server", type=int, default=1)
    p.add_argument("--reward-mode", choices=["normalized_dense", "dense", "sparse"],
                   default="sparse", help="training reward (sparse: 1 while the task is solved)")  # fmt: skip
    p.add_argument("--ignore-terminations", action=argparse.BooleanOptionalAction, default=True,
                   help="training episodes run to their time limit (success does not end them)")  # fmt: skip
    p.add_argument("--videos", action="store_true", help="MP4 of every evaluation episode")
    # the base
    p.add_argument("--demos", type=int, default=100, help="scripted-expert episodes")
    p.add_argument("--demo-noise", type=float, default=0.0,
                   help="collect-demos --action-noise: DART-style noise on the executed actions")  # fmt: skip
    p.add_argument("--bc-steps", type=int, default=500)
    p.add_argument("--bc-batch", type=int, default=64)
    p.add_argument("--bc-lr", type=float, default=3e-4)
    # evaluation
    p.add_argument(
        "--eval-episodes", type=int, default=48, help="per split, greedy, before and after"
    )
    p.add_argument("--splits", default="train",
                   help="comma-separated: train, vision, semantic, execution (see vla-rl eval)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=-1, help="periodic evaluation (-1: none)")
    p.add_argument("--periodic-eval-episodes", type=int, default=2)
    # RL
    p.add_argument("--algorithm", choices=["ppo", "grpo"], default="ppo")
    p.add_argument("--group-size", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--minutes", type=float, default=0, help="stop training after (0: no limit)")
    p.add_argument("--save-every", type=int, default=5)
    # Measured on 2 cores (README): lr 3e-4 with 2 epochs took the base from 33% to 2% in 20
    # iterations of 2 envs (most batches hold no success, and standardised advantages of such a
    # batch are critic noise); lr 1e-4 with 1 epoch left it within its interval.
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--update-epochs", type=int, default=1)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--value-coef", type=float, default=1.0,
                   help="PPO: weight of the value loss in the LoRA's gradient (algorithm.value_coef)")  # fmt: skip
    p.add_argument("--reward-scale", type=float, default=1.0,
                   help="PPO: rewards x this before GAE (algorithm.reward_scale)")  # fmt: skip
    p.add_argument("--max-staleness", type=int, default=0,
                   help="collection runs up to this many policy versions ahead of the learner "
                        "(algorithm.max_staleness; decoupled PPO): collecting overlaps updating")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=32)
