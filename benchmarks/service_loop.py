"""Throughput of the service system on the CPU, in one run:

1. env server: env steps/s of the ManiSkill3 env pool (PickCube-v1, 224x224 RGB, random actions),
   1 and 2 envs;
2. rollout: actions/s through gRPC Act to a rollout server (torch engine, tiny model) next to the
   same engine called in-process (the baseline: the ratio is the price of the service);
3. the whole loop: env steps/s of `vla-rl train` (tiny PPO), with rollout.pipeline_stage_num 1
   and 2, and with algorithm.max_staleness 1 (collection one version ahead, decoupled PPO).

    python benchmarks/service_loop.py            # writes benchmarks/results/service_loop_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.env_server.env_pool import EnvPool, EnvPoolConfig  # noqa: E402
from services.rollout_server.engines.torch_engine import TorchEngine  # noqa: E402
from tests.helpers.procs import ServiceProcess  # noqa: E402
from vla_rl.models.tiny import write_tiny_checkpoint  # noqa: E402
from vla_rl.rpc.rollout_client import RolloutClient  # noqa: E402

INSTRUCTION = "pick up the red cube and move it to the goal position"


def env_steps_per_s(num_envs: int, steps: int) -> float:
    pool = EnvPool(EnvPoolConfig(num_envs=num_envs, max_episode_steps=50, worker_mode="in_process"))
    try:
        pool.reset()
        rng = np.random.default_rng(0)
        pool.step(rng.uniform(-1, 1, (num_envs, 7)).astype(np.float32))  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            pool.step(rng.uniform(-1, 1, (num_envs, 7)).astype(np.float32))
        return num_envs * steps / (time.perf_counter() - t0)
    finally:
        pool.close()


def rollout_actions_per_s(ckpt: Path, batch: int, repeats: int, tmp: Path) -> dict[str, float]:
    images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    texts = [INSTRUCTION] * batch
    engine = TorchEngine(ckpt)
    engine.act(images, texts)
    t0 = time.perf_counter()
    for _ in range(repeats):
        engine.act(images, texts)
    local = batch * repeats / (time.perf_counter() - t0)
    # The server gets as many torch threads as the in-process baseline.
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = ServiceProcess(
        "services.rollout_server.main", ["--checkpoint", str(ckpt)], tmp, "bench", env=threads
    )
    try:
        proc.wait_healthy()
        client = RolloutClient(proc.target)
        client.act(images, texts)
        t0 = time.perf_counter()
        for _ in range(repeats):
            client.act(images, texts)
        remote = batch * repeats / (time.perf_counter() - t0)
        client.close()
    finally:
        proc.stop()
    return {"in_process": local, "grpc": remote, "grpc_over_in_process": remote / local}


def whole_loop(stages: int, iterations: int, tmp: Path, staleness: int = 0) -> dict[str, float]:
    name = f"bench_stages{stages}_staleness{staleness}"
    cmd = [
        sys.executable, "-m", "vla_rl.cli", "train",
        f"runner.logger.log_path={tmp}", f"runner.logger.experiment_name={name}",
        f"runner.max_epochs={iterations}", "env.train.total_num_envs=2",
        "env.train.max_episode_steps=16", "env.train.max_steps_per_rollout_epoch=16",
        f"rollout.pipeline_stage_num={stages}", f"algorithm.max_staleness={staleness}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    summary = json.loads((tmp / name / "summary.json").read_text())
    steps = sum(e["env_steps"] for e in summary["env"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp / name / "tensorboard"))
    acc.Reload()
    # Steady state: iterations after the first (which includes the services' start-up).
    iteration_s = [e.value for e in acc.Scalars("time/iteration_s")][1:]
    per_iteration = steps / iterations
    return {
        "env_steps": steps,
        "wall_s_including_startup": wall,
        "steady_env_steps_per_s": per_iteration / (sum(iteration_s) / len(iteration_s)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--env-steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/service_loop_cpu.json"))
    args = p.parse_args()
    results: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results["env_steps_per_s"] = {
            f"{n}_envs": env_steps_per_s(n, args.env_steps // n) for n in (1, 2)
        }
        print("env server:", results["env_steps_per_s"], flush=True)
        ckpt = write_tiny_checkpoint(tmp / "ckpt")
        results["rollout_actions_per_s"] = {
            f"batch_{b}": rollout_actions_per_s(ckpt, b, args.repeats, tmp) for b in (2, 8)
        }
        print("rollout:", results["rollout_actions_per_s"], flush=True)
        results["whole_loop"] = {
            f"pipeline_stages_{s}": whole_loop(s, args.iterations, tmp) for s in (1, 2)
        }
        results["whole_loop"]["pipeline_stages_1_max_staleness_1"] = whole_loop(
            1, args.iterations, tmp, staleness=1
        )
        print("whole loop:", results["whole_loop"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
