"""The policy update shared by the learner service and the CPU demo: PPO epochs over micro-batches."""

from .update import PPOUpdateConfig, TrainBatch, ppo_update

__all__ = ["PPOUpdateConfig", "TrainBatch", "ppo_update"]
