"""Worker of test_fsdp: one PPO update of the tiny LoRA policy, FSDP2-sharded over the ranks of
`torchrun`; rank 0 writes what the test compares with the unsharded single-process update.

    torchrun --nproc_per_node 2 tests/unit/_fsdp_worker.py OUT.pt
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(REPO))

from services.learner.batch import recompute_old  # noqa: E402
from vla_rl.models import PromptBatch, PromptTokenizer, tiny_config  # noqa: E402
from vla_rl.models.lora import LoRASettings, apply_lora  # noqa: E402
from vla_rl.models.tiny import build_tiny_policy, build_tiny_tokenizer  # noqa: E402
from vla_rl.training import distributed  # noqa: E402
from vla_rl.training.update import (  # noqa: E402
    PPOUpdateConfig,
    TrainBatch,
    make_optimizer,
    ppo_update,
)

N = 11  # mini-batches of 5 and 6 -> 3 micro-batches of <= 2 each: ranks get 2 and 1 (+1 spare)
UPDATE = PPOUpdateConfig(
    update_epochs=2, num_mini_batches=2, micro_batch_size=2, entropy_coef=0.01, max_grad_norm=0.5
)
SEED = 7
INSTRUCTIONS = [
    "pick up the red cube",
    "push the cube left",
    "stack the red cube on the green cube",
    "open the drawer",
]


def build_policy():
    """The tiny policy with LoRA on vision, projector and LLM (same weights on every call)."""
    return apply_lora(build_tiny_policy(tiny_config(), seed=0), LoRASettings(rank=4, alpha=8))


def build_batch() -> TrainBatch:
    """Random images, instructions, action tokens and scores, and an uneven mask."""
    g = torch.Generator().manual_seed(SEED)
    cfg = tiny_config()
    prompts = PromptTokenizer(build_tiny_tokenizer())([INSTRUCTIONS[i % 4] for i in range(N)])
    k = cfg.tokens_per_step
    return TrainBatch(
        images=torch.randint(0, 256, (N, 224, 224, 3), dtype=torch.uint8, generator=g),
        prompts=prompts,
        action_tokens=torch.randint(
            cfg.action_vocab_start, cfg.action_vocab_end, (N, k), generator=g
        ),
        old_logprobs=-5.5 + 0.3 * torch.randn(N, k, generator=g),
        advantages=torch.randn(N, generator=g),
        returns=torch.randn(N, generator=g),
        old_values=0.1 * torch.randn(N, generator=g),
        mask=torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool),
    )


OPTIMIZERS = {
    # Plain SGD: the parameter change is the clipped gradient sum, compared tightly.
    "sgd": lambda policy: torch.optim.SGD(
        [p for p in policy.parameters() if p.requires_grad], lr=0.1
    ),
    # What the learner uses.
    "adamw": lambda policy: make_optimizer(policy, lr=1e-3, value_lr=1e-2),
}


def run_update(policy, batch: TrainBatch, optimizer_kind: str):
    """The learner's sequence: optimizer over the (sharded) policy, one ppo_update, the adapter."""
    optimizer = OPTIMIZERS[optimizer_kind](policy)
    # FSDP_REDUCE_ONCE=1: gradients reduced once per step, not after every micro-batch.
    once = os.environ.get("FSDP_REDUCE_ONCE") == "1"
    cfg = dataclasses.replace(UPDATE, reduce_every_micro_batch=not once)
    metrics = ppo_update(policy, optimizer, batch, cfg, torch.Generator().manual_seed(SEED))
    return optimizer, metrics, distributed.serialize_adapter_distributed(policy, version=1)


