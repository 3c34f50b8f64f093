"""The FSDP learner's PPO update on several GPUs (NCCL): samples/s and peak memory per GPU at
1, 2, 4 ... GPUs with OpenVLA-7B shapes (random bf16 weights), LoRA r32 on vision, projector and
LLM, gradient checkpointing; whether an update on W GPUs equals the 1-GPU one; and whether a
checkpoint written on one world size resumes on another.

    python benchmarks/fsdp_update.py --gpus 1,2,4 --strategy no_shard --resume 4:2

Every world size updates the same global batch (micro-batches spread over the ranks). The
equality check: one AdamW step (lr 1e-3, so that LoRA-B moves well above bf16 resolution) from
the same weights on the same batch; the relative difference of the trainable parameters' change
against the 1-GPU run, and the loss and gradient norm of each. The resume check (`--resume A:B`):
the A-GPU run writes a learner checkpoint (vla_rl.training.checkpoints, adapter + optimizer
state by name) after that step and takes a second one; a B-GPU run loads the checkpoint as the
learner's resume does and takes the same second step. Their second steps are compared, and so is
a B-GPU run that loads the adapter alone (a fresh AdamW): the control that shows the optimizer
state mattered. `--device cpu --size tiny` runs the same code under gloo (a smoke test).
Results: benchmarks/results/fsdp_update/<card><tag>.json.
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
    from services.learner.batch import recompute_old
    from vla_rl.models import PromptTokenizer
    from vla_rl.models.lora import LoRASettings, apply_lora
    from vla_rl.models.tiny import build_tiny_tokenizer
    from vla_rl.training import checkpoints, distributed
    from vla_rl.training.update import PPOUpdateConfig, TrainBatch, make_optimizer, ppo_update

    cuda = args.device == "cuda"
    info = distributed.init_distributed("nccl" if cuda else "gloo")
    torch.manual_seed(0)
    policy = build(args.size, args.device, torch.bfloat16 if cuda else torch.float32)
    apply_lora(policy, LoRASettings(rank=32, alpha=32, targets=["llm", "projector", "vision"]))
    if not args.no_gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    distributed.shard_policy(policy, args.strategy)
    g = torch.Generator().manual_seed(1)
    n, k = args.global_batch, 7
    lo = policy.config.action_vocab_start
    batch = TrainBatch(
        images=torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=g),
        prompts=PromptTokenizer(build_tiny_tokenizer())([INSTRUCTION] * n),
        action_tokens=torch.randint(lo, lo + policy.config.n_action_bins, (n, k), generator=g),
        old_logprobs=torch.full((n, k), -5.5),
        advantages=torch.randn(n, generator=g),
        returns=torch.randn(n, generator=g),
        old_values=torch.zeros(n),
    )
    cfg = PPOUpdateConfig(micro_batch_size=args.micro, num_mini_batches=1, update_epochs=1,
                          reduce_every_micro_batch=args.reduce_every_micro_batch)  # fmt: skip
    out = Path(args.out)
    w = info.world_size

    def save(name: str, payload: dict) -> None:
        if info.is_main:
            torch.save(payload, out / name)

    def step(opt) -> tuple[dict, dict]:
        """One check step; (change of each trainable tensor, the step's stats)."""
        before = distributed.full_trainable_state(policy)
        stats = ppo_update(policy, opt, batch, cfg)
        after = distributed.full_trainable_state(policy)
        delta = {name: (after[name].float() - before[name].float()) for name in after}
        return delta, {key: float(v) for key, v in stats.items()}

    check_opt = make_optimizer(policy, lr=1e-3, value_lr=1e-3)
    if args.no_checks:
        pass
    elif args.resume_from:  # the second step after a resume, as Trainer.resume loads it
        payload = None
        if info.is_main:
            _, blob, optim = checkpoints.read_checkpoint(args.resume_from)
            payload = blob
        blob = distributed.broadcast_object(payload)
        distributed.load_adapter_distributed(policy, blob)
        if not args.adapter_only:
            distributed.load_optimizer_state(policy, check_opt, optim if info.is_main else {})
        delta, stats = step(check_opt)
        tag = "adapter_only" if args.adapter_only else "resumed"
        save(f"{tag}_w{w}.pt", {"delta": delta, "stats": stats})
        distributed.cleanup()
        return
    else:
        delta, stats = step(check_opt)
        save(f"delta_w{w}.pt", {"delta": delta, "stats": stats})
        blob = distributed.serialize_adapter_distributed(policy, version=1)
        optim = distributed.optimizer_state(policy, check_opt)  # a collective
        if info.is_main:
            state = checkpoints.CheckpointState(iteration=1, policy_version=1)
            checkpoints.save_checkpoint(out / f"ckpt_w{w}", state, blob, optim)
        delta, stats = step(check_opt)
        save(f"second_w{w}.pt", {"delta": delta, "stats": stats})
    del check_opt
    opt = make_optimizer(policy, lr=1e-5, value_lr=1e-5)
    ppo_update(policy, opt, batch, cfg)  # warm-up
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        ppo_update(policy, opt, batch, cfg)
    sync()
    seconds = (time.perf_counter() - t0) / args.repeats
    # The learner's recompute of old log-probs and values (its "prepare" phase), each rank
    # computing its share of the rows since 2026-11-27.
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        recompute_old(policy, batch.images, batch.prompts, batch.action_tokens, 1.0, args.micro)
    sync()
    recompute_seconds = (time.perf_counter() - t0) / args.repeats
    peaks = [torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0]
    if dist.is_initialized():  # one process runs without a process group
        gathered = [None] * w
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if args.profile:
        # One micro-batch per rank: a whole 7B update is millions of profiler events, and the
        # one try at profiling it (4 H200s) ran past the 9-minute call.
        small = batch.select(torch.arange(min(n, args.micro * w)))
        profile(lambda: ppo_update(policy, opt, small, cfg), out / f"profile_w{w}.txt", info)
    if info.is_main:
        row = {"gpus": w, "global_batch": n, "micro_batch": args.micro,
               "seconds_per_update": seconds, "samples_per_s": n / seconds,
               "peak_gb_per_gpu": max(peaks), "recompute_s": recompute_seconds,
               "recompute_samples_per_s": n / recompute_seconds}  # fmt: skip
        (out / f"row_w{w}.json").write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
    distributed.cleanup()


def profile(fn, path: Path, info) -> None:
    """One call of `fn` under torch.profiler on every rank; rank 0 writes the top operators by
    GPU time and by CPU time (with FSDP's own ranges: all-gather, reduce, copy-in/out)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if info.is_main:
        table = prof.key_averages()
        path.write_text(
            table.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
            + "\n\n"
            + table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        )


def relative_difference(got: dict, want: dict) -> float:
    """|got - want| / |want| over all trainable tensors (L2)."""
    norm = torch.sqrt(sum((d**2).sum() for d in want.values()))
    diff = torch.sqrt(sum(((got[n] - want[n]) ** 2).sum() for n in want))
    return float(diff / norm)


def compare(out: Path, sizes: list[int]) -> dict:
    """Relative difference of each world size's parameter change against the 1-GPU one."""
    base = torch.load(out / "delta_w1.pt")
    result = {}
    for w in sizes:
        if w == 1:
            continue
        other = torch.load(out / f"delta_w{w}.pt")
        result[w] = {"relative_difference": relative_difference(other["delta"], base["delta"]),
                     "stats": other["stats"], "stats_1gpu": base["stats"]}  # fmt: skip
    return result


def compare_resume(out: Path, src: int, dst: int) -> dict:
    """The second step after a resume on `dst` GPUs against the `src`-GPU run's own."""
    want = torch.load(out / f"second_w{src}.pt")
    got = torch.load(out / f"resumed_w{dst}.pt")
    control = torch.load(out / f"adapter_only_w{dst}.pt")
    return {"from_gpus": src, "to_gpus": dst,
            "relative_difference": relative_difference(got["delta"], want["delta"]),
            "adapter_only_relative_difference":
                relative_difference(control["delta"], want["delta"]),
            "stats": got["stats"], "stats_uninterrupted": want["stats"]}  # fmt: skip


def main() -> None:
    from vla_rl.training.distributed import SHARDING_STRATEGIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4", help="world sizes, one torchrun each")
    ap.add_argument("--strategy", choices=SHARDING_STRATEGIES, default="full_shard",
                    help="actor.fsdp_config.sharding_strategy")  # fmt: skip
    ap.add_argument("--resume", default="", metavar="A:B",
                    help="resume the A-GPU run's checkpoint on B GPUs (A must be in --gpus)")  # fmt: skip
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro", type=int, default=8, help="micro-batch per GPU")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", choices=["tiny", "7b"], default="7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: gloo processes (a smoke test of this script)")  # fmt: skip
    ap.add_argument("--reduce-every-micro-batch", action="store_true",
                    help="reduce gradients after every micro-batch (the learner reduces once "
                         "per step)")  # fmt: skip
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep activations (actor.fsdp_config.gradient_checkpointing false): "
                         "faster where memory allows")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="profile an update of one micro-batch per rank; rank 0 writes "
                         "<out>/profile_w<W>.txt")  # fmt: skip
    ap.add_argument("--out", default="/tmp/fsdp_update")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument(
        "--no-checks", action="store_true", help="time only: skip the equality and checkpoint steps"
    )
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--resume-from", default="", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(w) for w in args.gpus.split(",")]
    common = ["--out", str(out), "--global-batch", str(args.global_batch), "--micro",
              str(args.micro), "--repeats", str(args.repeats), "--strategy", args.strategy,
              "--size", args.size, "--device", args.device]  # fmt: skip
    common += ["--reduce-every-micro-batch"] if args.reduce_every_micro_batch else []
    common += ["--profile"] if args.profile else []
    common += ["--no-gradient-checkpointing"] if args.no_gradient_checkpointing else []
    common += ["--no-checks"] if args.no_checks else []
    if args.reduce_every_micro_batch and args.strategy == "no_shard":
        raise SystemExit("no_shard reduces once per step; --reduce-every-micro-batch is for FSDP")
    if args.no_checks and args.resume:
        raise SystemExit("--resume needs the checkpoint that --no-checks skips")

    def torchrun(w: int, *extra: str) -> float:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={w}", __file__, "--worker", *common, *extra]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="4"))
        return time.perf_counter() - t0

    rows = []
    for w in sizes:
        wall = torchrun(w)
        row = json.loads((out / f"row_w{w}.json").read_text())
        row["wall_s"] = wall
        rows.append(row)
    resume = {}
    if args.resume:
        src, dst = (int(x) for x in args.resume.split(":"))
        ckpt = str(out / f"ckpt_w{src}" / "global_step_1")
        torchrun(dst, "--resume-from", ckpt)
        torchrun(dst, "--resume-from", ckpt, "--adapter-only")
        resume = compare_resume(out, src, dst)
    one = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup_vs_1"] = row["samples_per_s"] / one
        row["recompute_speedup_vs_1"] = (
            row["recompute_samples_per_s"] / rows[0]["recompute_samples_per_s"]
        )
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu_{args.size}"
    result = {"card": card, "torch": torch.__version__, "strategy": args.strategy,
              "reduce_every_micro_batch": args.reduce_every_micro_batch,
              "gradient_checkpointing": not args.no_gradient_checkpointing,
              "micro_batch": args.micro, "rows": rows,
              "equality": compare(out, sizes) if 1 in sizes and not args.no_checks else {},
              "resume": resume}  # fmt: skip
    print(f"{'gpus':>4} {'samples/s':>10} {'speedup':>8} {'peak GB/GPU':>12} {'recompute/s':>12}")
    for row in rows:
        print(f"{row['gpus']:4d} {row['samples_per_s']:10.1f} {row['speedup_vs_1']:8.2f} "
              f"{row['peak_gb_per_gpu']:12.1f} {row['recompute_samples_per_s']:12.1f}")  # fmt: skip
    print(json.dumps({"equality": result["equality"], "resume": resume}, indent=1))
    dest = REPO / "benchmarks" / "results" / "fsdp_update"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{card.replace(' ', '_')}{args.tag}.json"
    path.write_text(json.dumps(result, indent=2))
    os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
    Path(os.environ.get("OUT", "/tmp/out"), path.name).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
