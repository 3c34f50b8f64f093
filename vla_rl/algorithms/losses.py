"""PPO losses and diagnostics: clipped policy loss (asymmetric and dual clip), clipped value loss,
entropy bonus, KL estimators and explained variance, all as masked means over valid entries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Log-ratios beyond this are numerically meaningless; clamping keeps exp() finite (as verl does).
_MAX_LOG_RATIO = 20.0

_POLICY_LOSSES: dict[str, Callable[..., object]] = {}


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator that registers a policy loss under `name` for `get_policy_loss`."""

    def decorator(fn: Callable) -> Callable:
        if name in _POLICY_LOSSES and _POLICY_LOSSES[name] is not fn:
            raise ValueError(f"policy loss {name!r} is already registered")
        _POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> Callable:
    """Return the policy loss registered as `name` ("ppo", ...)."""
    if name not in _POLICY_LOSSES:
        known = ", ".join(sorted(_POLICY_LOSSES))
        raise ValueError(f"unknown policy loss {name!r}; known: {known}")
    return _POLICY_LOSSES[name]


def _check_broadcasts(name: str, tensor: torch.Tensor, target: torch.Tensor) -> None:
    """Raise unless `tensor` broadcasts to `target`'s shape without enlarging it."""
    try:
        shape = torch.broadcast_shapes(tensor.shape, target.shape)
    except RuntimeError as error:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to {tuple(target.shape)}"
        ) from error
    if shape != target.shape:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} would enlarge {tuple(target.shape)} to {shape}"
        )


