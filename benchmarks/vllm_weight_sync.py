"""Policy sync into the vLLM rollout engine: how long a pushed LoRA adapter takes to be served,
and whether the engine then acts as the torch policy with the same adapter.

    python benchmarks/vllm_weight_sync.py --size 7b --device cuda --dtype bfloat16 \\
        --sync merge lora --rank 32 --pushes 5 --out benchmarks/results/vllm_weight_sync/h100.json
    python benchmarks/vllm_weight_sync.py --size tiny --device cpu      # a 2-core laptop check

For each --sync mode, one VLLMEngine on a random checkpoint of --size (OpenVLA-7B shapes or the
tiny ones; written once under --work), then --pushes adapters (LoRA of --rank on the vision
towers, the projector and every LLM linear layer, B random as training moves it, a new one per
push). Per push: the wall time of load_adapter (checks, staging, the switch) and of the switch
itself (`last_sync_seconds`). After the last push, greedy actions on --batch random images
against the torch policy carrying the same adapter (same checkpoint, same dtype, on --device):
the share of equal action tokens and the largest log-prob difference. The baseline is the other
mode in the same command (`--sync merge lora`); a mode that fails (vLLM's LoRA path crashed on
the GPU with prompt embeddings when the LM head carried LoRA) records the error in its row.
"""

from __future__ import annotations

import argparse
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

from model_core import build  # noqa: E402

from vla_rl.models import PromptTokenizer, load_policy, load_tokenizer  # noqa: E402
from vla_rl.models.checkpoint import save_policy  # noqa: E402
from vla_rl.models.lora import LoRASettings, apply_lora, serialize_adapter  # noqa: E402
from vla_rl.models.tiny import build_tiny_tokenizer  # noqa: E402

INSTRUCTION = "pick up the red cube and place it on the green goal region of the table"


def checkpoint(work: Path, size: str, dtype: torch.dtype, device: str) -> Path:
    path = work / f"random_{size}"
    if not (path / "config.json").is_file():
        save_policy(build(size, device, dtype), path, tokenizer=build_tiny_tokenizer())
    return path


def trained(ckpt: Path, settings: LoRASettings, seed: int, dtype, device) -> torch.nn.Module:
    """The torch policy with a LoRA whose B moved as training moves it (peft starts it at 0)."""
    policy = apply_lora(load_policy(ckpt, dtype=dtype, device=device), settings)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return policy.eval()


def run_mode(args, mode: str, ckpt: Path, dtype: torch.dtype) -> dict:
    from services.rollout_server.engines.vllm_engine import VLLMEngine

    options = {"device": args.device, "dtype": dtype, "weight_sync": mode,
               "max_batch_size": max(args.batch, 8), "enforce_eager": args.device == "cpu"}  # fmt: skip
    if args.device == "cpu":
        options["kv_cache_memory_bytes"] = 256 * 2**20
    else:
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    row: dict = {"sync": mode}
    engine = None
    try:
        engine = VLLMEngine(ckpt, **options)
        row["engine_start_s"] = engine.start_seconds
        settings = LoRASettings(rank=args.rank, alpha=args.rank)
        images = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), np.uint8)
        instructions = [INSTRUCTION] * args.batch
        loads, switches = [], []
        policy = None
        for push in range(1, args.pushes + 1):
            policy = trained(ckpt, settings, seed=push, dtype=dtype, device=args.device)
            blob = serialize_adapter(policy, version=push)
            t0 = time.perf_counter()
            engine.load_adapter(blob)
            loads.append(time.perf_counter() - t0)
            switches.append(engine.last_sync_seconds)
            engine.act(images, instructions, greedy=True)  # served after every push
            print(f"[{mode}] push {push}: load {loads[-1]:.3f} s, switch {switches[-1]:.3f} s",
                  flush=True)  # fmt: skip
        out = engine.act(images, instructions, greedy=True)
        prompts = PromptTokenizer(load_tokenizer(ckpt))(instructions)
        with torch.inference_mode():
            pv = policy.pixel_values(torch.from_numpy(images).to(args.device))
            ref = policy.generate(pv, prompts, greedy=True)
        same = out.action_tokens == ref.action_tokens.cpu().numpy()
        row.update(
            load_s=loads, switch_s=switches, load_s_median=float(np.median(loads)),
            switch_s_median=float(np.median(switches)),
            greedy_tokens_equal=float(same.mean()),
            first_token_logprob_max_abs_diff=float(
                np.abs(out.logprobs[:, 0] - ref.logprobs.float().cpu().numpy()[:, 0]).max()
            ),
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a crashing mode is a result to record
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if engine is not None:
            engine.close()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    p.add_argument("--sync", nargs="+", choices=["merge", "lora"], default=["merge", "lora"])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--pushes", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--work", default="/tmp/vllm_weight_sync")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = getattr(
        torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    )
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, args.size, dtype, args.device)
    rows = [run_mode(args, mode, ckpt, dtype) for mode in args.sync]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {"args": vars(args), "rows": rows,
              "machine": {"gpu": gpu, "cpus": os.cpu_count(), "platform": platform.platform()}}  # fmt: skip
    print(json.dumps(rows, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
