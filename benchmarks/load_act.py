"""Load on one rollout server: concurrent env-server-like clients calling Act, in one run.

One rollout server process (`python -m services.rollout_server.main`, torch engine, a tiny random
OpenVLA-architecture checkpoint, CPU by default) serves two phases of `--seconds` each:

1. the baseline: 1 client with `--envs` envs (one Act of `--envs` 224x224x3 uint8 images and
   instructions at a time, sampled at temperature 1, as an env server collecting does);
2. the load: `--clients` such clients at once, each its own process and gRPC channel.

Each client calls Act back to back until the phase's time is up (calls in flight then finish).
Reported per phase: Act calls, errors (must be 0: the script exits 1 otherwise), actions/s
(observations answered per second over the phase; one action each, the model's action_chunk is
1), and Act latency p50/p95/p99 as the client sees it; then the load's throughput and p50
latency over the baseline's. Results: `benchmarks/results/load_act/load_act_<tag>.json` and
`.md`, with the machine (CPU model and count, Python, torch, grpcio).

    .venv/bin/python benchmarks/load_act.py                     # 8 x 64 envs, 60 s per phase
    .venv/bin/python benchmarks/load_act.py --seconds 20 --clients 4 --envs 32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.procs import ServiceProcess  # noqa: E402
from vla_rl.rpc.rollout_client import RolloutClient  # noqa: E402

INSTRUCTIONS = [
    "pick up the red cube and move it to the goal position",
    "push the cube to the target",
    "stack the red cube on the green cube",
]
IMAGE = 224


def client_process(index: int, target: str, envs: int, seconds: float, start, ready, out) -> None:
    """One env-server-like client (a child process with its own channel): Act with `envs`
    observations, back to back, from the common start time (`start`, set by the parent once
    every client is ready) for `seconds`; puts its calls (start offset, latency, error) on
    `out`."""
    rng = np.random.default_rng(1000 + index)
    images = rng.integers(0, 256, (envs, IMAGE, IMAGE, 3), dtype=np.uint8)
    texts = [INSTRUCTIONS[(index + i) % len(INSTRUCTIONS)] for i in range(envs)]
    client = RolloutClient(target)
    calls = []
    try:
        client.policy()  # connected before the clock starts
        ready.set()
        while start.value == 0.0:
            time.sleep(0.005)
        start_at = start.value
        time.sleep(max(0.0, start_at - time.time()))
        end = start_at + seconds
        while time.time() < end:
            sent = time.time()
            t0 = time.perf_counter()
            error = None
            try:
                reply = client.act(images, texts, temperature=1.0)
                if reply.action_tokens.shape[0] != envs:
                    error = f"{reply.action_tokens.shape[0]} rows for {envs} envs"
            except Exception as e:  # noqa: BLE001 - counted and reported, never hidden
                error = f"{type(e).__name__}: {e}"
            calls.append((sent - start_at, time.perf_counter() - t0, error))
    finally:
        client.close()
        out.put((index, calls))


def run_phase(target: str, clients: int, envs: int, seconds: float) -> dict:
    """`clients` client processes against the server for `seconds`; their calls, summarised."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Value("d", 0.0)
    ready = [ctx.Event() for _ in range(clients)]
    procs = [
        ctx.Process(
            target=client_process,
            args=(i, target, envs, seconds, start, ready[i], out),
            daemon=True,
        )
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    # The children import numpy and grpc and connect first (seconds on a loaded machine); the
    # clock starts once all of them are ready.
    for event in ready:
        if not event.wait(timeout=300):
            raise RuntimeError("a client process did not get ready within 300 s")
    load_before = os.getloadavg()[0]
    start.value = time.time() + 0.5
    results = dict(out.get(timeout=seconds + 600) for _ in range(clients))
    for proc in procs:
        proc.join(timeout=30)
    summary = summarise(results, clients, envs, seconds)
    # Other work on the machine skews every number here: the 1-minute load average around the
    # phase says how much there was (this phase's own processes included).
    summary["load_average_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    return summary


def summarise(results: dict[int, list], clients: int, envs: int, seconds: float) -> dict:
    calls = [c for index in sorted(results) for c in results[index]]
    ok = [c for c in calls if c[2] is None]
    errors = [c[2] for c in calls if c[2] is not None]
    # The phase lasts until its last call has finished (calls in flight at the end finish).
    wall = max((start + latency for start, latency, _ in calls), default=seconds)
    latencies_ms = np.array([latency * 1000 for _, latency, _ in ok]) if ok else np.zeros(1)
    per_client = [len(results[i]) for i in sorted(results)]
    return {
        "clients": clients,
        "envs_per_client": envs,
        "seconds_requested": seconds,
        "wall_s": wall,
        "act_calls": len(calls),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "actions": len(ok) * envs,
        "actions_per_s": len(ok) * envs / wall,
        "act_calls_per_s": len(ok) / wall,
        "latency_ms": {
            "p50": float(np.percentile(latencies_ms, 50)),
            "p95": float(np.percentile(latencies_ms, 95)),
            "p99": float(np.percentile(latencies_ms, 99)),
            "mean": float(latencies_ms.mean()),
            "max": float(latencies_ms.max()),
        },
        "calls_per_client": {"min": min(per_client), "max": max(per_client)},
    }


def machine() -> dict:
    import grpc
    import torch

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "node": platform.node(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
    }


def most_requests_merged(log_text: str) -> int:
    found = re.findall(r"dynamic batching: (\d+) requests", log_text)
    return max(map(int, found), default=0)


def markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    rows = []
    for name in ("baseline", "load"):
        p = result["phases"][name]
        lat = p["latency_ms"]
        rows.append(
            f"| {name}: {p['clients']} x {p['envs_per_client']} envs | {p['act_calls']} | "
            f"{p['errors']} | {p['actions_per_s']:.1f} | {lat['p50']:.0f} | {lat['p95']:.0f} | "
            f"{lat['p99']:.0f} |"
        )
    r = result["ratios"]
    return "\n".join(
        [
            f"# Act under load: {cfg['clients']} clients x {cfg['envs']} envs vs 1 client",
            "",
            f"{result['date']}; {m['cpu_model']}, {m['cpu_count']} CPUs, GPU {m['gpu']}; "
            f"Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}.",
            f"One rollout server: {cfg['engine']} engine on {cfg['device']}, {cfg['model']}, "
            f"max_batch_size {cfg['max_batch_size']}, max_wait_ms {cfg['max_wait_ms']}, "
            f"{cfg['server_threads']} torch threads; {cfg['seconds']} s per phase, "
            f"{IMAGE}x{IMAGE}x3 uint8 images, temperature 1.",
            "",
            "| phase | Act calls | errors | actions/s | p50 ms | p95 ms | p99 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Throughput under load / baseline: {r['throughput_load_over_baseline']:.2f}x; "
            f"p50 latency under load / baseline: {r['p50_latency_load_over_baseline']:.2f}x. "
            f"Most requests one engine call served: {result['server']['most_requests_merged']}. "
            "1-minute load average at the start / end of each phase (other work on the machine "
            "skews the numbers): "
            + ", ".join(
                f"{name} {p['load_average_1min']['start']:.1f} / {p['load_average_1min']['end']:.1f}"
                for name, p in result["phases"].items()
            )
            + ".",
            "",
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--envs", type=int, default=64, help="observations per Act call")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="the server's flag; default: the config's (rollout.max_batch_size)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help="the server's flag; default: the config's (rollout.max_wait_ms)",
    )
    p.add_argument(
        "--server-threads",
        type=int,
        default=os.cpu_count(),
        help="OMP_NUM_THREADS of the rollout server",
    )
    p.add_argument("--out-dir", default=str(REPO / "benchmarks/results/load_act"))
    p.add_argument("--tag", default=None, help="file name tag; default <device>_<N>cpus")
    args = p.parse_args()  # fmt: skip

    import torch

    from vla_rl.config.schema import RolloutConfig
    from vla_rl.models import load_policy
    from vla_rl.models.tiny import write_tiny_checkpoint

    defaults = RolloutConfig()
    max_batch = args.max_batch_size or defaults.max_batch_size
    max_wait = args.max_wait_ms if args.max_wait_ms is not None else defaults.max_wait_ms
    tag = args.tag or f"{args.device.split(':')[0]}_{os.cpu_count()}cpus"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", seed=0)
        params = sum(t.numel() for t in load_policy(ckpt).parameters())
        server = ServiceProcess(
            "services.rollout_server.main",
            ["--checkpoint", str(ckpt), "--engine", "torch", "--device", args.device,
             "--max-batch-size", str(max_batch), "--max-wait-ms", str(max_wait)],
            Path(tmp),
            "rollout",
            env={"OMP_NUM_THREADS": str(args.server_threads)},
        )  # fmt: skip
        try:
            server.wait_healthy()
            warm = RolloutClient(server.target)
            rng = np.random.default_rng(0)
            images = rng.integers(0, 256, (args.envs, IMAGE, IMAGE, 3), dtype=np.uint8)
            for _ in range(2):
                warm.act(images, INSTRUCTIONS[:1] * args.envs, temperature=1.0)
            warm.close()
            phases = {}
            for name, clients in (("baseline", 1), ("load", args.clients)):
                print(f"{name}: {clients} client(s) x {args.envs} envs, {args.seconds:.0f} s",
                      flush=True)  # fmt: skip
                phases[name] = run_phase(server.target, clients, args.envs, args.seconds)
                ph = phases[name]
                print(f"  {ph['act_calls']} Act calls, {ph['errors']} errors, "
                      f"{ph['actions_per_s']:.1f} actions/s, p50 {ph['latency_ms']['p50']:.0f} ms, "
                      f"p95 {ph['latency_ms']['p95']:.0f} ms, p99 {ph['latency_ms']['p99']:.0f} ms",
                      flush=True)  # fmt: skip
            log_text = server.log_path.read_text(errors="replace")
        finally:
            rc = server.stop()

    base, load = phases["baseline"], phases["load"]
    result = {
        "benchmark": "load_act",
        "command": "python benchmarks/load_act.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "config": {
            "clients": args.clients,
            "envs": args.envs,
            "seconds": args.seconds,
            "engine": "torch",
            "device": args.device,
            "precision": "fp32",
            "model": f"tiny random OpenVLA (tiny_config(), {params / 1e6:.1f}M parameters)",
            "max_batch_size": max_batch,
            "max_wait_ms": max_wait,
            "server_threads": args.server_threads,
            "torch_threads_here": torch.get_num_threads(),
        },
        "phases": phases,
        "ratios": {
            "throughput_load_over_baseline": load["actions_per_s"] / base["actions_per_s"],
            "p50_latency_load_over_baseline": load["latency_ms"]["p50"] / base["latency_ms"]["p50"],
        },
        "server": {"exit_code": rc, "most_requests_merged": most_requests_merged(log_text)},
    }
    json_path = out_dir / f"load_act_{tag}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path = out_dir / f"load_act_{tag}.md"
    md_path.write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    errors = base["errors"] + load["errors"]
    if errors or rc != 0:
        print(f"FAILED: {errors} Act errors, server exit code {rc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
