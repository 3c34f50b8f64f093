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
    lora_targets: tuple[str, ...] = ("llm", "projector", "vision")
    """Which parts get LoRA adapters."""
    num_mini_batches: int | None = None
    """Optimizer steps per epoch (mini-batches of batch_size / this). None: 4 for autoregressive
    decoding (twice the steps for the same compute; with 2, 2 of 4 seeds stall), 2 for OFT."""
    logprob_level: str = "token"
    """PPO ratio per 'token' or per 'action' (see `PPOUpdateConfig`)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    entropy_level: str = "action"
    """Entropy bonus per 'action' (sum of its tokens') or per 'token'."""
    temperature: float = 1.0
    """Sampling temperature (the update uses the same)."""
    value_coef: float = 0.5
    """PPO: weight of the value loss (GRPO: always 0)."""
    hidden_size: int = 64
    """Width of the tiny LLM."""
    llm_layers: int = 2
    """Layers of the tiny LLM."""
    centred_action_head: bool | None = None
    """Tiny checkpoint: centre every action token's initial distribution (see
    `build_tiny_policy`). None: on for autoregressive decoding, off for parallel."""
    ordinal_action_embeddings: bool | None = None
    """Tiny checkpoint: ordered input embeddings of the action ids, so that the tokens sampled
    before one do not swing its distribution at random (see `build_tiny_policy`). None: on for
    autoregressive decoding (OFT never embeds action ids)."""
    seed: int = 0
    """Seed for the model, the task and sampling."""
    target_success: float | None = None
    """Stop early once each of the last `target_window` iterations reaches this success."""
    target_window: int = 3
    """Iterations in a row that must reach `target_success`."""
    time_limit_s: float | None = None
    """Stop once this much wall time has passed."""

    def __post_init__(self) -> None:
        if self.decoding not in ("autoregressive", "parallel"):
            raise ValueError(
                f"decoding must be 'autoregressive' or 'parallel', not {self.decoding!r}"
            )
        # Without these a random tiny OpenVLA stalls on the demo task: the first (x) token starts
        # at P(x < 0) = 0.95 for every image (seed 0) and the gripper token is conditioned on
        # the noise of the 6 tokens sampled before it; see tests/unit/test_learning_sanity.py.
        autoregressive = self.decoding == "autoregressive"
        if self.centred_action_head is None:
            self.centred_action_head = autoregressive
        if self.ordinal_action_embeddings is None:
            self.ordinal_action_embeddings = autoregressive
        if self.num_mini_batches is None:
            self.num_mini_batches = 4 if autoregressive else 2

    @classmethod
    def for_decoding(cls, decoding: str, **overrides) -> DemoConfig:
        """The demo's settings for a decoding mode, with `overrides` on top."""
        return cls(decoding=decoding, **overrides)


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


def run_demo(cfg: DemoConfig, log=print, on_iteration=None) -> DemoResult:
    """Train; `log` gets a line per iteration, `on_iteration` (if given) each metrics dict."""
    torch.manual_seed(cfg.seed)
    chunk = cfg.action_chunk if cfg.decoding == "parallel" else 1
    model_cfg = tiny_config(
        decoding=cfg.decoding,
        action_chunk=chunk,
        hidden_size=cfg.hidden_size,
        llm_layers=cfg.llm_layers,
    )
    policy = build_tiny_policy(
        model_cfg,
        cfg.seed,
        centred_action_head=bool(cfg.centred_action_head),
        ordinal_action_embeddings=bool(cfg.ordinal_action_embeddings),
    )
    apply_lora(
        policy,
        LoRASettings(rank=cfg.lora_rank, alpha=2 * cfg.lora_rank, targets=list(cfg.lora_targets)),
    )
    optimizer = make_optimizer(policy, cfg.lr, cfg.value_lr)
    prompts_of = PromptTokenizer(build_tiny_tokenizer())
    action_tok = ActionTokenizer()
    task = ColourBandit(seed=cfg.seed)
    grpo = cfg.algorithm == "grpo"
    update_cfg = PPOUpdateConfig(
        update_epochs=cfg.update_epochs,
        num_mini_batches=cfg.num_mini_batches,
        micro_batch_size=32,
        value_coef=0.0 if grpo else cfg.value_coef,
        normalize_advantages=not grpo,
        value_clip=None,
        logprob_level=cfg.logprob_level,
        entropy_coef=cfg.entropy_coef,
        entropy_level=cfg.entropy_level,
        temperature=cfg.temperature,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start = time.monotonic()
    for it in range(cfg.iterations):
        t0 = time.monotonic()
        obs = task.sample(cfg.batch_size, cfg.group_size if grpo else 1)
        prompts = prompts_of(obs.instructions)
        out = policy.generate(
            policy.pixel_values(obs.images), prompts, temperature=cfg.temperature, generator=gen
        )
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
        reach_ok, gripper_ok = task._parts(obs, actions)
        metrics["env/success_once"] = float(success.mean())
        metrics["env/reach_ok"] = float(reach_ok.float().mean())
        metrics["env/gripper_ok"] = float(gripper_ok.float().mean())
        metrics["env/reward"] = float(reward.mean())
        metrics["time/iteration_s"] = time.monotonic() - t0
        history.append(metrics)
        if on_iteration is not None:
            on_iteration(metrics)
        log(
            f"iter {it + 1:3d}/{cfg.iterations}  success {metrics['env/success_once']:.2f}  "
            f"policy_loss {metrics['actor/policy_loss']:+.4f}  "
            f"approx_kl {metrics['actor/approx_kl']:.4f}  "
            + (f"value_loss {metrics['critic/value_loss']:.4f}  " if update_cfg.value_coef else "")
            + f"{metrics['time/iteration_s']:.2f}s"
        )
        recent = [h["env/success_once"] for h in history[-cfg.target_window :]]
        if (
            cfg.target_success is not None
            and len(recent) == cfg.target_window
            and min(recent) >= cfg.target_success
        ):
            break
        if cfg.time_limit_s is not None and time.monotonic() - start > cfg.time_limit_s:
            break
    return DemoResult(history, policy, prompts_of)
