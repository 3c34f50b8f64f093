"""The whole training loop (`vla-rl train`: ManiSkill3 env servers, rollout servers, the FSDP
learner) on one machine of N GPUs in each of RLinf's three placements, the same config otherwise,
with the 1-GPU run of that config as the baseline in the same command:

- baseline: everything on GPU 0;
- collocated: everything on all N GPUs (rollout and learner take turns on them);
- disaggregated: env + rollout on the first half, the learner on the second, with
  rollout.pipeline_stage_num 2 and algorithm.max_staleness 1, so collection overlaps training;
- hybrid: env on the first half, rollout on the second, the learner on all N (RLinf's default
  recipe, scaled to N);
- overlapped: the baseline's one GPU with disaggregated's overlap (pipeline stages 2,
  max_staleness 1): against the baseline, what overlapping the phases buys on one GPU.

    python benchmarks/placements.py --gpus 4 --placements baseline,collocated
    python benchmarks/placements.py --gpus 4 --placements disaggregated,hybrid
    python benchmarks/placements.py --gpus 1 --placements baseline,overlapped \
        --set rollout.engine=vllm --set rollout.gpu_memory_utilization=0.25 --tag _1gpu_vllm
    python benchmarks/placements.py --gpus 0 --size tiny --iterations 2 --servers 1 --envs 2  # CPU smoke

`--set KEY=VALUE` (repeatable) adds a config override to every placement of the command, so
the baseline and the others differ only in placement. For each placement: env steps/s over the
iterations after the first (which holds the start-up), and the median seconds of each learner
phase (collect_wait, prepare, update, checkpoint, publish). Rollout replicas: one per rollout
GPU; env servers: `--servers` spread over the env GPUs. One JSON per placement under --out (and
$OUT), so that placements run in separate calls compare through their ratios to a baseline run
in the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PLACEMENTS = ("baseline", "collocated", "disaggregated", "hybrid", "overlapped")
PHASES = ("collect_wait", "prepare", "update", "checkpoint", "publish")


def _ranks(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def placement_overrides(name: str, gpus: int) -> list[str]:
    """The overrides that make `name` on a machine of `gpus` GPUs (0: everything on the CPU,
    the placement's other settings kept: a smoke test of this script)."""
    # Disaggregated: collection of the next version overlaps the update of this one.
    extra = ["rollout.pipeline_stage_num=2", "algorithm.max_staleness=1"]
    extra = extra if name in ("disaggregated", "overlapped") else []
    if gpus == 0:
        return [
            'cluster.component_placement={"actor,rollout,env": cpu}',
            "rollout.replicas=1",
            *extra,
        ]
    if name not in ("baseline", "overlapped") and gpus < 2:
        raise SystemExit(f"{name} needs at least 2 GPUs")
    half = gpus // 2
    first, second, every = _ranks(0, half - 1), _ranks(half, gpus - 1), _ranks(0, gpus - 1)
    spec, replicas = {
        "baseline": ('{"actor,rollout,env": 0}', 1),
        "overlapped": ('{"actor,rollout,env": 0}', 1),
        "collocated": (f'{{"actor,rollout,env": {every}}}', gpus),
        "disaggregated": (f"{{env: {first}, rollout: {first}, actor: {second}}}", half),
        "hybrid": (f"{{env: {first}, rollout: {second}, actor: {every}}}", gpus - half),
    }[name]
    return [f"cluster.component_placement={spec}", f"rollout.replicas={replicas}", *extra]


def common_overrides(args: argparse.Namespace, checkpoint: str, runs: Path) -> list[str]:
    steps = args.episode_steps
    return [
        f"runner.logger.log_path={runs}", f"runner.max_epochs={args.iterations}",
        f"actor.model.model_path={checkpoint}",
        f"actor.model.precision={'bf16' if args.gpus else 'fp32'}",
        f"rollout.precision={'bf16' if args.gpus else 'fp32'}",
        f"actor.micro_batch_size={args.micro}", f"actor.global_batch_size={args.global_batch}",
        f"actor.fsdp_config.sharding_strategy={args.sharding}",
        f"actor.fsdp_config.gradient_checkpointing={str(bool(args.gpus)).lower()}",
        f"env.train.total_num_envs={args.envs}", f"env.train.num_servers={args.servers}",
        f"env.train.max_episode_steps={steps}", f"env.train.max_steps_per_rollout_epoch={steps}",
        f"rollout.max_batch_size={args.rollout_batch}",
    ]  # fmt: skip


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_placement(name: str, args: argparse.Namespace, checkpoint: str, runs: Path) -> dict:
    experiment = f"placement_{name}"
    overrides = common_overrides(args, checkpoint, runs) + placement_overrides(name, args.gpus)
    overrides += args.set
    overrides.append(f"runner.logger.experiment_name={experiment}")
    log = Path(args.out) / f"{experiment}{args.tag}.log"
    t0 = time.perf_counter()
    if not args.results_only:
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "vla_rl.cli", "train", *overrides],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": _pythonpath()}).returncode  # fmt: skip
        if rc != 0:
            tail = log.read_text(errors="replace")[-3000:]
            return {"placement": name, "failed": rc, "log_tail": tail, "overrides": overrides}
    wall = time.perf_counter() - t0
    run_dir = runs / experiment
    values = scalars(run_dir)
    steady = values["time/iteration_s"][1:]  # the first holds the services' start-up
    steps_per_iteration = args.envs * args.episode_steps
    result = {
        "placement": name,
        "overrides": overrides,
        "iteration_s": values["time/iteration_s"],
        "steady_env_steps_per_s": steps_per_iteration / statistics.mean(steady),
        "median_phase_s": {
            p: statistics.median(values[f"time/{p}_s"][1:] or values[f"time/{p}_s"])
            for p in PHASES
            if f"time/{p}_s" in values
        },
    }
    if not args.results_only:
        result["wall_s_including_startup"] = wall
    if (run_dir / "summary.json").exists():  # a run that ended with an error has none
        summary = json.loads((run_dir / "summary.json").read_text())
        result["env_steps"] = sum(e["env_steps"] for e in summary["env"])
        result["rollout_replicas"] = len(summary["rollout"])
        # Each env server's seconds per iteration (all iterations, the first included) waiting
        # for actions, stepping its envs and waiting for the learner's next version.
        servers = [e["seconds"] for e in summary["env"] if "seconds" in e]
        if servers:
            result["env_server_s_per_iteration"] = {
                k: statistics.mean(s[k] for s in servers) / args.iterations for k in servers[0]
            }
    return result


