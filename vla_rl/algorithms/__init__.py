"""RL math for the learner: advantage estimators and PPO losses as short pure torch functions."""

from vla_rl.algorithms.advantages import (
    broadcast_episode_advantages,
    compute_gae,
    compute_grpo_advantages,
    episode_loss_weights,
    filter_groups_by_success,
    get_advantage_estimator,
    next_values_from_segment,
    normalize_advantages,
    register_advantage_estimator,
)
from vla_rl.algorithms.losses import (
    approx_kl,
    behaviour_importance_weights,
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
    "behaviour_importance_weights",
    "broadcast_episode_advantages",
    "compute_gae",
    "compute_grpo_advantages",
    "entropy_bonus",
    "episode_loss_weights",
    "explained_variance",
    "filter_groups_by_success",
    "get_advantage_estimator",
    "get_policy_loss",
    "masked_mean",
    "next_values_from_segment",
    "normalize_advantages",
    "ppo_policy_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "value_loss",
]
