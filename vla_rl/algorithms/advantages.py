"""Advantage estimators: GAE for critic-based PPO, group-normalised (GRPO) for critic-free PPO.

All functions are pure torch, run without autograd and are chosen by name from a small registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_ADVANTAGE_ESTIMATORS: dict[str, Callable[..., object]] = {}


def register_advantage_estimator(name: str) -> Callable[[Callable], Callable]:
    """Decorator that registers an advantage estimator under `name` for `get_advantage_estimator`."""

    def decorator(fn: Callable) -> Callable:
        if name in _ADVANTAGE_ESTIMATORS and _ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> Callable:
    """Return the advantage estimator registered as `name` ("gae", "grpo", ...)."""
    if name not in _ADVANTAGE_ESTIMATORS:
        known = ", ".join(sorted(_ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; known: {known}")
    return _ADVANTAGE_ESTIMATORS[name]


def _check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)} "
                f"like {reference_name}"
            )


@torch.no_grad()
def next_values_from_segment(
    values: torch.Tensor,
    final_values: torch.Tensor,
    last_value: torch.Tensor,
    truncated: torch.Tensor,
) -> torch.Tensor:
    """Build V(s'_t), the value of the observation actually reached after each step of a segment.

    Args:
        values: [T, B] V(s_t) of the observations the actions were taken from.
        final_values: [T, B] V of the final observation of an episode; read only where
            `truncated`, other entries may hold anything (even NaN).
        last_value: [B] V of the bootstrap observation after the last step of the segment.
        truncated: [T, B] bool, the episode was cut by a time limit after step t.

    Returns:
        next_values: [T, B]. values[t + 1] inside the segment, last_value at its end, and
        final_values[t] where truncated, because auto-reset vector envs return the first
        observation of the next episode as s_{t+1}, which is not the state the agent reached.
        Entries at terminated steps are whatever comes out; GAE multiplies them by zero.
    """
    _check_same_shape("values", values, final_values=final_values, truncated=truncated)
    if last_value.shape != values.shape[1:]:
        raise ValueError(
            f"last_value has shape {tuple(last_value.shape)}, expected {tuple(values.shape[1:])}"
        )
    next_values = torch.cat([values[1:], last_value.unsqueeze(0).to(values.dtype)], dim=0)
    return torch.where(truncated.bool(), final_values.to(values.dtype), next_values)


@register_advantage_estimator("gae")
@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over a time-major segment.

    delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
    A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1},  done = terminated | truncated

    Args:
        rewards, values, next_values: [T, B] float; next_values[t] is V of the observation reached
            after step t (see `next_values_from_segment`).
        terminated: [T, B] bool/0-1, the episode reached a terminal state after step t.
        truncated: [T, B] bool/0-1, the episode was cut by a time limit after step t.
        gamma, gae_lambda: discount and GAE lambda in [0, 1].
        mask: optional [T, B], 1 where the step is valid; invalid steps get advantage 0 and the
            recursion does not pass through them.

    Returns:
        advantages: [T, B], returns: [T, B] = advantages + values (the critic's target; equal to
        values at masked steps, which the value loss should mask anyway).
    """
    _check_same_shape(
        "rewards",
        rewards,
        values=values,
        next_values=next_values,
        terminated=terminated,
        truncated=truncated,
        mask=mask,
    )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= gae_lambda <= 1.0):
        raise ValueError(f"gamma and gae_lambda must lie in [0, 1], got {gamma}, {gae_lambda}")

    dtype = values.dtype if values.is_floating_point() else torch.float32
    rewards, values, next_values = rewards.to(dtype), values.to(dtype), next_values.to(dtype)
    terminated = terminated.bool()
    done = terminated | truncated.bool()
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    zero = torch.zeros_like(values[0])

    # Every cut is a where(), never a multiplication by 0: 0 * NaN is NaN, so one bad value or
    # reward would otherwise flow back into every earlier episode of the segment.
    # Truncation still bootstraps from next_values (the episode could have gone on), but it ends
    # the episode, so the recursion must not leak the next episode's advantages into this one.
    bootstrap = torch.where(terminated, torch.zeros_like(next_values), next_values)
    deltas = torch.where(valid, rewards + gamma * bootstrap - values, torch.zeros_like(values))

    advantages = torch.zeros_like(values)
    next_advantage = zero
    for t in reversed(range(values.shape[0])):
        carried = torch.where(done[t], zero, gamma * gae_lambda * next_advantage)
        next_advantage = torch.where(valid[t], deltas[t] + carried, zero)
        advantages[t] = next_advantage
    return advantages, advantages + values


