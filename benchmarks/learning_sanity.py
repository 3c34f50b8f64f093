"""Learning-sanity experiments (issue 2): PPO / GRPO on the colour-bandit task with the tiny VLA,
a line per 10 iterations (sampled success, and its two parts), then greedy success on 256 fresh
observations. Seeded: a rerun on the same machine prints the same numbers.

    python benchmarks/learning_sanity.py --decoding parallel --lr 1e-3 --epochs 4 --iterations 80
"""

from __future__ import annotations

import argparse
import time

import torch

from vla_rl.algorithms import compute_gae, compute_grpo_advantages
from vla_rl.models import ActionTokenizer, PromptTokenizer, tiny_config
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.models.tiny import build_tiny_policy, build_tiny_tokenizer
from vla_rl.tasks import ColourBandit
from vla_rl.training.demo import evaluate_greedy
from vla_rl.training.update import PPOUpdateConfig, TrainBatch, make_optimizer, ppo_update


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algorithm", choices=["ppo", "grpo"], default="ppo")
    p.add_argument("--decoding", choices=["autoregressive", "parallel"], default="parallel")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--iterations", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    policy = build_tiny_policy(tiny_config(decoding=a.decoding), a.seed)
    apply_lora(policy, LoRASettings(rank=a.rank, alpha=2 * a.rank))
    optimizer = make_optimizer(policy, a.lr, 1e-2)
    prompts_of = PromptTokenizer(build_tiny_tokenizer())
    tokenizer, task = ActionTokenizer(), ColourBandit(seed=a.seed)
    grpo = a.algorithm == "grpo"
    cfg = PPOUpdateConfig(
        update_epochs=a.epochs,
        num_mini_batches=a.mini_batches,
        micro_batch_size=32,
        value_coef=0.0 if grpo else 0.5,
        normalize_advantages=not grpo,
        value_clip=None,
    )
    gen = torch.Generator().manual_seed(a.seed)
    t0, window = time.monotonic(), []
    for it in range(a.iterations):
        obs = task.sample(a.batch, a.group if grpo else 1)
        prompts = prompts_of(obs.instructions)
        out = policy.generate(policy.pixel_values(obs.images), prompts, generator=gen)
        actions = tokenizer.decode(out.action_tokens.view(a.batch, 1, 7))
        reward, success = task.reward(obs, actions), task.success(obs, actions)
        if grpo:
            adv, returns = compute_grpo_advantages(reward, torch.arange(a.batch) // a.group), reward
        else:  # one-step episodes: GAE is r - V(s)
            done = torch.ones(1, a.batch, dtype=torch.bool)
            adv, returns = compute_gae(
                reward[None], out.values[None], torch.zeros(1, a.batch), done, ~done, 0.99, 0.95
            )
            adv, returns = adv[0], returns[0]
        batch = TrainBatch(
            obs.images, prompts, out.action_tokens, out.logprobs, adv, returns, out.values
        )
        metrics = ppo_update(policy, optimizer, batch, cfg, gen)
        reach, grip = task._parts(obs, actions)
        window.append(
            (float(success.mean()), float(reach.float().mean()), float(grip.float().mean()))
        )
        if (it + 1) % 10 == 0:
            s, r, g = (sum(x[i] for x in window) / len(window) for i in range(3))
            print(
                f"iter {it + 1:3d}  success {s:.2f}  reach {r:.2f}  gripper {g:.2f}  "
                f"approx_kl {metrics['actor/approx_kl']:.3f}  {time.monotonic() - t0:.0f}s",
                flush=True,
            )
            window = []
    print(f"greedy success {evaluate_greedy(policy, prompts_of):.2f} on 256 fresh observations")


if __name__ == "__main__":
    main()
