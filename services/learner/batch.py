"""From trajectory segments to a PPO training batch: stack, recompute the old log-probs and
values without grad, and compute GAE (PPO) or group-relative (GRPO) advantages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from vla_rl.algorithms import (
    broadcast_episode_advantages,
    compute_gae,
    compute_grpo_advantages,
    episode_loss_weights,
    filter_groups_by_success,
    next_values_from_segment,
)
from vla_rl.buffer import Segment
from vla_rl.models import OpenVLAPolicy, PromptBatch, PromptTokenizer
from vla_rl.training.distributed import DataParallel, data_parallel, reshard
from vla_rl.training.update import TrainBatch


@dataclass
class SegmentBatch:
    """N segments of T decisions, time-major like the GAE functions want."""

    images: torch.Tensor  # uint8 [T, N, H, W, 3]
    instructions: list[list[str]]  # [T][N]
    action_tokens: torch.Tensor  # int64 [T, N, K]
    behaviour_logprobs: torch.Tensor  # float32 [T, N, K]
    rewards: torch.Tensor  # float32 [T, N]
    terminated: torch.Tensor  # bool [T, N]
    truncated: torch.Tensor  # bool [T, N]
    success: torch.Tensor  # bool [T, N]
    bootstrap_images: torch.Tensor  # uint8 [N, H, W, 3]
    bootstrap_instructions: list[str]  # [N]
    group_ids: torch.Tensor  # int64 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rewards.shape)  # type: ignore[return-value]


def stack_segments(segments: list[Segment]) -> SegmentBatch:
    """Segments of one iteration must share T and K (they come from one collection config)."""
    if not segments:
        raise ValueError("no segments to train on")
    lengths = {len(s.rewards) for s in segments}
    widths = {s.action_tokens.shape[1] for s in segments}
    if len(lengths) != 1 or len(widths) != 1:
        raise ValueError(f"segments differ in length {lengths} or action width {widths}")

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(s, name) for s in segments], axis=1))

    return SegmentBatch(
        images=stack("images"),
        instructions=[list(step) for step in zip(*(s.instructions for s in segments), strict=True)],
        action_tokens=stack("action_tokens").long(),
        behaviour_logprobs=stack("behaviour_logprobs").float(),
        rewards=stack("rewards").float(),
        terminated=stack("terminated").bool(),
        truncated=stack("truncated").bool(),
        success=stack("success").bool(),
        bootstrap_images=torch.from_numpy(np.stack([s.bootstrap_image for s in segments])),
        bootstrap_instructions=[s.bootstrap_instruction for s in segments],
        group_ids=_global_group_ids(segments),
    )


def _global_group_ids(segments: list[Segment]) -> torch.Tensor:
    """Group ids are per env server; the segment id's prefix (run, server, iteration) makes them
    global. Segments without a group (-1) each form their own group."""
    keys: dict[tuple, int] = {}
    ids = []
    for s in segments:
        prefix = s.segment_id.rsplit("-", 1)[0]
        key = (prefix, s.group_id) if s.group_id >= 0 else (s.segment_id, -1)
        ids.append(keys.setdefault(key, len(keys)))
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def recompute_old(
    policy: OpenVLAPolicy,
    images: torch.Tensor,
    prompts: PromptBatch,
    action_tokens: torch.Tensor | None,
    temperature: float,
    micro_batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs [M, K] (None tokens -> empty) and values [M] under the current weights.

    Every rank holds the whole batch; on W data-parallel ranks each computes one contiguous
    W-th of the rows and the shares are gathered, so the recompute shrinks with the GPUs as the
    update does instead of being repeated on each."""
    dp = data_parallel(policy)
    if dp.world_size == 1:  # the whole batch, without copying it into a share
        logp, values = _recompute_rows(
            policy, images, prompts, action_tokens, temperature, micro_batch_size
        )
        return logp.cpu(), values.cpu()
    rows = _share(images.shape[0], dp.rank, dp.world_size)
    share = PromptBatch(prompts.input_ids[rows], prompts.attention_mask[rows])
    tokens = None if action_tokens is None else action_tokens[rows]
    logp, values = _recompute_rows(
        policy, images[rows], share, tokens, temperature, micro_batch_size
    )
    values = _gather_rows(values, dp, images.shape[0])
    if action_tokens is not None:
        logp = _gather_rows(logp, dp, images.shape[0])
    return logp.cpu(), values.cpu()