@register_advantage_estimator("grpo")
@torch.no_grad()
def compute_grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): (score - group mean) / (group std + eps).

    The std is the unbiased one (Bessel's correction), as torch.std in verl and RLinf. A group of a
    single episode has no spread to compare against, so its std is taken as 0 and its advantage is
    0; groups whose scores are all equal also get 0.

    Args:
        scores: [N] episode scores (e.g. success as 0/1 or a return).
        group_ids: [N] integer id of the group (same initial state / prompt) of each episode.
        eps: added to the std so that near-uniform groups do not blow up.

    Returns:
        advantages: [N] float.
    """
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"scores and group_ids must both be [N], got {tuple(scores.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    scores = scores.to(scores.dtype if scores.is_floating_point() else torch.float32)
    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0

    counts = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    counts.index_add_(0, group_index, torch.ones_like(scores))
    sums = torch.zeros_like(counts).index_add_(0, group_index, scores)
    means = sums / counts
    deviations = scores - means[group_index]
    squared = torch.zeros_like(counts).index_add_(0, group_index, deviations.square())
    # clamp keeps size-1 groups at std 0 (deviation is exactly 0 there) instead of 0/0 = NaN.
    stds = (squared / (counts - 1.0).clamp(min=1.0)).sqrt()
    return deviations / (stds[group_index] + eps)


def filter_groups_by_success(
    success: torch.Tensor, group_ids: torch.Tensor, lower: float, upper: float
) -> torch.Tensor:
    """Keep-mask of the episodes whose group's success rate lies in [lower, upper].

    With lower > 0 and upper < 1 this drops groups whose episodes all succeeded or all failed:
    their group-relative advantages are all 0 and only dilute the batch (DAPO's dynamic
    sampling; RLinf's filter_rewards with rewards_lower_bound / rewards_upper_bound).

    Args:
        success: [N] bool/0-1 success of each episode.
        group_ids: [N] integer group id of each episode.
        lower, upper: bounds of the group's success rate, inclusive.

    Returns:
        keep: [N] bool.
    """
    if success.dim() != 1 or group_ids.shape != success.shape:
        raise ValueError(
            f"success and group_ids must both be [N], got {tuple(success.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    _, group_index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    success = success.bool().double()
    counts = torch.zeros(num_groups, dtype=torch.float64, device=success.device)
    counts.index_add_(0, group_index, torch.ones_like(success))
    rate = torch.zeros_like(counts).index_add_(0, group_index, success) / counts.clamp(min=1)
    keep = (rate >= lower) & (rate <= upper)
    return keep[group_index]


def normalize_advantages(
    advantages: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Standardise advantages to zero mean and unit std over the valid entries (PPO's batch
    normalisation); invalid entries become 0. Fewer than two valid entries: returned as is.

    Not for GRPO: its episode advantages are already normalised per group, and a per-decision
    re-standardisation shifts them by the mean over decisions, which long failed episodes
    dominate, and can turn a failure's negative advantage positive.

    Args:
        advantages: [N] (or any shape) float.
        mask: optional bool of advantages' shape.

    Returns:
        advantages' shape.
    """
    valid = torch.ones_like(advantages, dtype=torch.bool) if mask is None else mask.bool()
    zeros = torch.zeros_like(advantages)
    if valid.sum() < 2:
        return torch.where(valid, advantages, zeros)
    kept = advantages[valid]
    return torch.where(valid, (advantages - kept.mean()) / (kept.std() + eps), zeros)


def episode_loss_weights(
    terminated: torch.Tensor, truncated: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-decision weights that give every episode (piece) of a segment the same total weight:
    1 / its number of valid decisions (the `seq-mean-token-mean` loss aggregation).

    An episode piece is a run of decisions between two episode ends inside one segment (column);
    the last piece of a column ends with the segment.

    Args:
        terminated, truncated: [T, N] bool, the episode ended after step t.
        mask: [T, N] bool, the decisions that count.

    Returns:
        weights: [T, N] float, 0 at invalid decisions.
    """
    done = (terminated.bool() | truncated.bool()).long()
    # Piece index of every step: the number of episode ends strictly before it.
    piece = torch.cumsum(done, 0) - done
    T, N = piece.shape
    key = piece * N + torch.arange(N).unsqueeze(0)
    valid = mask.bool()
    counts = torch.zeros(int(key.max()) + 1, dtype=torch.float32)
    counts.index_add_(0, key[valid], torch.ones(int(valid.sum())))
    weights = 1.0 / counts.clamp(min=1.0)[key]
    return torch.where(valid, weights, torch.zeros_like(weights))


def broadcast_episode_advantages(
    advantages: torch.Tensor, valid_mask: torch.Tensor
) -> torch.Tensor:
    """Give every valid step of an episode that episode's advantage (GRPO is per episode).

    Args:
        advantages: [N] one advantage per episode.
        valid_mask: [T, N] bool/0-1, 1 where step t belongs to episode n.

    Returns:
        step_advantages: [T, N], the episode advantage at valid steps, 0 elsewhere.
    """
    if valid_mask.dim() != 2 or advantages.shape != valid_mask.shape[1:]:
        raise ValueError(
            f"expected advantages [N] and valid_mask [T, N], got {tuple(advantages.shape)} and "
            f"{tuple(valid_mask.shape)}"
        )
    step_advantages = advantages.unsqueeze(0).expand(valid_mask.shape)
    return torch.where(valid_mask.bool(), step_advantages, torch.zeros_like(step_advantages))