@torch.no_grad()
def probe(policy, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """Outputs of the methods the learner calls outside ppo_update (the no-grad recompute)."""
    sub = batch.select(torch.arange(3))
    pv = policy.pixel_values(sub.images)
    logp, _, values = policy.evaluate_actions(pv, sub.prompts, sub.action_tokens)
    out = policy.generate(pv, sub.prompts, greedy=True)
    # The learner's recompute, split over the ranks: 11 rows in micro-batches of 4 (6 rows per
    # rank, the second rank's padded), and values alone for 5 rows in micro-batches of 2.
    full_logp, full_values = recompute_old(
        policy, batch.images, batch.prompts, batch.action_tokens, 1.0, 4
    )
    first = PromptBatch(batch.prompts.input_ids[:5], batch.prompts.attention_mask[:5])
    _, bootstrap = recompute_old(policy, batch.images[:5], first, None, 1.0, 2)
    return {"logp": logp, "values": values, "greedy_tokens": out.action_tokens,
            "recompute_logp": full_logp, "recompute_values": full_values,
            "recompute_bootstrap": bootstrap}  # fmt: skip


def critic_warmup(strategy: str, batch: TrainBatch, device) -> dict[str, bool]:
    """A critic warm-up update (train_policy=False) after a policy update, so AdamW has momentum:
    the value head moves and every other adapter weight stays bit-identical on the sharded
    policy too (no_shard's all-reduce hands zero gradients to the weights the loss missed)."""
    policy = distributed.shard_policy(build_policy().to(device), strategy)
    optimizer = OPTIMIZERS["adamw"](policy)
    ppo_update(policy, optimizer, batch, UPDATE, torch.Generator().manual_seed(SEED))
    before = st_load(distributed.serialize_adapter_distributed(policy, version=1))
    cfg = dataclasses.replace(UPDATE, train_policy=False)
    ppo_update(policy, optimizer, batch, cfg, torch.Generator().manual_seed(SEED))
    after = st_load(distributed.serialize_adapter_distributed(policy, version=2))
    head = [k for k in before if "value_head" in k]
    rest = [k for k in before if "value_head" not in k]
    return {
        "policy_unchanged": all(torch.equal(before[k], after[k]) for k in rest),
        "head_moved": any(not torch.equal(before[k], after[k]) for k in head),
    }


def bf16_masters(strategy: str, batch: TrainBatch, device) -> dict[str, bool]:
    """The policy in bf16 (actor.model.precision bf16): two updates with a checkpoint round trip
    between them. AdamW steps fp32 masters of the bf16 LoRA and value head; they stay fp32
    through the sharded state dict, and each parameter is its master rounded."""
    policy = distributed.shard_policy(build_policy().to(device, torch.bfloat16), strategy)
    optimizer = make_optimizer(policy, lr=1e-4, value_lr=3e-3)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def rounded() -> bool:
        return all(
            torch.equal(local(optimizer.state[p]["master"]).to(torch.bfloat16), local(p))
            for p in params
        )

    ppo_update(policy, optimizer, batch, UPDATE, torch.Generator().manual_seed(SEED))
    after_one = rounded()
    masters = [local(optimizer.state[p]["master"]).clone() for p in params]
    state = distributed.optimizer_state(policy, optimizer)
    distributed.load_optimizer_state(policy, optimizer, state if distributed.rank() == 0 else {})
    fp32 = all(
        optimizer.state[p][k].dtype == torch.float32
        for p in params
        for k in ("master", "exp_avg", "exp_avg_sq")
    )
    kept = all(
        torch.equal(local(optimizer.state[p]["master"]), m)
        for p, m in zip(params, masters, strict=True)
    )
    ppo_update(policy, optimizer, batch, UPDATE, torch.Generator().manual_seed(SEED + 1))
    return {
        "rounded_after_one": after_one,
        "fp32_after_load": fp32,
        "masters_kept_through_load": kept,
        # Every step went on from the master it kept (none found stale and taken from p).
        "never_reseeded": optimizer.masters_reseeded == 0,
        "rounded_after_two": rounded(),
    }


def stopped_run(
    strategy: str, device, checkpoint_dir: Path, is_main: bool, save_interval: int
) -> list[str]:
    """Two learner iterations on every rank, then a stop read on rank 0. save_interval 10: the
    last iteration's checkpoint is written at the stop, with every rank in its collectives;
    save_interval 2: it was written by the interval, and no rank writes it again (a rank that
    ran the collectives alone would hang). Returns the checkpoints written."""
    from services.learner.batch import AdvantageConfig
    from services.learner.trainer import Learner, LoopSettings
    from tests.unit.test_learner import make_segment
    from vla_rl.buffer import from_url
    from vla_rl.training.demo import make_optimizer as make_demo_optimizer

    policy = distributed.shard_policy(build_policy().to(device), strategy)
    buffer = (
        from_url("memory://", stream=f"stop-{strategy}-{save_interval}", group="learner")
        if is_main
        else None
    )

    def collect(version: int) -> None:  # rank 0's env servers: an iteration per version
        for i in range(2):
            buffer.put(make_segment(i, iteration=version, policy_version=version))

    if is_main:
        collect(0)
    learner = Learner(
        policy, PromptTokenizer(build_tiny_tokenizer(), tiny_config().pad_token_id),
        make_demo_optimizer(policy, 1e-3, 1e-3), buffer,
        (lambda blob, v: collect(v)) if is_main else None, PPOUpdateConfig(), AdvantageConfig(),
        LoopSettings(2, 10, checkpoint_dir=checkpoint_dir, save_interval=save_interval,
                     segment_timeout_s=60),
    )  # fmt: skip
    learner.run(stop=lambda: learner.iteration >= 2, print_line=lambda line: None)
    return sorted(p.name for p in checkpoint_dir.glob("global_step_*"))


def same_tensors(blob_a: bytes, blob_b: bytes) -> bool:
    """Adapter blobs hold the same tensors (their bytes may differ: safetensors writes the
    metadata keys in hash order)."""
    a, b = st_load(blob_a), st_load(blob_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    batch = distributed.broadcast_object(build_batch() if info.is_main else None)
    out: dict[str, object] = {"world": info.world_size}
    for kind in OPTIMIZERS:
        strategy = os.environ.get("FSDP_STRATEGY", "full_shard")  # sharding_strategy
        policy = build_policy().to(info.device)
        if strategy == "no_shard" and info.rank > 0:
            # A replicated policy starts from rank 0's adapter whatever the others drew.
            with torch.no_grad():
                for p in policy.parameters():
                    if p.requires_grad:
                        p.add_(0.01 * torch.randn_like(p))
        policy = distributed.shard_policy(policy, strategy)
        before = distributed.serialize_adapter_distributed(policy, version=0)
        if kind == "adamw":
            out["probes"] = probe(policy, batch)
        optimizer, out[f"{kind}/metrics"], out[f"{kind}/adapter"] = run_update(policy, batch, kind)
        if kind == "adamw":
            # Round trips through the shards: adapter and optimizer state load back unchanged.
            out["optimizer"] = distributed.optimizer_state(policy, optimizer)
            distributed.load_adapter_distributed(policy, before)
            restored = distributed.serialize_adapter_distributed(policy, version=0)
            out["adapter_round_trip"] = same_tensors(restored, before)
            if strategy == "no_shard" and not info.is_main:
                # Only rank 0 reads a checkpoint: the others must get its state from the load.
                for entry in optimizer.state.values():
                    for value in entry.values():
                        value.zero_()
            distributed.load_optimizer_state(
                policy, optimizer, out["optimizer"] if info.is_main else {}
            )
            out["optimizer_again"] = distributed.optimizer_state(policy, optimizer)
            if strategy == "no_shard":  # replicated: every rank holds the same whole state
                mine = sum(float(v.double().sum()) for e in optimizer.state.values()
                           for v in e.values())  # fmt: skip
                every = [None] * info.world_size
                torch.distributed.all_gather_object(every, mine)
                out["optimizer_same_on_every_rank"] = len(set(every)) == 1
    out["warmup"] = critic_warmup(strategy, batch, info.device)
    out["bf16"] = bf16_masters(strategy, batch, info.device)
    out["stopped_run"] = [
        stopped_run(strategy, info.device, out_dir.parent / f"ckpt{n}", info.is_main, n)
        for n in (10, 2)
    ]
    if info.is_main:
        torch.save(out, out_dir)
    distributed.barrier()
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