def _share(m: int, rank: int, world: int) -> torch.Tensor:
    """Row indices of `rank`'s share of m rows: ceil(m / world) of them on every rank, the last
    ranks' padded with repeats of row m-1, so that every rank runs the same number of forwards
    (each one is a collective under FSDP) and the gathered shares line up."""
    per_rank = -(-m // world)
    return torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp(max=m - 1)


def _gather_rows(t: torch.Tensor, dp: DataParallel, m: int) -> torch.Tensor:
    """Every rank's equal-sized share, in rank order, without the padding rows."""
    parts = [torch.empty_like(t) for _ in range(dp.world_size)]
    dist.all_gather(parts, t.contiguous(), group=dp.group)
    return torch.cat(parts)[:m]


def _recompute_rows(
    policy: OpenVLAPolicy,
    images: torch.Tensor,
    prompts: PromptBatch,
    action_tokens: torch.Tensor | None,
    temperature: float,
    micro_batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [M, K] and values [M] (float32, on the policy's device) of these rows."""
    policy.eval()
    logps, values = [], []
    for start in range(0, images.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        pv = policy.pixel_values(images[sl])
        p = PromptBatch(prompts.input_ids[sl], prompts.attention_mask[sl])
        if action_tokens is None:
            # Values only: V is read at the last prompt token, which attends causally and so
            # never sees the action slots; any valid ids serve as placeholders.
            cfg = policy.config
            fill = torch.full((pv.shape[0], cfg.tokens_per_step), cfg.action_vocab_start)
            _, v = policy.forward_actions(pv, p, fill)
        else:
            lp, _, v = policy.evaluate_actions(pv, p, action_tokens[sl], temperature=temperature)
            logps.append(lp.float())
        values.append(v.float())
    # Without resharding after forward (shard_grad_op) the no-grad passes would leave every FSDP
    # unit gathered, i.e. the whole model on every rank, until the update's backward.
    reshard(policy)
    device = values[0].device
    logp = torch.cat(logps) if logps else torch.empty(0, device=device)
    return logp, torch.cat(values)


def first_episode_mask(terminated: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """[T, N] bool: steps up to and including each env's first episode end (GRPO scores whole
    episodes from the shared start; what an env plays after an auto-reset is not from it)."""
    done = (terminated | truncated).long()
    ended_before = torch.cumsum(done, 0) - done  # episode ends strictly before step t
    return ended_before == 0


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


@dataclass
class AdvantageConfig:
    """How segments become advantages and loss weights (from the run's `algorithm` section)."""

    adv_type: str = "gae"
    """'gae' or 'grpo'."""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    reward_scale: float = 1.0
    """GAE: rewards are multiplied by this first (returns of order 1 keep the critic's share of
    the shared LoRA's gradient small)."""
    filter_rewards: bool = False
    """GRPO: train only on groups whose success rate lies in [rewards_lower_bound,
    rewards_upper_bound]."""
    rewards_lower_bound: float = 0.1
    rewards_upper_bound: float = 0.9
    loss_agg_func: str = "token-mean"
    """'token-mean': every valid decision weighs the same; 'seq-mean-token-mean': every episode
    (piece of a segment) weighs the same, its decisions 1 / its length each."""

    def __post_init__(self) -> None:
        if self.adv_type not in ("gae", "grpo"):
            raise ValueError(f"unknown adv_type {self.adv_type!r}")
        if self.loss_agg_func not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg_func must be one of {LOSS_AGGREGATIONS}")


def build_train_batch(
    policy: OpenVLAPolicy,
    prompts_of: PromptTokenizer,
    seg: SegmentBatch,
    adv_cfg: AdvantageConfig,
    temperature: float,
    micro_batch_size: int,
    recompute_logprobs: bool = True,
) -> tuple[TrainBatch, dict[str, float]]:
    """Flatten [T, N] decisions into a TrainBatch with the old log-probs (recomputed, or the
    rollout's when not `recompute_logprobs`) and values (recomputed; GRPO has none)."""
    if seg.truncated[:-1].any():
        # The bootstrap below reads V of the next step after a mid-segment cut, which would be
        # the next episode's first observation. Segments are checked when decoded; this guards
        # batches built by hand.
        raise ValueError("a segment is truncated before its last step; cannot bootstrap it")
    T, N = seg.shape
    flat_images = seg.images.reshape(T * N, *seg.images.shape[2:])
    flat_prompts = prompts_of([text for step in seg.instructions for text in step])
    flat_tokens = seg.action_tokens.reshape(T * N, -1)
    behaviour = seg.behaviour_logprobs.reshape(T * N, -1)
    if recompute_logprobs:
        old_logp, old_values = recompute_old(
            policy, flat_images, flat_prompts, flat_tokens, temperature, micro_batch_size
        )
    elif adv_cfg.adv_type == "gae":  # the critic's values still take a forward
        _, old_values = recompute_old(
            policy, flat_images, flat_prompts, None, temperature, micro_batch_size
        )
        old_logp = behaviour
    else:  # GRPO without a recompute: no forward before the update
        old_logp, old_values = behaviour, torch.zeros(T * N)
    values = old_values.view(T, N)
    mask = torch.ones(T, N, dtype=torch.bool)
    stats: dict[str, float] = {}
    if adv_cfg.adv_type == "gae":
        _, last_value = recompute_old(
            policy,
            seg.bootstrap_images,
            prompts_of(seg.bootstrap_instructions),
            None,
            temperature,
            micro_batch_size,
        )
        # Truncation only ever happens on a segment's last step (the collector aligns the time
        # limit with the segment's end), where the bootstrap image is the real final one.
        final_values = torch.cat([values[1:], last_value[None]])
        next_values = next_values_from_segment(values, final_values, last_value, seg.truncated)
        adv, returns = compute_gae(
            seg.rewards * adv_cfg.reward_scale,
            values,
            next_values,
            seg.terminated,
            seg.truncated,
            adv_cfg.gamma,
            adv_cfg.gae_lambda,
        )
    else:
        mask = first_episode_mask(seg.terminated, seg.truncated)
        scores = torch.where(mask, seg.rewards, torch.zeros_like(seg.rewards)).sum(0)
        episode_adv = compute_grpo_advantages(scores, seg.group_ids)
        if adv_cfg.filter_rewards:
            success = (seg.success & mask).any(0)
            keep = filter_groups_by_success(
                success, seg.group_ids, adv_cfg.rewards_lower_bound, adv_cfg.rewards_upper_bound
            )
            mask &= keep[None]
            stats["rollout/groups_kept_fraction"] = float(keep.float().mean())
        adv = broadcast_episode_advantages(episode_adv, mask)
        returns = adv.clone()
    if adv_cfg.loss_agg_func == "seq-mean-token-mean":
        weights = episode_loss_weights(seg.terminated, seg.truncated, mask)
    else:
        weights = mask.float()
    flat_mask = mask.reshape(-1)
    valid_adv = adv.reshape(-1)[flat_mask]
    stats.update(
        {
            "rollout/advantages_max": float(valid_adv.max()) if valid_adv.numel() else 0.0,
            "rollout/advantages_mean": float(valid_adv.mean()) if valid_adv.numel() else 0.0,
            "rollout/advantages_min": float(valid_adv.min()) if valid_adv.numel() else 0.0,
            "rollout/rewards": float(seg.rewards.mean()),
        }
    )
    if recompute_logprobs:  # without the recompute there is nothing to compare
        stats["rollout/logprob_mismatch"] = float((behaviour - old_logp).abs().mean())
    batch = TrainBatch(
        images=flat_images,
        prompts=flat_prompts,
        action_tokens=flat_tokens,
        old_logprobs=old_logp,
        advantages=adv.reshape(-1),
        returns=returns.reshape(-1),
        old_values=old_values,
        mask=flat_mask,
        loss_weights=weights.reshape(-1),
        behaviour_logprobs=behaviour,
    )
    return batch, stats
