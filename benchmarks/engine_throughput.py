"""Rollout throughput of the whole policy, towers included: the rollout server's vLLM engine
against its torch engine and Hugging Face `generate`, at several batch sizes, in one command.

    python benchmarks/engine_throughput.py --size 7b --device cuda --batches 32 64 128 256 \\
        --out benchmarks/results/engine_throughput/h100_7b.json          # issue 12's table
    python benchmarks/engine_throughput.py --size tiny --device cpu --batches 4 8   # a laptop check

Weights are random (OpenVLA-7B shapes or the tiny ones, written once under --work); throughput
does not depend on their values. Every timed call gets observations it has not seen (fresh
random images), as a rollout does: vLLM's prefix cache would otherwise serve repeated prompts
(282 actions/s at batch 128 with repeats against 132 with fresh prompts, seen on an H100). The
engines sample the 256 action ids at temperature 1 and return log-probs, as in training.

- torch: `TorchEngine.act` (pixel values, towers, projector, prefill and a 7-step KV-cache
  decode, all in torch).
- hf: the same torch policy's towers and projector, then transformers' `generate` on the prompt
  embeddings, as a user would call it: it samples from the whole vocabulary and keeps no scores,
  a little less work than the engines do.
- vllm: `VLLMEngine.act` (towers and projector in torch, the LLM in vLLM from prompt embeddings);
  its row also holds the median seconds per call of each part (`act_seconds`: the torch-side
  prompt embeddings, then vLLM's generate) and the VLLM_* environment it ran under (for
  example VLLM_ENABLE_V1_MULTIPROCESSING=0 runs vLLM's engine core in this process).

The torch policy is freed before vLLM starts, so each gets the GPU's memory to itself. If an
engine fails (vLLM's start, for one), its row records the error and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from model_core import hf_generate  # noqa: E402
from vllm_weight_sync import INSTRUCTION, checkpoint  # noqa: E402

ENGINES = ("torch", "hf", "vllm")


def fresh_images(rng: np.random.Generator, calls: int, batch: int) -> list[np.ndarray]:
    """One batch of new random 224x224 RGB images per call (made before the clock starts)."""
    return [rng.integers(0, 256, (batch, 224, 224, 3), np.uint8) for _ in range(calls)]


def actions_per_s(act, batches: list[int], calls: int, device: str, seed: int = 0) -> dict:
    """act(images, instructions) timed over `calls` calls per batch size, after one warm-up
    call of that size; returns {batch: actions/s}."""
    rng = np.random.default_rng(seed)
    rates = {}
    for b in batches:
        instructions = [INSTRUCTION] * b
        act(fresh_images(rng, 1, b)[0], instructions)  # warm-up: allocator, kernels, graphs
        images = fresh_images(rng, calls, b)
        _sync(device)
        t0 = time.perf_counter()
        for batch_images in images:
            act(batch_images, instructions)
        _sync(device)
        rates[b] = b * calls / (time.perf_counter() - t0)
        print(f"  batch {b:4d}: {rates[b]:8.1f} actions/s", flush=True)
    return rates


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_and_hf(args, ckpt: Path, wanted: list[str], rows: dict[str, dict]) -> None:
    """The torch engine's rates and, on its policy, HF generate's, into rows (each as it
    finishes, so a failure of the second keeps the first)."""
    from services.rollout_server.engines.torch_engine import TorchEngine

    precision = "bf16" if args.dtype == "bfloat16" else "fp32"
    t0 = time.perf_counter()
    engine = TorchEngine(ckpt, device=args.device, precision=precision)
    start = time.perf_counter() - t0
    if "torch" in wanted:
        print("torch engine", flush=True)
        rate = actions_per_s(
            lambda im, ins: engine.act(im, ins, temperature=1.0), args.batches, args.calls,
            args.device,
        )  # fmt: skip
        rows["torch"] = {"start_s": start, "actions_per_s": rate}
    if "hf" in wanted:
        print("HF generate (towers + transformers' generate)", flush=True)
        policy, k = engine.policy, engine.policy.config.tokens_per_step

        @torch.inference_mode()
        def hf_act(images: np.ndarray, instructions: list[str]):
            pv = policy.pixel_values(torch.from_numpy(images).to(args.device))
            return hf_generate(policy, pv, engine.prompts(instructions), k)

        rows["hf"] = {"actions_per_s": actions_per_s(hf_act, args.batches, args.calls, args.device)}
    # The engine and its policy go with this frame: main() then frees their memory.


def vllm_row(args, ckpt: Path) -> dict:
    from services.rollout_server.engines.vllm_engine import VLLMEngine

    cpu = args.device == "cpu"
    options = {"device": args.device, "dtype": getattr(torch, args.dtype),
               "max_batch_size": max(args.batches), "enforce_eager": cpu or args.eager}  # fmt: skip
    if cpu:
        options["kv_cache_memory_bytes"] = 512 * 2**20
    else:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    engine = None
    print("vLLM engine", flush=True)
    try:
        engine = VLLMEngine(ckpt, **options)
        phases: dict[int, list[dict[str, float]]] = {}

        def act(images: np.ndarray, instructions: list[str]):
            out = engine.act(images, instructions, temperature=1.0)
            phases.setdefault(len(instructions), []).append(engine.last_act_seconds)
            return out

        rate = actions_per_s(act, args.batches, args.calls, args.device)
        # Median seconds per call of each part of act() (the warm-up call included).
        split = {b: {k: float(np.median([c[k] for c in calls])) for k in calls[0]}
                 for b, calls in phases.items()}  # fmt: skip
        for b, parts in split.items():
            print(f"  batch {b:4d}: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()))
        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
        return {"start_s": engine.start_seconds, "actions_per_s": rate, "act_seconds": split,
                "options": {k: str(v) for k, v in options.items()}, "vllm_env": env}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a failing engine is a result to record
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if engine is not None:
            engine.close()


def table(rows: dict[str, dict], batches: list[int]) -> str:
    """Markdown: actions/s per engine and batch, and each engine's ratio to the torch engine."""
    names = [n for n in ENGINES if n in rows]
    head = "| batch | " + " | ".join(f"{n} actions/s" for n in names)
    ratios = [n for n in names if n != "torch" and "torch" in rows]
    head += "".join(f" | {n} / torch" for n in ratios) + " |"
    lines = [head, "|" + "---:|" * (1 + len(names) + len(ratios))]
    for b in batches:
        rate = {n: rows[n].get("actions_per_s", {}).get(b) for n in names}
        cells = [f"{rate[n]:.1f}" if rate[n] else rows[n].get("error", "-")[:40] for n in names]
        for n in ratios:
            ok = rate[n] and rate["torch"]
            cells.append(f"{rate[n] / rate['torch']:.2f}x" if ok else "-")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    p.add_argument("--calls", type=int, default=5, help="timed calls per batch size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.7,
                   help="vLLM's share; merged weight sync keeps a base copy (13 GB at 7B) beside it")  # fmt: skip
    p.add_argument("--eager", action="store_true",
                   help="vLLM without CUDA graphs or compilation (always on the CPU)")  # fmt: skip
    p.add_argument("--work", default="/tmp/engine_throughput")
    p.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if any(b < 1 for b in args.batches) or args.calls < 1:
        p.error("--batches and --calls must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, args.size, getattr(torch, args.dtype), args.device)
    rows: dict[str, dict] = {}
    if {"torch", "hf"} & set(args.engines):
        try:
            torch_and_hf(args, ckpt, args.engines, rows)
        except Exception as e:  # noqa: BLE001 - a failing engine is a result to record
            traceback.print_exc()
            for name in {"torch", "hf"} & set(args.engines):
                rows.setdefault(name, {"error": f"{type(e).__name__}: {e}"})
        gc.collect()  # the torch policy's memory goes back before vLLM sizes its KV cache
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "vllm" in args.engines:
        rows["vllm"] = vllm_row(args, ckpt)
    markdown = table(rows, args.batches)
    print(markdown, end="")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {"args": vars(args), "rows": rows, "table": markdown,
              "machine": {"gpu": gpu, "cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__}}  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(markdown)
    return result


if __name__ == "__main__":
    main()
