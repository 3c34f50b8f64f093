"""The CPU demo of the model core: PPO or GRPO on the colour-bandit task with a tiny VLA.

No simulator, no services: it shows the whole update path (sampling -> rewards -> advantages ->
PPO epochs with LoRA and the value head) in one process, with a line per iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vla_rl.algorithms import compute_gae, compute_grpo_advantages
from vla_rl.models import ActionTokenizer, OpenVLAPolicy, PromptTokenizer, tiny_config
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.models.tiny import build_tiny_policy, build_tiny_tokenizer
from vla_rl.tasks import ColourBandit

from .update import PPOUpdateConfig, TrainBatch, make_optimizer, ppo_update


@dataclass
class DemoConfig:
    """Settings of the colour-bandit demo."""

    algorithm: str = "ppo"
    """'ppo' (GAE with a value head) or 'grpo' (group-relative advantages, no critic)."""
    decoding: str = "autoregressive"
    """'autoregressive' (OpenVLA) or 'parallel' (OpenVLA-OFT)."""
    iterations: int = 60
    """Rollout + update iterations."""
    batch_size: int = 32
    """Decisions per iteration."""
    group_size: int = 4
    """GRPO: rollouts per distinct start."""
    lr: float = 1e-3
    """AdamW learning rate for the LoRA adapters (3e-3 is unstable on this task)."""
    update_epochs: int = 4
    """PPO epochs over each iteration's batch."""
    action_chunk: int = 1
    """OFT: actions per chunk (the task scores the first)."""
    value_lr: float = 1e-2
    """AdamW learning rate for the value head."""
    lora_rank: int = 8
    """LoRA rank."""
    seed: int = 0
    """Seed for the model, the task and sampling."""
    target_success: float | None = None
    """Stop early once the mean success of the last 3 iterations reaches this."""
    time_limit_s: float | None = None
    """Stop once this much wall time has passed."""


@torch.no_grad()
def evaluate_greedy(
    policy: OpenVLAPolicy, prompts_of: PromptTokenizer, n: int = 256, seed: int = 12345
) -> float:
    """Success rate of greedy (argmax) actions on n fresh observations."""
    task = ColourBandit(seed=seed)
    chunk = policy.config.action_chunk
    hits = 0.0
    for start in range(0, n, 64):
        obs = task.sample(min(64, n - start))
        out = policy.generate(
            policy.pixel_values(obs.images), prompts_of(obs.instructions), greedy=True
        )
        actions = ActionTokenizer().decode(out.action_tokens.view(len(obs.instructions), chunk, 7))
        hits += float(task.success(obs, actions).sum())
    return hits / n


@dataclass
class DemoResult:
    history: list[dict[str, float]]
    policy: OpenVLAPolicy
    prompts_of: PromptTokenizer


def run_demo(cfg: DemoConfig, log=print) -> DemoResult:
    torch.manual_seed(cfg.seed)
    chunk = cfg.action_chunk if cfg.decoding == "parallel" else 1
    policy = build_tiny_policy(tiny_config(decoding=cfg.decoding, action_chunk=chunk), cfg.seed)
    apply_lora(policy, LoRASettings(rank=cfg.lora_rank, alpha=2 * cfg.lora_rank))
    optimizer = make_optimizer(policy, cfg.lr, cfg.value_lr)
    prompts_of = PromptTokenizer(build_tiny_tokenizer())
    action_tok = ActionTokenizer()
    task = ColourBandit(seed=cfg.seed)
    grpo = cfg.algorithm == "grpo"
    update_cfg = PPOUpdateConfig(
        update_epochs=cfg.update_epochs,
        num_mini_batches=2,
        micro_batch_size=32,
        value_coef=0.0 if grpo else 0.5,
        normalize_advantages=not grpo,
        value_clip=None,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start = time.monotonic()
    for it in range(cfg.iterations):
        t0 = time.monotonic()
        obs = task.sample(cfg.batch_size, cfg.group_size if grpo else 1)
        prompts = prompts_of(obs.instructions)
        out = policy.generate(policy.pixel_values(obs.images), prompts, generator=gen)
        actions = action_tok.decode(out.action_tokens.view(cfg.batch_size, chunk, 7))
        reward = task.reward(obs, actions)
        success = task.success(obs, actions)
        if grpo:
            group_ids = torch.arange(cfg.batch_size) // cfg.group_size
            adv = compute_grpo_advantages(reward, group_ids)
            returns = reward
        else:
            # One-step episodes: every step terminates, so GAE reduces to r - V(s).
            one = torch.ones(1, cfg.batch_size, dtype=torch.bool)
            adv, returns = compute_gae(
                reward[None],
                out.values[None],
                torch.zeros(1, cfg.batch_size),
                one,
                ~one,
                0.99,
                0.95,
            )
            adv, returns = adv[0], returns[0]
        batch = TrainBatch(
            obs.images, prompts, out.action_tokens, out.logprobs, adv, returns, out.values
        )
        metrics = ppo_update(policy, optimizer, batch, update_cfg, gen)
        metrics["env/success_once"] = float(success.mean())
        metrics["env/reward"] = float(reward.mean())
        metrics["time/iteration_s"] = time.monotonic() - t0
        history.append(metrics)
        log(
            f"iter {it + 1:3d}/{cfg.iterations}  success {metrics['env/success_once']:.2f}  "
            f"policy_loss {metrics['actor/policy_loss']:+.4f}  "
            f"approx_kl {metrics['actor/approx_kl']:.4f}  "
            + (f"value_loss {metrics['critic/value_loss']:.4f}  " if not grpo else "")
            + f"{metrics['time/iteration_s']:.2f}s"
        )
        recent = [h["env/success_once"] for h in history[-3:]]
        if (
            cfg.target_success is not None
            and len(recent) == 3
            and min(recent) >= cfg.target_success
        ):
            break
        if cfg.time_limit_s is not None and time.monotonic() - start > cfg.time_limit_s:
            break
    return DemoResult(history, policy, prompts_of)
