"""One PPO update (several epochs of shuffled mini-batches, gradient accumulation over
micro-batches) of a VLA policy on a batch of already-scored decisions.

The same function serves PPO (GAE advantages, value loss) and GRPO (group advantages,
`value_coef=0`); the advantage estimator runs before, in the caller.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vla_rl.algorithms import (
    approx_kl,
    behaviour_importance_weights,
    entropy_bonus,
    explained_variance,
    get_policy_loss,
    normalize_advantages,
    value_loss,
)
from vla_rl.models import OpenVLAPolicy, PromptBatch, aggregate_entropy, aggregate_logprobs

from .distributed import (
    all_reduce_sums,
    clip_grad_norm,
    data_parallel,
    is_replicated,
    reduce_gradients,
    reshard,
    set_gradient_sync,
)
from .optim import MasterWeightAdamW


@dataclass
class PPOUpdateConfig:
    """Knobs of the update, named as in RLinf's `algorithm` / `actor` sections."""

    update_epochs: int = 1
    """Passes over the batch per update."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch (the batch is split into this many shuffled mini-batches)."""
    micro_batch_size: int = 8
    """Samples per forward/backward; gradients accumulate up to a mini-batch."""
    clip_ratio_low: float = 0.2
    """PPO ratio clip below 1."""
    clip_ratio_high: float = 0.2
    """PPO ratio clip above 1 (asymmetric clipping when it differs from clip_ratio_low)."""
    dual_clip_c: float | None = None
    """Dual-clip bound c (> 1) for negative advantages; None disables it."""
    value_clip: float | None = 0.2
    """Clip range of the value update around the old values; None disables clipping."""
    huber_delta: float | None = None
    """Huber loss for the critic instead of squared error when set."""
    value_coef: float = 0.5
    """Weight of the value loss (0 for GRPO: no critic)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    logprob_level: str = "token"
    """Ratio computed per 'token', per 'action' (7 tokens) or per 'chunk'."""
    temperature: float = 1.0
    """Sampling temperature of the rollout; the training distribution must match it."""
    normalize_advantages: bool = True
    """Standardise advantages over the batch (PPO); GRPO's are already normalised per group."""
    entropy_level: str = "action"
    """Entropy bonus per 'action' (sum over its tokens, RLinf's action_level) or per 'token'."""
    decoupled: bool = False
    """Decoupled PPO: the batch's old_logprobs are the proximal policy's and the loss is weighted
    by pi_prox / pi_behav from its behaviour_logprobs (for data collected by older policies)."""
    behaviour_weight_cap: float | None = None
    """Decoupled PPO: truncate pi_prox / pi_behav at this value; None: no truncation."""
    kl_estimator: str = "k3"
    """Estimator of the logged train/actor/approx_kl: 'k1', 'k2' or 'k3' (see `approx_kl`)."""
    train_policy: bool = True
    """False: a critic warm-up step. Only the value loss is optimised, and the value head reads
    the LLM's state detached, so no gradient reaches the LoRA and the policy does not move."""
    reduce_every_micro_batch: bool = False
    """Data-parallel: reduce gradients over the ranks after every micro-batch's backward, or
    (False, the default) let them add up on each rank and reduce once, after the step's last
    micro-batch: one collective per step. Measured on 4 H200s with 7B shapes (no_shard as
    FSDP2 then, batch 256, micro 16): 3.27x the 1-GPU update against 2.79x
    (benchmarks/README.md). FSDP strategies only: no_shard always reduces once per step."""

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("logprob_level", self.logprob_level, ("token", "action", "chunk")),
            ("entropy_level", self.entropy_level, ("token", "action")),
            ("kl_estimator", self.kl_estimator, ("k1", "k2", "k3")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name in ("update_epochs", "num_mini_batches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.train_policy and self.value_coef <= 0:
            raise ValueError("train_policy=False (critic warm-up) needs a critic: value_coef > 0")


def trainable_split(
    policy: OpenVLAPolicy,
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The trainable parameters as (value head, the rest: the policy's adapters)."""
    head, rest = [], []
    for name, p in policy.named_parameters():
        if p.requires_grad:
            (head if name.startswith("value_head.") else rest).append(p)
    return head, rest


def make_optimizer(
    policy: OpenVLAPolicy,
    lr: float,
    value_lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with a separate learning rate for the value head (it starts from scratch), and fp32
    master copies of parameters stored in bf16 (see optim.py: bf16 alone loses small updates)."""
    reshard(policy)  # the optimizer must hold the sharded parameters, not gathered copies
    head, rest = trainable_split(policy)
    return MasterWeightAdamW(
        [{"params": rest, "lr": lr}, {"params": head, "lr": value_lr}],
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
    )


@dataclass
class TrainBatch:
    """N decisions with everything the loss needs (K = tokens per decision)."""

    images: torch.Tensor  # [N, 224, 224, 3] uint8
    prompts: PromptBatch  # [N, L]
    action_tokens: torch.Tensor  # [N, K]
    old_logprobs: torch.Tensor  # [N, K] token log-probs the ratio starts from (see below)
    advantages: torch.Tensor  # [N]
    returns: torch.Tensor  # [N]
    old_values: torch.Tensor  # [N]
    mask: torch.Tensor | None = None  # [N] bool: decisions that count in the loss
    loss_weights: torch.Tensor | None = None  # [N] float: weight of each decision (None: 1)
    behaviour_logprobs: torch.Tensor | None = None  # [N, K] the rollout's, for decoupled PPO
    # old_logprobs are the learner's recompute under the weights before the update: with
    # on-policy data they equal the behaviour policy's (up to engine numerics); with stale data
    # they are the proximal policy of decoupled PPO and behaviour_logprobs correct for the gap.
    # With algorithm.recompute_logprobs false (on-policy only) they are the behaviour's.

    def __len__(self) -> int:
        return self.action_tokens.shape[0]

    def select(self, index: torch.Tensor) -> TrainBatch:
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index]

        prompts = PromptBatch(self.prompts.input_ids[index], self.prompts.attention_mask[index])
        return TrainBatch(
            self.images[index], prompts, self.action_tokens[index], self.old_logprobs[index],
            self.advantages[index], self.returns[index], self.old_values[index],
            pick(self.mask), pick(self.loss_weights), pick(self.behaviour_logprobs),
        )  # fmt: skip


def _level(logprobs: torch.Tensor, policy: OpenVLAPolicy, level: str) -> torch.Tensor:
    return aggregate_logprobs(logprobs, policy.config.action_dim, level)


def ppo_update(
    policy: OpenVLAPolicy,
    optimizer: torch.optim.Optimizer,
    batch: TrainBatch,
    cfg: PPOUpdateConfig,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run cfg.update_epochs x cfg.num_mini_batches optimizer steps; returns averaged metrics
    keyed by RLinf's TensorBoard names (without the `train/` prefix).

    Data-parallel when `policy` is sharded (`distributed.shard_policy`): every rank passes the
    same batch and a generator in the same state, so all ranks draw the same mini-batches; rank r
    of W runs micro-batches r, r + W, ... of each mini-batch. The optimizer step and the metrics
    then equal the single-process update's, up to the order of float sums.
    """
    policy.train()
    dp = data_parallel(policy)
    if cfg.reduce_every_micro_batch and is_replicated(policy):
        raise ValueError("no_shard reduces gradients once per step; reduce_every_micro_batch "
                         "applies to the FSDP strategies")  # fmt: skip
    n = len(batch)
    valid = torch.ones(n, dtype=torch.bool) if batch.mask is None else batch.mask.bool()
    adv = batch.advantages.float()
    if cfg.normalize_advantages:
        adv = normalize_advantages(adv, valid)
    weights = torch.ones(n) if batch.loss_weights is None else batch.loss_weights.float()
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    if cfg.decoupled and batch.behaviour_logprobs is None:
        raise ValueError("decoupled PPO needs the batch's behaviour_logprobs")
    batch = TrainBatch(
        **{**batch.__dict__, "advantages": adv, "mask": valid, "loss_weights": weights}
    )
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def record(name: str, value) -> None:
        v = float(value.detach()) if torch.is_tensor(value) else float(value)
        if v == v:  # skip NaN (e.g. explained variance of constant returns)
            sums[name] += v
            counts[name] += 1

    params = [p for p in policy.parameters() if p.requires_grad]
    # A critic warm-up steps the value head only. The loss does not reach the other weights, but
    # no_shard's all-reduce gives them zero gradients, on which AdamW would still move them
    # (momentum, weight decay): their gradients are dropped before the step.
    frozen = [] if cfg.train_policy else trainable_split(policy)[1]
    mini_size = max(1, n // cfg.num_mini_batches)
    for _ in range(cfg.update_epochs):
        order = torch.randperm(n, generator=generator)
        for m in range(cfg.num_mini_batches):
            mini = order[m * mini_size : (m + 1) * mini_size if m < cfg.num_mini_batches - 1 else n]
            mini_weight = float(weights[mini].sum())
            if mini_weight <= 0:
                # Nothing in it counts: no gradient, and no optimizer step either, since AdamW's
                # momentum would still move the weights on a zero gradient. (Every rank holds
                # the same batch and order, so all ranks skip together.)
                record("actor/skipped_mini_batches", 1.0)
                continue
            record("actor/skipped_mini_batches", 0.0)
            optimizer.zero_grad(set_to_none=True)
            starts = list(range(0, len(mini), cfg.micro_batch_size))
            mine = starts[dp.rank :: dp.world_size]
            # Every rank runs as many forward/backward passes as the busiest one, or the FSDP
            # collectives would not pair up; the spare passes carry zero weight.
            passes = -(-len(starts) // dp.world_size)
            for i in range(passes):
                set_gradient_sync(policy, cfg.reduce_every_micro_batch or i == passes - 1)
                if i < len(mine):
                    micro = batch.select(mini[mine[i] : mine[i] + cfg.micro_batch_size])
                    loss = _micro_loss(policy, micro, cfg, record)
                    weight = float(micro.loss_weights.sum()) / mini_weight
                else:
                    loss = _micro_loss(policy, batch.select(mini[:1]), cfg, None)
                    weight = 0.0
                # The accumulated gradient is the weighted mean over the mini-batch's valid
                # decisions; FSDP averages over ranks, hence the factor world_size.
                (loss * (weight * dp.world_size)).backward()
            reduce_gradients(policy, params)  # no_shard's one all-reduce (FSDP's is done)
            grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
            record("actor/grad_norm", grad_norm)
            for p in frozen:
                p.grad = None
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:  # a non-finite gradient would corrupt the adapter; skip this step
                optimizer.zero_grad(set_to_none=True)
    record("actor/lr", optimizer.param_groups[0]["lr"])
    policy.eval()
    total, count = all_reduce_sums(sums, counts, dp)
    return {k: total[k] / count[k] for k in total}


def _micro_loss(
    policy: OpenVLAPolicy,
    micro: TrainBatch,
    cfg: PPOUpdateConfig,
    record: Callable[[str, object], None] | None,
) -> torch.Tensor:
    """The PPO loss of one micro-batch (masked means over its valid decisions); records its
    metrics unless `record` is None."""
    device = policy.device
    mask = micro.mask.to(device)
    weights = micro.loss_weights.to(device)
    pv = policy.pixel_values(micro.images)
    logp, entropy, values = policy.evaluate_actions(
        pv,
        micro.prompts,
        micro.action_tokens,
        temperature=cfg.temperature,
        detach_value_input=not cfg.train_policy,
    )
    logp = _level(logp, policy, cfg.logprob_level)
    old = _level(micro.old_logprobs.to(device), policy, cfg.logprob_level)

    # Per-decision tensors take the log-probs' shape: [N, E] per token/action, [N] per chunk.
    def per_entry(x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, *([1] * (logp.dim() - 1))).expand_as(logp)

    behaviour_weights = None
    if cfg.decoupled:
        behaviour = _level(micro.behaviour_logprobs.to(device), policy, cfg.logprob_level)
        behaviour_weights, w_metrics = behaviour_importance_weights(
            old, behaviour, cfg.behaviour_weight_cap, per_entry(mask)
        )
        if record is not None:
            for name, value in w_metrics.items():
                record(f"actor/{name}", value)
    pg_loss, pg_metrics = get_policy_loss("ppo")(
        logp, old, per_entry(micro.advantages.to(device)), cfg.clip_ratio_low,
        cfg.clip_ratio_high, cfg.dual_clip_c, mask=per_entry(weights),
        behaviour_weights=behaviour_weights,
    )  # fmt: skip
    entropy = aggregate_entropy(entropy, policy.config.action_dim, cfg.entropy_level)
    ent = entropy_bonus(entropy, weights.view(-1, 1).expand_as(entropy))
    # A critic warm-up step optimises the value loss alone (the policy terms still get logged).
    loss = pg_loss - cfg.entropy_coef * ent if cfg.train_policy else pg_loss.new_zeros(())
    if cfg.value_coef > 0:
        v_loss, v_metrics = value_loss(
            values, micro.old_values.to(device), micro.returns.to(device),
            cfg.value_clip, cfg.huber_delta, mask=weights,
        )  # fmt: skip
        loss = loss + cfg.value_coef * v_loss
        if record is not None:
            record("critic/value_loss", v_loss)
            record("critic/value_clip_ratio", v_metrics["value_clip_ratio"])
            record(
                "critic/explained_variance",
                explained_variance(values.detach(), micro.returns.to(device), mask),
            )
    if record is not None:
        record("actor/policy_loss", pg_loss)
        record("actor/approx_kl", approx_kl(logp.detach(), old, per_entry(mask), cfg.kl_estimator))
        record("actor/clip_fraction", pg_metrics["clip_fraction"])
        record("actor/clipped_ratio", pg_metrics["clipped_ratio"])
        record("entropy_loss", ent)
        record("loss", loss)
    return loss
