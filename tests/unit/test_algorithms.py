"""Checks vla_rl.algorithms against plain Python loops and hand-computed examples."""

import math

import pytest
import torch

from vla_rl.algorithms import (
    approx_kl,
    broadcast_episode_advantages,
    compute_gae,
    compute_grpo_advantages,
    entropy_bonus,
    explained_variance,
    filter_groups_by_success,
    get_advantage_estimator,
    get_policy_loss,
    masked_mean,
    next_values_from_segment,
    ppo_policy_loss,
    register_advantage_estimator,
    value_loss,
)

SEEDS = [0, 1, 2]
SHAPES = [(1, 1), (5, 3), (17, 8)]


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=tol,
    )


def random_segment(seed, T, B):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, B, generator=g)
    values = torch.randn(T, B, generator=g)
    final_values = torch.randn(T, B, generator=g)
    last_value = torch.randn(B, generator=g)
    ends = torch.rand(T, B, generator=g)
    # Terminations and truncations mixed, never both on one step.
    terminated = ends < 0.15
    truncated = (ends >= 0.15) & (ends < 0.3)
    mask = torch.rand(T, B, generator=g) > 0.2
    return rewards, values, final_values, last_value, terminated, truncated, mask


# ---------------------------------------------------------------- reference loops


def reference_next_values(values, final_values, last_value, truncated):
    T, B = len(values), len(values[0])
    out = [[0.0] * B for _ in range(T)]
    for b in range(B):
        for t in range(T):
            if truncated[t][b]:
                out[t][b] = final_values[t][b]
            elif t == T - 1:
                out[t][b] = last_value[b]
            else:
                out[t][b] = values[t + 1][b]
    return out


def reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam, mask=None):
    T, B = len(rewards), len(rewards[0])
    adv = [[0.0] * B for _ in range(T)]
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            if mask is not None and not mask[t][b]:
                running = 0.0
                continue
            bootstrap = 0.0 if terminated[t][b] else next_values[t][b]
            delta = rewards[t][b] + gamma * bootstrap - values[t][b]
            if terminated[t][b] or truncated[t][b]:
                running = 0.0
            running = delta + gamma * lam * running
            adv[t][b] = running
    returns = [[adv[t][b] + values[t][b] for b in range(B)] for t in range(T)]
    return adv, returns


def reference_grpo(scores, group_ids, eps):
    out = []
    for i, gid in enumerate(group_ids):
        group = [s for s, g in zip(scores, group_ids, strict=True) if g == gid]
        mean = sum(group) / len(group)
        if len(group) == 1:
            std = 0.0
        else:
            std = math.sqrt(sum((s - mean) ** 2 for s in group) / (len(group) - 1))
        out.append((scores[i] - mean) / (std + eps))
    return out


def reference_ppo(logprobs, old_logprobs, advantages, low, high, c, mask):
    """Per-entry loops over flattened, already-broadcast lists."""
    losses, clipped, duals, kls, ratios, clamped = [], [], [], [], [], []
    for lp, old, a, m in zip(logprobs, old_logprobs, advantages, mask, strict=True):
        if not m:
            continue
        r = math.exp(lp - old)
        rc = min(max(r, 1 - low), 1 + high)
        loss = max(-a * r, -a * rc)
        clipped.append(-a * rc > -a * r)
        dual = False
        if c is not None and a < 0 and loss > -c * a:
            loss, dual = -c * a, True
        losses.append(loss)
        duals.append(dual)
        kls.append((r - 1) - math.log(r))
        ratios.append(r)
        clamped.append(rc)
    n = len(losses)
    return sum(losses) / n, {
        "clip_fraction": sum(clipped) / n,
        "dual_clip_fraction": sum(duals) / n,
        "approx_kl": sum(kls) / n,
        "ratio_mean": sum(ratios) / n,
        "clipped_ratio": sum(clamped) / n,
    }


def reference_value_loss(values, old_values, returns, clip, delta, mask):
    def err(x):
        if delta is None or abs(x) <= delta:
            return 0.5 * x * x
        return delta * (abs(x) - 0.5 * delta)

    losses, clip_hits = [], []
    for v, ov, ret, m in zip(values, old_values, returns, mask, strict=True):
        if not m:
            continue
        unclipped = err(v - ret)
        if clip is None:
            losses.append(unclipped)
            clip_hits.append(False)
            continue
        vc = ov + min(max(v - ov, -clip), clip)
        clipped = err(vc - ret)
        losses.append(max(unclipped, clipped))
        clip_hits.append(clipped > unclipped)
    return sum(losses) / len(losses), sum(clip_hits) / len(clip_hits)


# ---------------------------------------------------------------- GAE


