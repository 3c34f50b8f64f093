"""The FSDP learner's PPO update on several GPUs (NCCL): samples/s and peak memory per GPU at
1, 2, 4 ... GPUs with OpenVLA-7B shapes (random bf16 weights), LoRA r32 on vision, projector and
LLM, gradient checkpointing; and whether an update on W GPUs equals the 1-GPU one.

    python benchmarks/fsdp_update.py --gpus 1,2,4            # one torchrun per world size

Every world size updates the same global batch (micro-batches spread over the ranks). The
equality check: one AdamW step (lr 1e-3, so that LoRA-B moves well above bf16 resolution) from
the same weights on the same batch; the relative difference of the trainable parameters' change
against the 1-GPU run, and the loss and gradient norm of each. Results:
benchmarks/results/fsdp_update/<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from benchmarks.model_core import INSTRUCTION, build
    from vla_rl.models import PromptTokenizer
    from vla_rl.models.lora import LoRASettings, apply_lora
    from vla_rl.models.tiny import build_tiny_tokenizer
    from vla_rl.training import distributed
    from vla_rl.training.update import PPOUpdateConfig, TrainBatch, make_optimizer, ppo_update

    info = distributed.init_distributed("nccl")
    torch.cuda.set_device(info.device)
    torch.manual_seed(0)
    policy = build("7b", "cuda", torch.bfloat16)
    apply_lora(policy, LoRASettings(rank=32, alpha=32, targets=["llm", "projector", "vision"]))
    policy.enable_gradient_checkpointing()
    distributed.shard_policy(policy, reshard_after_forward=not args.zero2)
    g = torch.Generator().manual_seed(1)
    n, k = args.global_batch, 7
    batch = TrainBatch(
        images=torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=g),
        prompts=PromptTokenizer(build_tiny_tokenizer())([INSTRUCTION] * n),
        action_tokens=torch.randint(31744, 32000, (n, k), generator=g),
        old_logprobs=torch.full((n, k), -5.5),
        advantages=torch.randn(n, generator=g),
        returns=torch.randn(n, generator=g),
        old_values=torch.zeros(n),
    )
    cfg = PPOUpdateConfig(micro_batch_size=args.micro, num_mini_batches=1, update_epochs=1)
    before = distributed.full_trainable_state(policy)
    check_opt = make_optimizer(policy, lr=1e-3, value_lr=1e-3)
    stats = ppo_update(policy, check_opt, batch, cfg)
    after = distributed.full_trainable_state(policy)
    if info.is_main:
        delta = {name: (after[name].float() - before[name].float()).cpu() for name in after}
        torch.save({"delta": delta, "stats": {k: float(v) for k, v in stats.items()}},
                   Path(args.out) / f"delta_w{info.world_size}.pt")  # fmt: skip
    del before, after
    opt = make_optimizer(policy, lr=1e-5, value_lr=1e-5)
    ppo_update(policy, opt, batch, cfg)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        ppo_update(policy, opt, batch, cfg)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.repeats
    peaks = [torch.cuda.max_memory_allocated() / 1e9]
    if dist.is_initialized():  # one process runs without a process group
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if info.is_main:
        row = {"gpus": info.world_size, "global_batch": n, "micro_batch": args.micro,
               "seconds_per_update": seconds, "samples_per_s": n / seconds,
               "peak_gb_per_gpu": max(peaks)}  # fmt: skip
        (Path(args.out) / f"row_w{info.world_size}.json").write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
    distributed.cleanup()


def compare(out: Path, sizes: list[int]) -> dict:
    """Relative difference of each world size's parameter change against the 1-GPU one."""
    base = torch.load(out / "delta_w1.pt")
    ref = base["delta"]
    norm = torch.sqrt(sum((d**2).sum() for d in ref.values()))
    result = {}
    for w in sizes:
        if w == 1:
            continue
        other = torch.load(out / f"delta_w{w}.pt")
        diff = torch.sqrt(sum(((other["delta"][n] - ref[n]) ** 2).sum() for n in ref))
        result[w] = {"relative_difference": float(diff / norm),
                     "stats": other["stats"], "stats_1gpu": base["stats"]}  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=8, help="micro-batch per GPU")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="/tmp/fsdp_update")
    ap.add_argument("--zero2", action="store_true",
                    help="keep gathered weights from forward to backward (shard_grad_op)")  # fmt: skip
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(w) for w in args.gpus.split(",")]
    rows = []
    for w in sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={w}", __file__, "--worker", "--out", str(out),
               "--global-batch", str(args.global_batch), "--micro", str(args.micro),
               "--repeats", str(args.repeats)] + (["--zero2"] if args.zero2 else [])  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="4"))
        row = json.loads((out / f"row_w{w}.json").read_text())
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
    one = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup_vs_1"] = row["samples_per_s"] / one
    card = torch.cuda.get_device_name(0)
    result = {"card": card, "torch": torch.__version__, "rows": rows,
              "equality": compare(out, sizes) if 1 in sizes else {}}  # fmt: skip
    print(f"{'gpus':>4} {'samples/s':>10} {'speedup':>8} {'peak GB/GPU':>12}")
    for row in rows:
        print(f"{row['gpus']:4d} {row['samples_per_s']:10.1f} {row['speedup_vs_1']:8.2f} "
              f"{row['peak_gb_per_gpu']:12.1f}")  # fmt: skip
    print(json.dumps(result["equality"], indent=1))
    dest = REPO / "benchmarks" / "results" / "fsdp_update"
    dest.mkdir(parents=True, exist_ok=True)
    result["zero2"], result["micro_batch"] = args.zero2, args.micro
    path = dest / f"{card.replace(' ', '_')}{args.tag}.json"
    path.write_text(json.dumps(result, indent=2))
    os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
    Path(os.environ.get("OUT", "/tmp/out"), path.name).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
