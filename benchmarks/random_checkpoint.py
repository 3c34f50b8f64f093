"""Write a random checkpoint with OpenVLA-7B's shapes (or the tiny ones) in the OpenVLA HF
layout, with the tiny word-level tokenizer (Llama's id layout), for GPU runs of the services.

    python benchmarks/random_checkpoint.py /tmp/openvla-7b-random --size 7b --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from model_core import build  # benchmarks/ is the script's directory

from vla_rl.models.checkpoint import save_policy
from vla_rl.models.tiny import build_tiny_tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--size", choices=["tiny", "7b"], default="7b")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    t0 = time.perf_counter()
    model = build(args.size, args.device, torch.bfloat16)
    save_policy(model, args.path, tokenizer=build_tiny_tokenizer())
    print(f"wrote {args.size} random checkpoint to {args.path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