def test_gae_hand_example():
    # gamma = 0.9, lambda = 0.5, so gamma * lambda = 0.45.
    # Column 0: truncated after step 1 (final V = 3.0), terminated after step 3.
    #   next_values = [V1, final, V3, last] = [1.0, 3.0, 2.0, 10.0]
    #   deltas: 1 + .9*1 - .5 = 1.4; 0 + .9*3 - 1 = 1.7; 2 + .9*2 - 1.5 = 2.3; 1 + 0 - 2 = -1.0
    #   A3 = -1.0; A2 = 2.3 + .45*(-1) = 1.85; A1 = 1.7 (truncation cuts); A0 = 1.4 + .45*1.7 = 2.165
    #   returns = A + V = [2.665, 2.7, 3.35, 1.0]
    # Column 1: no episode end, steps 2 and 3 masked out; every valid delta = 1 + .9*1 - 1 = 0.9
    #   A1 = 0.9 (nothing flows back from the masked step 2); A0 = 0.9 + .45*0.9 = 1.305
    #   returns = [2.305, 1.9, 1.0, 1.0] (masked steps: returns = values)
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 5.0], [1.0, 5.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 1.0], [1.5, 1.0], [2.0, 1.0]])
    final_values = torch.tensor([[9.0, 9.0], [3.0, 9.0], [9.0, 9.0], [9.0, 9.0]])
    last_value = torch.tensor([10.0, 1.0])
    terminated = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)

    next_values = next_values_from_segment(values, final_values, last_value, truncated)
    close(next_values[:, 0], [1.0, 3.0, 2.0, 10.0])
    adv, ret = compute_gae(rewards, values, next_values, terminated, truncated, 0.9, 0.5, mask)
    close(adv, [[2.165, 1.305], [1.7, 0.9], [1.85, 0.0], [-1.0, 0.0]])
    close(ret, [[2.665, 2.305], [2.7, 1.9], [3.35, 1.0], [1.0, 1.0]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_mask", [False, True])
def test_gae_matches_loop(seed, shape, use_mask):
    rewards, values, final_values, last_value, terminated, truncated, mask = random_segment(
        seed, *shape
    )
    mask = mask if use_mask else None
    next_values = next_values_from_segment(values, final_values, last_value, truncated)
    close(
        next_values,
        reference_next_values(
            values.tolist(), final_values.tolist(), last_value.tolist(), truncated.tolist()
        ),
    )
    gamma, lam = 0.97, 0.9
    adv, ret = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam, mask)
    ref_adv, ref_ret = reference_gae(
        rewards.tolist(),
        values.tolist(),
        next_values.tolist(),
        terminated.tolist(),
        truncated.tolist(),
        gamma,
        lam,
        None if mask is None else mask.tolist(),
    )
    close(adv, ref_adv)
    close(ret, ref_ret)


def test_gae_lambda_one_is_monte_carlo_and_ignores_padding_nan():
    # With lambda = 1 and a terminal last step, A_0 + V_0 is the plain discounted return.
    rewards = torch.tensor([[1.0], [2.0], [3.0], [float("nan")]])
    values = torch.tensor([[0.3], [-0.2], [0.7], [float("nan")]])
    next_values = torch.tensor([[-0.2], [0.7], [5.0], [float("nan")]])
    terminated = torch.tensor([[False], [False], [True], [False]])
    truncated = torch.zeros_like(terminated)
    mask = torch.tensor([[True], [True], [True], [False]])
    adv, ret = compute_gae(rewards, values, next_values, terminated, truncated, 0.5, 1.0, mask)
    close(ret[0, 0], 1.0 + 0.5 * 2.0 + 0.25 * 3.0)
    assert torch.isfinite(adv).all()


def test_gae_does_not_track_gradients():
    values = torch.randn(3, 2, requires_grad=True)
    zeros = torch.zeros(3, 2, dtype=torch.bool)
    adv, ret = compute_gae(torch.ones(3, 2), values, values * 2, zeros, zeros, 0.9, 0.9)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_rejects_bad_arguments():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="next_values"):
        compute_gae(x, x, torch.zeros(3, 3), x.bool(), x.bool(), 0.9, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(x, x, x, x.bool(), x.bool(), 1.5, 0.9)
    with pytest.raises(ValueError, match="last_value"):
        next_values_from_segment(x, x, torch.zeros(3), x.bool())


# ---------------------------------------------------------------- GRPO


def test_grpo_hand_example():
    # Group 7: scores [1, 0, 1, 1], mean 0.75, squared deviations sum to 3*0.0625 + 0.5625 = 0.75,
    #   unbiased var 0.75 / 3 = 0.25, std 0.5 -> advantages [0.5, -1.5, 0.5, 0.5].
    # Group 3: [0, 0] has no spread -> 0. Group 9 has one member -> 0.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 5.0])
    group_ids = torch.tensor([7, 7, 3, 7, 7, 3, 9])
    adv = compute_grpo_advantages(scores, group_ids)
    close(adv, [0.5, -1.5, 0.0, 0.5, 0.5, 0.0, 0.0], tol=1e-5)
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    scores = torch.randn(n, generator=g)
    group_ids = torch.randint(0, 9, (n,), generator=g)
    adv = compute_grpo_advantages(scores, group_ids, eps=1e-6)
    close(adv, reference_grpo(scores.tolist(), group_ids.tolist(), 1e-6), tol=1e-4)
    # Per-episode advantages to per-step ones.
    valid = torch.rand(6, n, generator=g) > 0.3
    steps = broadcast_episode_advantages(adv, valid)
    expected = [[adv[i].item() if valid[t, i] else 0.0 for i in range(n)] for t in range(6)]
    close(steps, expected)


@pytest.mark.parametrize("lower, upper", [(0.1, 0.9), (0.0, 0.5), (0.6, 1.0), (0.0, 1.0)])
def test_filter_groups_by_success_rate(lower, upper):
    success = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 1, 0])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 5])
    keep = filter_groups_by_success(success, group_ids, lower, upper)
    expected = []
    for gid in group_ids.tolist():
        members = [s for s, g in zip(success.tolist(), group_ids.tolist(), strict=True) if g == gid]
        expected.append(lower <= sum(members) / len(members) <= upper)
    assert keep.tolist() == expected
    if (lower, upper) == (0.1, 0.9):  # the default bounds drop the uniform groups
        assert keep.tolist() == [False] * 2 + [True] * 2 + [False] * 3 + [True] * 5


