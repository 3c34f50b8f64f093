"""RL math for the learner: advantage estimators and PPO losses as short pure torch functions."""

from vla_rl.algorithms.advantages import (
    broadcast_episode_advantages,
    compute_gae,
    compute_grpo_advantages,
    filter_uniform_groups,
    get_advantage_estimator,
    next_values_from_segment,
    register_advantage_estimator,
)
from vla_rl.algorithms.losses import (
    approx_kl,
    entropy_bonus,
    explained_variance,
    get_policy_loss,
    masked_mean,
    ppo_policy_loss,
    register_policy_loss,
    value_loss,
)

__all__ = [
    "approx_kl",
    "broadcast_episode_advantages",
    "compute_gae",
    "compute_grpo_advantages",
    "entropy_bonus",
    "explained_variance",
    "filter_uniform_groups",
    "get_advantage_estimator",
    "get_policy_loss",
    "masked_mean",
    "next_values_from_segment",
    "ppo_policy_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "value_loss",
]
