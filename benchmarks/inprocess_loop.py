"""What the services cost: one training config run twice, in the same command.

1. `vla-rl train`: env servers, a rollout server and the learner as processes, observations and
   actions over gRPC, segments through the buffer (redis-server, or the served in-memory store
   where none is installed), adapters pushed over gRPC.
2. The same loop in this one process, built from the same config by the services' own code
   (launch_plan, collection_config, Collector, the rollout server's engine, batcher and action
   decoding, the learner's build_learner and Learner): collection threads call the batcher
   directly, segments go through an in-process memory buffer, and each new adapter is handed to
   the engine without gRPC.

Both report steady env steps/s (iterations after the first, which holds start-up): env steps
of those iterations / their `time/iteration_s`. The ratio services / in-process is the price of
the services; issue 12 asks for at most 5% at the 7B shapes.

    python benchmarks/inprocess_loop.py --iterations 5              # tiny default, CPU
    python benchmarks/inprocess_loop.py --iterations 5 --gpus 1 -- \\
        actor.model.model_path=/tmp/openvla7b env.train.total_num_envs=16 ...   # lent GPU

Results: benchmarks/results/inprocess_loop/<machine><tag>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # vla_rl and services, where the package is not installed

import torch  # noqa: E402

from services.env_server.collector import ActResult, Collector  # noqa: E402
from services.env_server.servicer import collection_config  # noqa: E402
from services.learner.main import build_learner, learner_plan  # noqa: E402
from services.rollout_server.batcher import DynamicBatcher  # noqa: E402
from services.rollout_server.main import build_engine  # noqa: E402
from services.rollout_server.main import parse_args as rollout_args  # noqa: E402
from services.rollout_server.servicer import decode_actions  # noqa: E402
from vla_rl.buffer.memory import MemoryBuffer, MemoryStreamStore  # noqa: E402
from vla_rl.config import load_config  # noqa: E402
from vla_rl.launch import launch_plan, prepare_model  # noqa: E402
from vla_rl.models import ActionNormalizer, ActionTokenizer  # noqa: E402
from vla_rl.models.checkpoint import read_config  # noqa: E402
from vla_rl.rpc.gen.v1 import env_pb2  # noqa: E402


def steady_rate(env_steps: list[float], iteration_s: list[float]) -> float:
    """Env steps/s over the iterations after the first (start-up is in the first)."""
    if len(iteration_s) < 2:
        raise SystemExit("need at least 2 iterations (the first holds start-up)")
    return sum(env_steps[1:]) / sum(iteration_s[1:])


PHASES = ("time/collect_wait_s", "time/prepare_s", "time/update_s", "time/publish_s")


def phase_medians(per_phase: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds of each phase over the iterations after the first."""
    return {k: statistics.median(v[1:]) for k, v in per_phase.items() if len(v) > 1}


def _device(ranks: list[int] | str) -> torch.device:
    return torch.device("cpu" if ranks == "cpu" else f"cuda:{ranks[0]}")


def in_process_config(overrides: list[str], num_gpus: int, log_dir: Path):
    """The config, refused (before anything runs) where the in-process loop would not do what
    `vla-rl train` does with it."""
    cfg = load_config(None, [f"runner.logger.log_path={log_dir}", *overrides])
    if cfg.actor_world_size(num_gpus) != 1 or cfg.rollout.replicas != 1:
        raise SystemExit("the in-process loop runs one learner process and one rollout engine")
    if cfg.runner.val_check_interval > 0 or cfg.runner.resume_dir:
        raise SystemExit(
            "the in-process loop runs no periodic evaluation and no resume: leave "
            "runner.val_check_interval and runner.resume_dir unset"
        )
    return cfg


class _Decoded(Future):
    """The batcher's pending EngineOutput, decoded into an ActResult by whoever asks for the
    result (the collector's thread, as the env server decodes a gRPC reply in its own)."""

    def __init__(self, pending: Future, decode) -> None:
        super().__init__()
        self.pending, self.decode = pending, decode

    def result(self, timeout: float | None = None) -> ActResult:
        return self.decode(self.pending.result(timeout))


