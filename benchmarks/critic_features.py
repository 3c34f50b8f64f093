"""Can the value head predict returns from what it reads? (issue 9: PPO's critic never learned).

In a 70-iteration PPO run on the lent GPU, `train/critic/explained_variance` stayed near 0 (0.01
-> -0.07). The value head reads the final hidden state of the last prompt token. In an
OpenVLA-OFT model nothing trains that state: behaviour cloning puts its loss on the action slots
after it. This script fits the value head offline, on a fixed data set, from three inputs:

- `last_prompt_token`: what the value head reads today;
- `action_slots_mean`: the mean of the OFT action slots' final hidden states (trained by BC);
- `random_model_last_prompt`: the last prompt token of an untrained model of the same size (a
  floor: random features of the image).

Data: demonstration episodes (`vla-rl collect-demos`). Each decision's target is its discounted
return-to-go of the recorded rewards (gamma 0.99 per env step, as the learner's default). The
episodes are split by episode: the first `--train-episodes` train the head, the rest measure its
explained variance (1 is perfect, 0 no better than the mean). The head is the learner's
(`ValueHead`, hidden 512/128, zero last layer), trained with AdamW at the learner's `value_lr`.

    python benchmarks/critic_features.py --demos /tmp/cf/demos --checkpoint /tmp/cf/bc \\
        --train-episodes 45 --out benchmarks/results/critic_features/cpu_tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vla_rl.algorithms import explained_variance  # noqa: E402
from vla_rl.demos import load_demos  # noqa: E402
from vla_rl.models import PromptTokenizer  # noqa: E402
from vla_rl.models.checkpoint import load_policy, load_tokenizer  # noqa: E402
from vla_rl.models.openvla import ValueHead  # noqa: E402
from vla_rl.models.tiny import write_tiny_checkpoint  # noqa: E402


def decisions(demos: str, chunk: int, gamma: float) -> list[dict]:
    """Per episode: the images and instruction at each decision (every `chunk` steps) and the
    discounted return-to-go of the rewards from that step on."""
    _, episodes = load_demos(demos)
    out = []
    for ep in episodes:
        rewards = np.asarray(ep["rewards"], dtype=np.float64)
        to_go = np.zeros(len(rewards) + 1)
        for t in range(len(rewards) - 1, -1, -1):
            to_go[t] = rewards[t] + gamma * to_go[t + 1]
        starts = list(range(0, len(ep["images"]), chunk))
        out.append(
            {
                "images": ep["images"][starts],
                "instruction": ep["instruction"],
                "returns": to_go[starts].astype(np.float32),
            }
        )
    return out


@torch.no_grad()
def features(policy, prompts_of, episodes: list[dict], batch: int = 32) -> dict[str, torch.Tensor]:
    """The final hidden state of the last prompt token and the mean of the action slots', per
    decision, captured from the policy's own forward (OFT: one pass)."""
    captured: dict[str, torch.Tensor] = {}
    logits_of = policy._action_logits

    def read_slots(hidden):
        captured["slots"] = hidden.float().mean(1)
        return logits_of(hidden)

    hook = policy.value_head.register_forward_hook(
        lambda module, args, out: captured.__setitem__("last", args[0].float())
    )
    policy._action_logits = read_slots
    rows: dict[str, list[torch.Tensor]] = {"last_prompt_token": [], "action_slots_mean": []}
    try:
        for ep in episodes:
            for s in range(0, len(ep["images"]), batch):
                images = torch.from_numpy(ep["images"][s : s + batch])
                texts = [ep["instruction"]] * len(images)
                policy.forward_actions(policy.pixel_values(images), prompts_of(texts))
                rows["last_prompt_token"].append(captured["last"])
                rows["action_slots_mean"].append(captured["slots"])
    finally:
        hook.remove()
        del policy._action_logits  # the class's method again
    return {k: torch.cat(v) for k, v in rows.items()}


def fit(
    x_train, y_train, x_test, y_test, steps: int, lr: float, seed: int, standardize: bool = False
) -> dict[str, float]:
    """The learner's value head on these inputs: AdamW on the MSE, full batch. `standardize`:
    each feature shifted and scaled by its training mean and std first (the learner does not)."""
    torch.manual_seed(seed)
    if standardize:
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = ValueHead(x_train.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = (head(x_train) - y_train).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ev_train = float(explained_variance(head(x_train), y_train))
        ev_test = float(explained_variance(head(x_test), y_test))
    # The scale of what the head reads, per feature across decisions (a LayerNorm-free MLP
    # learns slowly from inputs of very small spread).
    return {"ev_train": ev_train, "ev_test": ev_test,
            "input_std_per_feature": float(x_train.std(0).mean())}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demos", required=True, help="a collect-demos directory")
    p.add_argument("--checkpoint", required=True, help="the BC-trained OFT checkpoint")
    p.add_argument("--train-episodes", type=int, required=True)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--steps", type=int, default=1000, help="AdamW steps of the head")
    p.add_argument("--lr", type=float, default=3e-3, help="the learner's actor.optim.value_lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    trained = load_policy(args.checkpoint).eval()
    chunk = trained.config.action_chunk
    if not trained.parallel:
        raise SystemExit("an OpenVLA-OFT checkpoint is needed (its action slots)")
    prompts_of = PromptTokenizer(load_tokenizer(args.checkpoint))
    episodes = decisions(args.demos, chunk, args.gamma)
    if not 0 < args.train_episodes < len(episodes):
        raise SystemExit(f"--train-episodes must be between 1 and {len(episodes) - 1}")
    split = sum(len(ep["returns"]) for ep in episodes[: args.train_episodes])
    y = torch.from_numpy(np.concatenate([ep["returns"] for ep in episodes]))
    inputs = features(trained, prompts_of, episodes)
    random_dir = Path(args.checkpoint).with_name(Path(args.checkpoint).name + "_random_twin")
    if not (random_dir / "config.json").exists():
        write_tiny_checkpoint(random_dir, trained.config, seed=args.seed)
    untrained = load_policy(random_dir).eval()
    inputs["random_model_last_prompt"] = features(untrained, prompts_of, episodes)[
        "last_prompt_token"
    ]
    result = {"args": vars(args), "decisions": len(y), "train_decisions": split,
              "returns_mean": float(y.mean()), "returns_std": float(y.std()),
              "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "date": time.strftime("%Y-%m-%d"), "fits": {}}  # fmt: skip
    for name, x in inputs.items():
        for standardize in (False, True):
            fits = fit(x[:split], y[:split], x[split:], y[split:], args.steps, args.lr,
                       args.seed, standardize)  # fmt: skip
            key = name + (" (standardized)" if standardize else "")
            result["fits"][key] = fits
            print(f"{key:41s} explained variance: train {fits['ev_train']:+.3f}, "
                  f"held-out episodes {fits['ev_test']:+.3f}", flush=True)  # fmt: skip
    result["wall_s"] = time.time() - t0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
