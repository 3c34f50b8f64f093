"""Behaviour cloning: warm-start an OpenVLA-architecture policy on demonstrations (`vla-rl bc`).

The policy is trained with teacher forcing on the demonstrations' action tokens (cross-entropy of
every token given the image, the instruction and, for autoregressive decoding, the previous
tokens), all weights trainable, and written as a checkpoint in the OpenVLA Hugging Face layout
that `vla-rl train` and `vla-rl eval` load (`actor.model.model_path`). The point of a warm start
here is a base with moderate success, so the data and the steps are limited on purpose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vla_rl.demos import load_demos
from vla_rl.models import OpenVLAPolicy, PromptTokenizer, load_policy, load_tokenizer
from vla_rl.models.checkpoint import save_policy


@dataclass
class BCConfig:
    """Knobs of behaviour cloning."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Decisions per step (sampled uniformly from all demonstration steps)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_episodes: int | None = None
    """Use only the first N episodes of each demonstration directory (None: all)."""
    seed: int = 0
    """Seed of the sampling and of any randomness in the update."""
    log_every: int = 25
    """Print a progress line every this many steps."""
    device: str = "auto"
    """Where to train: 'cpu', 'cuda', or 'auto' (the first GPU when there is one)."""

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("bc: --device cuda, but torch sees no GPU")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"bc: --device must be auto, cpu or cuda, not {self.device!r}")
        return torch.device(self.device)


@dataclass
class DemoSteps:
    """All demonstration steps, flat: images [N, H, W, 3] uint8, instructions [N], tokens [N, 7]."""

    images: np.ndarray
    instructions: list[str]
    action_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.instructions)


def load_steps(
    directories: list[str | Path], max_episodes: int | None = None, chunk: int = 1
) -> DemoSteps:
    """Every decision of the episodes in the demonstration directories: one per step, or, for
    OFT (chunk C > 1), one per C steps with the next C actions' tokens (the last action repeated
    past an episode's end, as a chunk that outlives its episode would be executed)."""
    images, texts, tokens = [], [], []
    for directory in directories:
        _, episodes = load_demos(directory)
        for ep in episodes[:max_episodes]:
            t = len(ep["images"])
            starts = list(range(0, t, chunk))
            padded = np.concatenate(
                [ep["action_tokens"], np.repeat(ep["action_tokens"][-1:], chunk, 0)]
            )
            images.append(ep["images"][starts])
            texts += [ep["instruction"]] * len(starts)
            tokens.append(np.stack([padded[s : s + chunk].reshape(-1) for s in starts]))
    if not images:
        raise ValueError(f"no demonstration episodes in {[str(d) for d in directories]}")
    return DemoSteps(np.concatenate(images), texts, np.concatenate(tokens))


def token_accuracy(
    policy: OpenVLAPolicy, prompts_of: PromptTokenizer, steps: DemoSteps, batch: int = 32
) -> float:
    """Share of demonstration tokens the policy's teacher-forced argmax reproduces."""
    policy.eval()
    hits = total = 0
    with torch.no_grad():
        for start in range(0, len(steps), batch):
            sl = slice(start, start + batch)
            images = torch.from_numpy(steps.images[sl])
            tokens = torch.from_numpy(steps.action_tokens[sl]).long().to(policy.device)
            logits, _ = policy.forward_actions(
                policy.pixel_values(images), prompts_of(steps.instructions[sl]), tokens
            )
            predicted = logits.argmax(-1) + policy.config.action_vocab_start
            hits += int((predicted == tokens).sum())
            total += tokens.numel()
    return hits / max(total, 1)


def behaviour_clone(
    policy: OpenVLAPolicy,
    prompts_of: PromptTokenizer,
    steps: DemoSteps,
    cfg: BCConfig,
    log=print,
) -> list[float]:
    """Train `policy` in place on the steps; returns the loss of every step."""
    generator = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    t0 = time.monotonic()
    for step in range(1, cfg.steps + 1):
        policy.train()
        index = torch.randint(0, len(steps), (cfg.batch_size,), generator=generator).numpy()
        images = torch.from_numpy(steps.images[index])
        tokens = torch.from_numpy(steps.action_tokens[index]).long().to(policy.device)
        prompts = prompts_of([steps.instructions[i] for i in index])
        logp, _, _ = policy.evaluate_actions(policy.pixel_values(images), prompts, tokens)
        loss = -logp.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = losses[-cfg.log_every :]
            log(
                f"bc step {step:5d}/{cfg.steps}  loss {sum(recent) / len(recent):.3f}  "
                f"{time.monotonic() - t0:.0f} s"
            )
    policy.eval()
    return losses


def run(
    demos: list[str],
    init: str,
    out: str,
    cfg: BCConfig,
    log=print,
) -> dict[str, float]:
    """Load `init` (a checkpoint directory), clone the demonstrations into it and write `out`."""
    torch.manual_seed(cfg.seed)
    device = cfg.torch_device()
    policy = load_policy(init).to(device)
    steps = load_steps(demos, cfg.max_episodes, chunk=policy.config.action_chunk)
    tokenizer = load_tokenizer(init)
    prompts_of = PromptTokenizer(tokenizer)
    before = token_accuracy(policy, prompts_of, steps)
    log(
        f"bc: {len(steps)} steps from {len(demos)} demonstration set(s); token accuracy {before:.3f}"
    )
    losses = behaviour_clone(policy, prompts_of, steps, cfg, log)
    after = token_accuracy(policy, prompts_of, steps)
    save_policy(policy, out, tokenizer=tokenizer)
    log(f"bc: token accuracy {before:.3f} -> {after:.3f} on {device}; wrote {out}")
    return {
        "token_accuracy_before": before,
        "token_accuracy_after": after,
        "final_loss": losses[-1],
    }