def test_advantage_registry():
    assert get_advantage_estimator("gae") is compute_gae
    assert get_advantage_estimator("grpo") is compute_grpo_advantages
    with pytest.raises(ValueError, match="gae.*grpo"):
        get_advantage_estimator("vtrace")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("gae")(lambda: None)


# ---------------------------------------------------------------- PPO policy loss


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("adv_shape", ["per_entry", "per_row", "flat"])
@pytest.mark.parametrize("clip", [(0.2, None, None), (0.2, 0.28, None), (0.1, 0.3, 3.0)])
def test_ppo_policy_loss_matches_loop(seed, adv_shape, clip):
    low, high, c = clip
    g = torch.Generator().manual_seed(seed)
    n, k = 12, 7
    shape = (n,) if adv_shape == "flat" else (n, k)
    old = torch.randn(shape, generator=g) - 2.0
    # Log-ratios spread over about [-1, 1] so clipping and the dual clip both occur.
    logprobs = (old + 0.5 * torch.randn(shape, generator=g)).requires_grad_()
    adv = torch.randn((n, 1) if adv_shape == "per_row" else shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25

    loss, metrics = ppo_policy_loss(logprobs, old, adv, low, high, c, mask)
    high = low if high is None else high
    ref_loss, ref_metrics = reference_ppo(
        logprobs.detach().flatten().tolist(),
        old.flatten().tolist(),
        adv.expand(shape).flatten().tolist(),
        low,
        high,
        c,
        mask.flatten().tolist(),
    )
    close(loss, ref_loss)
    for name, value in ref_metrics.items():
        close(metrics[name], value)
    assert 0.0 < ref_metrics["clip_fraction"] < 1.0
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[~mask] == 0).all()


