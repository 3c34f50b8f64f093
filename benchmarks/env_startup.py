"""How long do env servers take to build their envs, and how fast do they step? (issues 9, 12)

Every `vla-rl train` and `vla-rl eval` on the lent GPU spends its first 45-165 s before the
first action is asked for (`collect` of iteration 1 in every `benchmarks/results/rl_gain/*.log`),
up to a quarter of a 10-minute run, while one ManiSkill env imports and builds in about 8 s on this
2-core CPU. This script times what the env servers do in that window, with the env servers' own
code (`EnvPool`, one subprocess per env, as `vla-rl train` runs them) and no policy: P pools of
N envs built at once (threads, as P env servers on one machine), then S steps of random actions
in every env (rendering the 224x224 camera image each step).

Layouts are `PxN` (P pools of N envs); the first is the baseline (default `1x1`, one env alone),
run in the same command. For each: the build's wall time (all pools ready), the first reset, and
the steady env steps/s of all envs together; the build's ratio to the baseline's says whether
building parallelises (ratio ~ envs / cores) or serialises (ratio ~ envs).

    python benchmarks/env_startup.py --layouts 1x1 1x2 2x2 --out benchmarks/results/env_startup/cpu_2cores.json
    python3 benchmarks/env_startup.py --layouts 1x1 1x8 4x8 8x8 --steps 20   # a lent GPU (renders there)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.env_server.env_pool import EnvPool, EnvPoolConfig  # noqa: E402


def parse_layout(text: str) -> tuple[int, int]:
    """'8x8' -> (8 pools, 8 envs each)."""
    try:
        pools, envs = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected PxN, e.g. 8x8") from None
    if pools < 1 or envs < 1:
        raise argparse.ArgumentTypeError(f"layout {text!r}: P and N must be >= 1")
    return pools, envs


def measure(pools: int, envs: int, args: argparse.Namespace) -> dict:
    """Build `pools` pools of `envs` envs at once, reset them, step them `args.steps` times."""
    configs = [
        EnvPoolConfig(
            task_ids=[args.task],
            num_envs=envs,
            seed=1000 * p,
            worker_mode="subprocess",
            max_episode_steps=args.episode_steps,
        )  # fmt: skip
        for p in range(pools)
    ]
    with ThreadPoolExecutor(max_workers=pools) as ex:
        t0 = time.perf_counter()
        built = list(ex.map(EnvPool, configs))
        build_s = time.perf_counter() - t0
        try:
            t1 = time.perf_counter()
            list(ex.map(lambda pool: pool.reset(), built))
            reset_s = time.perf_counter() - t1

            def run(pool: EnvPool, seed: int) -> None:
                rng = np.random.default_rng(seed)  # one per thread: a Generator is not thread-safe
                for _ in range(args.steps):
                    pool.step(rng.uniform(-1, 1, (pool.num_envs, pool.action_dim)))

            t2 = time.perf_counter()
            list(ex.map(run, built, range(pools)))
            step_s = time.perf_counter() - t2
        finally:
            for pool in built:
                pool.close()
    total = pools * envs
    return {
        "layout": f"{pools}x{envs}",
        "envs": total,
        "build_s": round(build_s, 2),
        "first_reset_s": round(reset_s, 2),
        "env_steps_per_s": round(total * args.steps / step_s, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", type=parse_layout, nargs="+", default=[(1, 1), (1, 2), (2, 2)])
    p.add_argument("--task", default="PushCube-v1")
    p.add_argument("--steps", type=int, default=50, help="steps of every env after the reset")
    p.add_argument("--episode-steps", type=int, default=50)
    p.add_argument("--out", default=None, help="JSON of the results (and a .md beside it)")
    args = p.parse_args(argv)

    rows = []
    for pools, envs in args.layouts:
        rows.append(measure(pools, envs, args))
        row = rows[-1]
        row["build_vs_baseline"] = round(row["build_s"] / rows[0]["build_s"], 2)
        print(
            f"{row['layout']:>6}: {row['envs']:3d} envs built in {row['build_s']:6.1f} s "
            f"({row['build_vs_baseline']:.2f}x the first layout's), first reset "
            f"{row['first_reset_s']:.1f} s, {row['env_steps_per_s']:.1f} env steps/s",
            flush=True,
        )
    result = {
        "rows": rows,
        "task": args.task,
        "steps": args.steps,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        lines = [
            "| layout (pools x envs) | envs | build s | vs first | first reset s | env steps/s |",
            "|---|---:|---:|---:|---:|---:|",
        ] + [
            f"| {r['layout']} | {r['envs']} | {r['build_s']} | {r['build_vs_baseline']}x "
            f"| {r['first_reset_s']} | {r['env_steps_per_s']} |"
            for r in rows
        ]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