def _valid_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Bool mask of x's shape, all true when mask is None."""
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    _check_broadcasts("mask", mask, x)
    return mask.bool().expand(x.shape)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x over entries where mask is true (or weighted mean, for float weights); 0 if none
    counts.

    Args:
        x: any shape.
        mask: optional, broadcastable to x: bool/0-1 (plain mean over the true entries) or
            non-negative float weights (sum(w * x) / sum(w) over entries with w > 0; the loss
            aggregation `seq-mean-token-mean` weights each decision by 1 / its episode length).

    Returns:
        0-d tensor. Masked-out entries are replaced, not multiplied, so NaN/inf there (e.g. padded
        log-probs) cannot poison the mean.
    """
    valid = _valid_mask(x, mask)
    if mask is None or mask.dtype == torch.bool:
        weights = valid.to(x.dtype)
    else:
        weights = mask.expand(x.shape).to(x.dtype)
    zero = torch.zeros_like(x)
    total = torch.where(valid, x * weights, zero).sum()
    denominator = torch.where(valid, weights, zero).sum()
    # An empty micro-batch should contribute nothing rather than NaN to the gradient.
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, total / safe, torch.zeros_like(total))


def _log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    if logprobs.shape != old_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and old_logprobs {tuple(old_logprobs.shape)} differ"
        )
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # Zero at invalid entries before exp(): a where() after exp() would still send NaN gradients
    # back through an overflowing exp of padding.
    return torch.where(valid, log_ratio, torch.zeros_like(log_ratio))


def approx_kl(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "k3",
) -> torch.Tensor:
    """Sample estimate of KL(pi_old || pi) from actions drawn by pi_old (Schulman, "Approximating
    KL divergence", 2020), with r = pi / pi_old:

    k1 = -log r (unbiased, high variance, can be negative); k2 = 0.5 * (log r)^2 (biased, low
    variance); k3 = (r - 1) - log r (unbiased, low variance, always >= 0).

    Args:
        logprobs, old_logprobs: same shape, e.g. [N, K] or [N].
        mask: optional bool/0-1, broadcastable to logprobs.
        kind: "k1", "k2" or "k3".

    Returns:
        0-d tensor, masked mean of the estimator.
    """
    valid = _valid_mask(logprobs, mask)
    log_ratio = _log_ratio(logprobs, old_logprobs, valid)
    if kind == "k1":
        estimate = -log_ratio
    elif kind == "k2":
        estimate = 0.5 * log_ratio.square()
    elif kind == "k3":
        estimate = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; known: k1, k2, k3")
    return masked_mean(estimate, valid)


@register_policy_loss("ppo")
def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float | None = None,
    dual_clip_c: float | None = None,
    mask: torch.Tensor | None = None,
    behaviour_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), with asymmetric clip range (DAPO's
    clip-higher) and optional dual clip (Ye et al. 2020).

    r = exp(logprobs - old_logprobs)
    loss = max(-A * r, -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))
    dual clip, where A < 0: loss = min(loss, -dual_clip_c * A), which bounds how much a very
    large ratio on a bad action can push the update.

    Decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"; AReaL):
    when the data was collected by an older behaviour policy, `old_logprobs` are those of the
    proximal policy (the learner's weights before this update) and `behaviour_weights` =
    pi_prox / pi_behav (see `behaviour_importance_weights`) multiply each entry's loss, so the
    clip acts around the proximal policy and the importance correction stays unclipped by it.

    Args:
        logprobs: [N, K] (per action token / action dim) or [N], under the current policy, with grad.
        old_logprobs: same shape, under the behaviour policy that collected the data.
        advantages: broadcastable to logprobs, e.g. [N, 1] per step or [N, K].
        clip_ratio_low: epsilon below 1, in (0, 1).
        clip_ratio_high: epsilon above 1, > 0; None means clip_ratio_low.
        dual_clip_c: lower bound factor c > 1 for negative advantages; None disables it.
        mask: optional bool/0-1 or float weights broadcastable to logprobs; the loss is a
            (weighted) mean over valid entries.
        behaviour_weights: optional, logprobs' shape, detached pi_prox / pi_behav per entry.

    Returns:
        loss: 0-d tensor.
        metrics: detached 0-d tensors (no host sync until logged): clip_fraction, approx_kl (k3),
            clipped_ratio, ratio_mean, dual_clip_fraction.
    """
    if clip_ratio_high is None:
        clip_ratio_high = clip_ratio_low
    if not 0.0 < clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low must lie in (0, 1), got {clip_ratio_low}")
    if not clip_ratio_high > 0.0:
        raise ValueError(f"clip_ratio_high must be > 0, got {clip_ratio_high}")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    _check_broadcasts("advantages", advantages, logprobs)
    valid = _valid_mask(logprobs, mask)
    log_ratio = _log_ratio(logprobs, old_logprobs, valid)
    # Same reason as in _log_ratio: NaN advantages at padding would give NaN gradients.
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    clamped_ratio = ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clamped_ratio
    per_entry_loss = torch.maximum(unclipped_loss, clipped_loss)
    clip_active = clipped_loss > unclipped_loss

    if dual_clip_c is not None:
        dual_bound = -dual_clip_c * advantages
        dual_active = (advantages < 0) & (per_entry_loss > dual_bound)
        per_entry_loss = torch.where(dual_active, dual_bound, per_entry_loss)
    else:
        dual_active = torch.zeros_like(clip_active)
    if behaviour_weights is not None:
        if behaviour_weights.shape != per_entry_loss.shape:
            raise ValueError(
                f"behaviour_weights {tuple(behaviour_weights.shape)} must have the shape of "
                f"logprobs {tuple(per_entry_loss.shape)}"
            )
        per_entry_loss = per_entry_loss * behaviour_weights.detach()

    loss = masked_mean(per_entry_loss, valid if mask is None else mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean(clip_active.to(ratio.dtype), valid),
            "approx_kl": approx_kl(logprobs, old_logprobs, valid, kind="k3"),
            "clipped_ratio": masked_mean(clamped_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            "dual_clip_fraction": masked_mean(dual_active.to(ratio.dtype), valid),
        }
    return loss, metrics


@torch.no_grad()
def behaviour_importance_weights(
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    cap: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO's importance weight pi_prox / pi_behav of each entry, truncated at `cap`.

    Args:
        proximal_logprobs: [N, ...] log-probs under the proximal policy (the learner's weights
            before the update, recomputed without grad).
        behaviour_logprobs: same shape, log-probs reported by the rollout that sampled the actions.
        cap: upper bound of the weight (truncated importance sampling); None: no bound.
        mask: optional bool/0-1 broadcastable to the log-probs, for the metrics.

    Returns:
        weights: same shape, detached; 1 at invalid entries.
        metrics: behaviour_weight_mean, behaviour_weight_max, behaviour_weight_capped_fraction.
    """
    valid = _valid_mask(proximal_logprobs, mask)
    log_ratio = _log_ratio(proximal_logprobs, behaviour_logprobs, valid)
    raw = torch.exp(log_ratio)
    weights = raw if cap is None else raw.clamp(max=cap)
    capped = (raw > weights).to(raw.dtype)
    metrics = {
        "behaviour_weight_mean": masked_mean(weights, valid),
        "behaviour_weight_max": torch.where(valid, raw, torch.zeros_like(raw)).max(),
        "behaviour_weight_capped_fraction": masked_mean(capped, valid),
    }
    return weights, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_range: float | None = 0.2,
    huber_delta: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss: the larger of the errors of the new value and of the old value moved
    by at most clip_range towards it, so the critic cannot gain by jumping far from old_values.

    error(x) = 0.5 * x^2, or Huber(x, delta) = 0.5 * x^2 if |x| <= delta else delta * (|x| - delta/2)
    (which equals 0.5 * x^2 for small errors, so both scales match).

    Args:
        values: [N] or [T, B], current critic output, with grad.
        old_values: same shape, critic output at rollout time.
        returns: same shape, value targets (e.g. GAE returns).
        clip_range: max change of the value from old_values; None disables clipping.
        huber_delta: > 0 to use the Huber error; None uses the squared error.
        mask: optional bool/0-1 or float weights broadcastable to values.

    Returns:
        loss: 0-d tensor.
        metrics: value_clip_ratio, fraction of valid entries where the clipped error was larger.
    """
    if values.shape != old_values.shape or values.shape != returns.shape:
        raise ValueError(
            f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)} and returns "
            f"{tuple(returns.shape)} must have the same shape"
        )
    if clip_range is not None and not clip_range > 0.0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
    if huber_delta is not None and not huber_delta > 0.0:
        raise ValueError(f"huber_delta must be > 0 or None, got {huber_delta}")
    valid = _valid_mask(values, mask)

    def error(prediction: torch.Tensor) -> torch.Tensor:
        diff = prediction - returns
        if huber_delta is None:
            return 0.5 * diff.square()
        abs_diff = diff.abs()
        return torch.where(
            abs_diff <= huber_delta,
            0.5 * diff.square(),
            huber_delta * (abs_diff - 0.5 * huber_delta),
        )

    weights = valid if mask is None else mask
    unclipped_error = error(values)
    if clip_range is None:
        loss = masked_mean(unclipped_error, weights)
        return loss, {"value_clip_ratio": torch.zeros((), device=values.device)}

    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped_error = error(clipped_values)
    loss = masked_mean(torch.maximum(unclipped_error, clipped_error), weights)
    with torch.no_grad():
        clip_ratio = masked_mean((clipped_error > unclipped_error).to(values.dtype), valid)
    return loss, {"value_clip_ratio": clip_ratio}


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean policy entropy over valid entries; the caller subtracts coef * this from the loss.

    Args:
        entropy: [N, K] or [N], per-entry entropy of the current policy, with grad (per token,
            or per action as the sum of its tokens' entropies: see `aggregate_entropy`).
        mask: optional bool/0-1 or float weights broadcastable to entropy.

    Returns:
        0-d tensor.
    """
    return masked_mean(entropy, mask)


@torch.no_grad()
def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant,
    negative worse than one.

    Args:
        values, returns: same shape, e.g. [T, B].
        mask: optional bool/0-1 broadcastable to values.

    Returns:
        0-d tensor; NaN when returns have no variance over the valid entries (or none is valid),
        since the ratio is undefined there and a silent 0 or 1 would mislead.
    """
    if values.shape != returns.shape:
        raise ValueError(f"values {tuple(values.shape)} and returns {tuple(returns.shape)} differ")
    valid = _valid_mask(values, mask)
    dtype = values.dtype
    # float64 so that the ratio of two small variances is not dominated by rounding.
    values, returns = values.double(), returns.double()

    def variance(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, valid)).square(), valid)

    returns_variance = variance(returns)
    ratio = variance(returns - values) / returns_variance
    nan = torch.full_like(ratio, float("nan"))
    return torch.where(returns_variance > 0, 1.0 - ratio, nan).to(dtype)