def test_ppo_asymmetric_and_dual_clip_by_hand():
    # low = 0.2, high = 0.28, c = 3:
    #   A=+1, r=1.5: max(-1.5, -1.28) = -1.28 (upper clip)   A=-1, r=0.5: max(0.5, 0.8) = 0.8 (lower)
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5 (no clip)        A=-1, r=5: max(5, 1.2) = 5 -> dual 3
    ratios = torch.tensor([1.5, 0.5, 0.5, 5.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    logprobs = ratios.log().requires_grad_()
    old = torch.zeros(4)
    loss, metrics = ppo_policy_loss(logprobs, old, adv, 0.2, 0.28, 3.0)
    close(loss, (-1.28 + 0.8 - 0.5 + 3.0) / 4)
    close(metrics["clip_fraction"], 2 / 4)
    close(metrics["dual_clip_fraction"], 1 / 4)
    close(metrics["clipped_ratio"], (1.28 + 0.8 + 0.8 + 1.28) / 4)
    loss.backward()
    # Only the unclipped entry carries gradient: d(-A r)/d log r = -A r = -0.5, divided by 4.
    close(logprobs.grad, [0.0, 0.0, -0.125, 0.0])

    no_dual, _ = ppo_policy_loss(ratios.log(), old, adv, 0.2, 0.28, None)
    close(no_dual, (-1.28 + 0.8 - 0.5 + 5.0) / 4)
    symmetric, _ = ppo_policy_loss(ratios.log(), old, adv, 0.2)
    close(symmetric, (-1.2 + 0.8 - 0.5 + 5.0) / 4)


def test_ppo_policy_loss_rejects_bad_arguments():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="dual_clip_c"):
        ppo_policy_loss(x, x, x, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        ppo_policy_loss(x, x, x, clip_ratio_low=0.0)
    with pytest.raises(ValueError, match="clip_ratio_high"):
        ppo_policy_loss(x, x, x, clip_ratio_high=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="mask"):
        ppo_policy_loss(x, x, x, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="old_logprobs"):
        ppo_policy_loss(x, torch.zeros(4, 2), x)


def test_policy_loss_registry():
    assert get_policy_loss("ppo") is ppo_policy_loss
    with pytest.raises(ValueError, match="ppo"):
        get_policy_loss("reinforce++")


# ---------------------------------------------------------------- value loss and diagnostics


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("huber_delta", [None, 0.5])
def test_value_loss_matches_loop(seed, clip, huber_delta):
    g = torch.Generator().manual_seed(seed)
    n = 50
    old_values = torch.randn(n, generator=g)
    values = (old_values + 0.4 * torch.randn(n, generator=g)).requires_grad_()
    returns = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    loss, metrics = value_loss(values, old_values, returns, clip, huber_delta, mask)
    ref_loss, ref_clip = reference_value_loss(
        values.tolist(), old_values.tolist(), returns.tolist(), clip, huber_delta, mask.tolist()
    )
    close(loss, ref_loss)
    close(metrics["value_clip_ratio"], ref_clip)
    if clip is not None:
        assert ref_clip > 0.0
    loss.backward()
    assert (values.grad[~mask] == 0).all()


def test_value_loss_by_hand():
    # old 0, new 1, return 2, clip 0.2: unclipped 0.5*(1-2)^2 = 0.5, clipped 0.5*(0.2-2)^2 = 1.62.
    # old 0, new 1, return 0, clip 0.2: unclipped 0.5, clipped 0.5*0.04 = 0.02 -> 0.5.
    loss, metrics = value_loss(
        torch.tensor([1.0, 1.0]), torch.zeros(2), torch.tensor([2.0, 0.0]), clip_range=0.2
    )
    close(loss, (1.62 + 0.5) / 2)
    close(metrics["value_clip_ratio"], 0.5)
    with pytest.raises(ValueError, match="huber_delta"):
        value_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), huber_delta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        value_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimators_entropy_and_masked_mean_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(6, 5, generator=g)
    new = old + 0.3 * torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    pairs = [
        (n, o)
        for n, o, m in zip(
            new.flatten().tolist(), old.flatten().tolist(), mask.flatten().tolist(), strict=True
        )
        if m
    ]
    k1 = sum(o - n for n, o in pairs) / len(pairs)
    k2 = sum(0.5 * (n - o) ** 2 for n, o in pairs) / len(pairs)
    k3 = sum(math.exp(n - o) - 1 - (n - o) for n, o in pairs) / len(pairs)
    close(approx_kl(new, old, mask, "k1"), k1)
    close(approx_kl(new, old, mask, "k2"), k2)
    close(approx_kl(new, old, mask, "k3"), k3)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        approx_kl(new, old, mask, "k4")

    entropy = torch.rand(6, 5, generator=g)
    kept = [
        e for e, m in zip(entropy.flatten().tolist(), mask.flatten().tolist(), strict=True) if m
    ]
    close(entropy_bonus(entropy, mask), sum(kept) / len(kept))
    close(entropy_bonus(entropy), entropy.mean())


def test_masked_mean_edge_cases():
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    close(masked_mean(x, torch.tensor([True, False])), 2.0)  # mask broadcast over rows
    close(masked_mean(x, torch.zeros(2, 2, dtype=torch.bool)), 0.0)
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.zeros(2), torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("seed", SEEDS)
def test_explained_variance_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    returns = torch.randn(8, 4, generator=g)
    values = returns + 0.5 * torch.randn(8, 4, generator=g)
    mask = torch.rand(8, 4, generator=g) > 0.3
    rs = [r for r, m in zip(returns.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]
    vs = [v for v, m in zip(values.flatten().tolist(), mask.flatten().tolist(), strict=True) if m]

    def var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    expected = 1 - var([r - v for r, v in zip(rs, vs, strict=True)]) / var(rs)
    close(explained_variance(values, returns, mask), expected)
    close(explained_variance(returns, returns), 1.0)
    assert torch.isnan(explained_variance(values, torch.full((8, 4), 2.0)))
