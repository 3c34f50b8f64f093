"""Throughput of the policy core: rollout actions/s (ours vs Hugging Face `generate` on the same
model, in the same run) and PPO-update samples/s with LoRA.

    python benchmarks/model_core.py --device cpu                 # tiny model, CPU
    python benchmarks/model_core.py --device cuda --size 7b      # OpenVLA-7B shapes, bf16, GPU

Weights are random (nothing can be downloaded here); throughput does not depend on their values.
Results print as a table and are written as JSON next to this file (benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vla_rl.models import OpenVLAPolicy, PromptTokenizer, VLAConfig, tiny_config
from vla_rl.models.checkpoint import materialize_buffers
from vla_rl.models.config import default_norm_stats, tiny_text_config
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.models.tiny import build_tiny_tokenizer
from vla_rl.training import PPOUpdateConfig, TrainBatch, ppo_update

# Llama-2-7B: the tiny config's fields at OpenVLA-7B's sizes.
LLAMA2_7B = tiny_text_config(hidden_size=4096, layers=32, heads=32) | {"intermediate_size": 11008}
# A long ManiSkill / LIBERO-style instruction (29 prompt tokens with the OpenVLA template).
INSTRUCTION = "pick up the red cube and place it on the green goal region of the table"


def build(size: str, device: str, dtype: torch.dtype) -> OpenVLAPolicy:
    if size == "tiny":
        torch.manual_seed(0)
        return OpenVLAPolicy(tiny_config()).to(device, dtype).eval()
    cfg = VLAConfig(text_config=LLAMA2_7B, norm_stats=default_norm_stats())
    with torch.device("meta"):
        model = OpenVLAPolicy(cfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    materialize_buffers(model, device)
    return model.to(dtype).eval()


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (allocator, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def hf_generate(model: OpenVLAPolicy, pv, prompts, k: int):
    """Baseline: transformers' generate on the same prompt embeddings, sampling k tokens."""
    with torch.no_grad():
        embeds, mask = model._prompt_embeddings(model.embed_images(pv), prompts)
        return model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=True,
            top_k=0,
            pad_token_id=32000,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--batches", default=None, help="comma-separated rollout batch sizes")
    ap.add_argument("--micro-batches", default=None, help="comma-separated update micro-batches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    batches = [
        int(b) for b in (args.batches or ("32,64,128" if dev == "cuda" else "8,32")).split(",")
    ]
    micro = [
        int(b) for b in (args.micro_batches or ("16,32" if dev == "cuda" else "8,16")).split(",")
    ]

    t0 = time.perf_counter()
    model = build(args.size, dev, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.size}: {n_params / 1e6:.1f}M params, built in {time.perf_counter() - t0:.0f}s"
    )
    tok = PromptTokenizer(build_tiny_tokenizer())
    k = model.config.tokens_per_step
    results: dict = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
        "size": args.size,
        "params_b": n_params / 1e9,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "rollout": [],
        "update": [],
    }
    prompt_len = len(tok.ids(INSTRUCTION)) + model.config.num_patches
    print(f"prompt: {prompt_len} tokens (BOS + {model.config.num_patches} patches + text)")
    print(f"{'batch':>6} {'ours actions/s':>15} {'HF generate':>12} {'ratio':>6}")
    for b in batches:
        images = torch.randint(0, 256, (b, 224, 224, 3), dtype=torch.uint8)
        prompts = tok([INSTRUCTION] * b)
        pv = model.pixel_values(images)
        ours = timed(lambda pv=pv, prompts=prompts: model.generate(pv, prompts), args.repeats, dev)
        hf = timed(
            lambda pv=pv, prompts=prompts: hf_generate(model, pv, prompts, k), args.repeats, dev
        )
        row = {"batch": b, "ours_actions_per_s": b / ours, "hf_generate_actions_per_s": b / hf}
        results["rollout"].append(row)
        print(f"{b:6d} {b / ours:15.1f} {b / hf:12.1f} {hf / ours:6.2f}")
        del images, pv

    # PPO update: LoRA r=32 on the LLM (vision frozen, as in the FACTS baseline), value head.
    apply_lora(model, LoRASettings(rank=32, alpha=32, targets=["llm"]))
    if dev == "cuda":
        model.language_model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    print(f"{'micro':>6} {'update samples/s':>17} {'peak GB':>8}")
    for mb in micro:
        n = mb * 2
        images = torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8)
        prompts = tok([INSTRUCTION] * n)
        tokens = torch.randint(31744, 32000, (n, k))
        batch = TrainBatch(images, prompts, tokens, torch.full((n, k), -5.5), torch.randn(n),
                           torch.randn(n), torch.zeros(n))  # fmt: skip
        cfg = PPOUpdateConfig(micro_batch_size=mb, num_mini_batches=1)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timed(lambda batch=batch, cfg=cfg: ppo_update(model, opt, batch, cfg), 2, dev)
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else float("nan")
        results["update"].append({"micro_batch": mb, "samples_per_s": n / sec, "peak_gb": peak})
        print(f"{mb:6d} {n / sec:17.1f} {peak:8.1f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"model_core_{args.size}_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
