"""How much of the LoRA's gradient is the critic's? PPO's loss is policy loss + value_coef x
value loss, and the value head reads the LLM's hidden state, so both terms train the same LoRA
weights. When returns are large (a sparse reward of 1 per step on target over a 50-step
episode gives returns up to ~40) and the value head starts at 0, the value loss is tens and its
gradient swamps the policy's (standardised advantages give a policy loss of order 0.01): the
global norm clip then shrinks both, and the LoRA follows the critic. issue 9's H200 runs logged
value_loss 10-50 and grad_norm 15-37 (clip 10).

    python benchmarks/critic_share.py [--returns 1 5 40] [--value-coef 1.0 0.1]

For each return scale and value_coef: the norms of the LoRA gradient from the policy loss and
from value_coef x the value loss on one batch of a tiny random OpenVLA-OFT policy (the first
update: log-prob ratio 1) after the value head alone was fitted to the returns for
--head-steps Adam steps at the learner's value_lr (its last layer starts at zero, so at the very
first step no critic gradient reaches the LoRA at all), and the critic's share
||g_v|| / (||g_pg|| + ||g_v||). The numbers are for the tiny model; the ratio's growth with the
return scale (the value loss is quadratic in it) is what carries over.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vla_rl.algorithms.losses import get_policy_loss, value_loss  # noqa: E402
from vla_rl.models import PromptTokenizer, tiny_config  # noqa: E402
from vla_rl.models.lora import LoRASettings, apply_lora  # noqa: E402
from vla_rl.models.tiny import build_tiny_policy, build_tiny_tokenizer  # noqa: E402


def lora_grad_norm(policy, loss: torch.Tensor) -> float:
    params = [p for n, p in policy.named_parameters() if p.requires_grad and "lora_" in n]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def measure(
    batch: int, returns_scale: float, value_coef: float, seed: int, head_steps: int
) -> dict:
    torch.manual_seed(seed)
    policy = apply_lora(
        build_tiny_policy(tiny_config(decoding="parallel", action_chunk=5)), LoRASettings(rank=8)
    )
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, generator=g)
    prompts = PromptTokenizer(build_tiny_tokenizer())(["push the cube to the goal"] * batch)
    pv = policy.pixel_values(images)
    with torch.no_grad():
        out = policy.generate(pv, prompts, generator=g)
    returns = returns_scale * torch.rand(batch, generator=g)
    head = [p for n, p in policy.named_parameters() if n.startswith("value_head.")]
    optimizer = torch.optim.Adam(head, lr=3e-3)  # the learner's default actor.optim.value_lr
    for _ in range(head_steps):
        _, _, values = policy.evaluate_actions(pv, prompts, out.action_tokens)
        optimizer.zero_grad()
        value_loss(values, values.detach(), returns, None)[0].backward()
        optimizer.step()
    logp, _, values = policy.evaluate_actions(pv, prompts, out.action_tokens)
    adv = torch.randn(batch, generator=g)
    adv = ((adv - adv.mean()) / adv.std()).view(-1, 1).expand_as(logp)
    pg, _ = get_policy_loss("ppo")(logp, logp.detach(), adv, 0.2, 0.2, None)
    v, _ = value_loss(values, values.detach(), returns, None)
    g_pg = lora_grad_norm(policy, pg)
    g_v = lora_grad_norm(policy, value_coef * v)
    return {"returns_scale": returns_scale, "value_coef": value_coef, "policy_loss": float(pg),
            "value_loss": float(v), "lora_grad_policy": g_pg, "lora_grad_critic": g_v,
            "critic_share": g_v / (g_pg + g_v)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--returns", type=float, nargs="+", default=[1.0, 5.0, 40.0])
    p.add_argument("--value-coef", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-steps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = [
        measure(args.batch, r, c, args.seed, args.head_steps)
        for r in args.returns
        for c in args.value_coef
    ]
    print("| returns up to | value_coef | value loss | LoRA grad: policy | critic | critic share |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['returns_scale']:g} | {r['value_coef']:g} | {r['value_loss']:.3g} | "
              f"{r['lora_grad_policy']:.3g} | {r['lora_grad_critic']:.3g} | "
              f"{100 * r['critic_share']:.0f}% |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