def in_process(overrides: list[str], num_gpus: int, log_dir: Path) -> dict:
    """Train the config's iterations in this process; per-iteration env steps and seconds."""
    cfg = in_process_config(overrides, num_gpus, log_dir)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = launch_plan(
        cfg, num_gpus, model_path=prepare_model(cfg, run_dir), buffer_url="memory://in-process",
        port=lambda kind: 0,
    )  # fmt: skip
    placement = plan.config.cluster.resolve(num_gpus)

    # The rollout server's engine, batcher and action decoding, without the server.
    flags = rollout_args(plan.rollout[0].args[2:])
    flags.device = str(_device(placement["rollout"]))
    engine = build_engine(flags)
    batcher = DynamicBatcher(engine, flags.max_batch_size, flags.max_wait_ms)
    model = read_config(flags.checkpoint)
    normalizer = ActionNormalizer.from_norm_stats(model.norm_stats, flags.unnorm_key)
    tokenizer, action_dim = ActionTokenizer(), int(model.action_dim)

    def decode(out) -> ActResult:
        actions = decode_actions(out.action_tokens, tokenizer, normalizer, action_dim)
        return ActResult(out.action_tokens, actions, out.logprobs, out.policy_version)

    def act(images, instructions, temperature: float) -> Future:
        return _Decoded(batcher.submit(images, instructions, temperature=temperature), decode)

    store = MemoryStreamStore()
    collectors = []
    for fields, server in zip(plan.collection, plan.env, strict=True):
        request = env_pb2.StartCollectionRequest(**fields)
        config = collection_config(request, server.name, fields["task_modules"])
        # What StartCollection takes from the rollout service's PolicyInfo.
        config.action_chunk = engine.action_chunk
        config.pool = dataclasses.replace(config.pool, action_dim=action_dim)
        config.__post_init__()
        buffer = MemoryBuffer(
            stream=fields["stream"], maxlen=fields["buffer_maxlen"] or None, store=store
        )
        collectors.append(Collector(config, act, lambda: engine.policy_version, buffer))

    per_iteration: dict[int, dict[str, float]] = {}

    def log_metrics(values: dict[str, float], step: int) -> None:
        per_iteration.setdefault(step, {}).update(values)

    learner_cfg = learner_plan(plan.config)
    learner = build_learner(
        learner_cfg, _device(placement["actor"]),
        MemoryBuffer(stream=plan.config.buffer.stream, store=store, consumer="learner-0"),
        lambda blob, version: engine.load_adapter(blob), log_metrics=log_metrics,
    )  # fmt: skip
    threads = [threading.Thread(target=c.run, daemon=True) for c in collectors]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    failed = lambda: [c.stats.error for c in collectors if c.stats.state == "failed"]  # noqa: E731
    try:
        # A collector that fails stops the run at once (vla-rl train watches its env servers).
        learner.run(stop=lambda: bool(failed()),
                    print_line=lambda line: print("[in-process]", line, flush=True))  # fmt: skip
        if failed():
            raise SystemExit(f"collection failed: {failed()}")
        served = engine.policy_version
    finally:
        for c in collectors:
            c.stop_event.set()
        for t in threads:
            t.join(timeout=60)
        batcher.close()
        engine.close()
    steps = [per_iteration[i]["rollout/env_steps"] for i in sorted(per_iteration)]
    seconds = [per_iteration[i]["time/iteration_s"] for i in sorted(per_iteration)]
    phases = {k: [per_iteration[i][k] for i in sorted(per_iteration)] for k in PHASES}
    return {"env_steps": steps, "iteration_s": seconds, "wall_s": time.perf_counter() - t0,
            "served_policy_version": served, "phase_medians_s": phase_medians(phases),
            "steady_env_steps_per_s": steady_rate(steps, seconds)}  # fmt: skip


def through_services(overrides: list[str], num_gpus: int, log_dir: Path) -> dict:
    """`vla-rl train` on the same config and the same GPUs; per-iteration env steps and
    seconds from its logs."""
    cmd = [sys.executable, "-m", "vla_rl.cli", "train", f"runner.logger.log_path={log_dir}",
           *overrides]  # fmt: skip
    env = dict(os.environ)
    if torch.cuda.is_available():  # vla-rl train places against the GPUs it can see
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(num_gpus))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"vla-rl train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print("\n".join("[services] " + line for line in proc.stdout.splitlines()
                    if line.startswith("iter")), flush=True)  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next(p for p in log_dir.iterdir() if (p / "tensorboard").is_dir())
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.value for e in acc.Scalars("rollout/env_steps")]
    seconds = [e.value for e in acc.Scalars("time/iteration_s")]
    phases = {k: [e.value for e in acc.Scalars(k)] for k in PHASES}
    return {"env_steps": steps, "iteration_s": seconds, "wall_s": wall,
            "phase_medians_s": phase_medians(phases),
            "steady_env_steps_per_s": steady_rate(steps, seconds)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count(),
                   help="GPUs both runs place against (the first N; default: all)")  # fmt: skip
    p.add_argument("--work", default="/tmp/inprocess_loop",
                   help="each run writes a new timestamped folder here (a run dir that exists "
                        "would make vla-rl train resume instead of train)")  # fmt: skip
    p.add_argument("--out", default=str(REPO / "benchmarks/results/inprocess_loop"))
    p.add_argument("--tag", default="")
    p.add_argument("overrides", nargs="*", help="config overrides, as for vla-rl train")
    args = p.parse_args(argv)
    overrides = [f"runner.max_epochs={args.iterations}", *args.overrides]
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")
    in_process_config(overrides, args.gpus, work / "in_process")  # refused before anything runs
    result: dict = {"overrides": overrides, "date": time.strftime("%Y-%m-%d"),
                    "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip
    result["services"] = through_services(
        [*overrides, "runner.logger.experiment_name=services"], args.gpus, work / "services"
    )
    result["in_process"] = in_process(
        [*overrides, "runner.logger.experiment_name=in_process"], args.gpus, work / "in_process"
    )
    ratio = (
        result["services"]["steady_env_steps_per_s"]
        / result["in_process"]["steady_env_steps_per_s"]
    )
    result["services_over_in_process"] = ratio
    print(f"steady env steps/s: services {result['services']['steady_env_steps_per_s']:.2f}, "
          f"in-process {result['in_process']['steady_env_steps_per_s']:.2f} "
          f"(services = {ratio:.2f}x in-process)", flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (result["gpu"] or "cpu").replace(" ", "_") + args.tag
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / name}.json")
    return result


if __name__ == "__main__":
    main()