def _pythonpath() -> str:
    """This repository first, so that the children import its vla_rl without an install."""
    rest = os.environ.get("PYTHONPATH")
    return str(REPO) + (os.pathsep + rest if rest else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=4, help="GPUs of this machine (0: CPU smoke)")
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    ap.add_argument("--size", choices=["tiny", "7b"], default="7b")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--envs", type=int, default=32, help="env.train.total_num_envs")
    ap.add_argument("--servers", type=int, default=8, help="env.train.num_servers")
    ap.add_argument("--episode-steps", type=int, default=10)
    ap.add_argument("--micro", type=int, default=20, help="actor.micro_batch_size")
    ap.add_argument("--global-batch", type=int, default=160, help="actor.global_batch_size")
    ap.add_argument("--rollout-batch", type=int, default=64, help="rollout.max_batch_size")
    ap.add_argument("--sharding", default="no_shard", help="actor.fsdp_config.sharding_strategy")
    ap.add_argument("--work", default="/tmp/placements")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "placements"))
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every placement (repeatable)")  # fmt: skip
    ap.add_argument(
        "--results-only",
        action="store_true",
        help="read the runs already under --work instead of training again",
    )
    args = ap.parse_args()
    names = args.placements.split(",")
    unknown = set(names) - set(PLACEMENTS)
    if unknown:
        raise SystemExit(f"unknown placements {sorted(unknown)}; choose from {PLACEMENTS}")
    work, out = Path(args.work), Path(args.out)
    checkpoint = work / f"openvla-{args.size}-random"
    from vla_rl.config.loader import ConfigError, load_config

    for name in names:  # refuse a bad placement or --set before anything starts
        try:
            load_config(overrides=common_overrides(args, str(checkpoint), work / "runs")
                        + placement_overrides(name, args.gpus) + args.set)  # fmt: skip
        except ConfigError as e:
            raise SystemExit(f"{name}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    if not (checkpoint / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "random_checkpoint.py"),
                        str(checkpoint), "--size", args.size,
                        "--device", "cuda" if args.gpus else "cpu"], check=True,
                       env={**os.environ, "PYTHONPATH": _pythonpath()})  # fmt: skip
    import torch

    card = torch.cuda.get_device_name(0) if args.gpus else "cpu"
    for name in names:
        print(f"[placements] {name} on {args.gpus or 'no'} GPUs ...", flush=True)
        result = run_placement(name, args, str(checkpoint), work / "runs")
        result.update({"card": card, "gpus": args.gpus, "size": args.size,
                       "envs": args.envs, "servers": args.servers,
                       "episode_steps": args.episode_steps, "iterations": args.iterations})  # fmt: skip
        text = json.dumps(result, indent=2)
        path = out / f"{name}{args.tag}.json"
        path.write_text(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], path.name).write_text(text)
        if "failed" in result:
            print(f"[placements] {name} FAILED (exit {result['failed']}):\n{result['log_tail']}")
            continue
        phases = " ".join(f"{p} {s:.1f}" for p, s in result["median_phase_s"].items())
        env_s = result.get("env_server_s_per_iteration", {})
        phases += "; env server s/iteration: " + " ".join(f"{k} {v:.1f}" for k, v in env_s.items())
        print(f"[placements] {name}: {result['steady_env_steps_per_s']:.1f} env steps/s "
              f"(iterations {[round(s, 1) for s in result['iteration_s']]}; median s: {phases})",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
