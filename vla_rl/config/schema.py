"""The training config: one dataclass per component, sections and key names as in RLinf.

Every field has a default; the defaults together are the embedded tiny CPU run (`TrainConfig()`).
Each dataclass checks its own fields in `__post_init__` (keys relative to the section; the loader
prefixes the section path), and `TrainConfig` checks what spans sections with full dotted keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import ConfigError
from .placement import PlacementSpec, parse_placement, resolve_placement

PRECISIONS = ("fp32", "bf16")


def _choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, f"must be one of {list(choices)}, got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # NaN too
        raise ConfigError(key, f"must be >= {low}, got {value!r}")


def _interval(key: str, value: int) -> None:
    if value != -1 and value < 1:
        raise ConfigError(key, f"must be >= 1, or -1 to disable, got {value!r}")


# ---------------------------------------------------------------------------------------- cluster


@dataclass
class ClusterConfig:
    """Where the components run."""

    num_nodes: int = 1
    """Machines in the cluster; `vla-rl train` runs on one machine, so only 1 is accepted (RLinf's
    key, kept so its configs load; multi-node learners come with the Helm chart)."""
    component_placement: dict[str, str | int] = field(
        default_factory=lambda: {"actor,rollout,env": "cpu"}
    )
    """Component ('env', 'rollout', 'actor'; combined keys like 'actor,rollout,env') -> 'cpu',
    'all', or GPU ranks '0', '0-3', '0,2'; components left out run on the CPU."""

    def __post_init__(self) -> None:
        if self.num_nodes != 1:
            raise ConfigError(
                "num_nodes",
                f"{self.num_nodes}: vla-rl train starts every service on this machine; "
                "more nodes are not supported yet (set 1)",
            )
        # YAML reads `actor: 0` as an int; keep one spelling so a dump loads back equal.
        self.component_placement = {
            str(names): str(spec) if isinstance(spec, int) and not isinstance(spec, bool) else spec
            for names, spec in self.component_placement.items()
        }
        parse_placement(self.component_placement, key="component_placement")

    def specs(self) -> dict[str, PlacementSpec]:
        """Parsed spec per component: 'cpu', 'all' or a tuple of GPU ranks."""
        return parse_placement(self.component_placement)

    def resolve(self, num_gpus: int) -> dict[str, list[int] | str]:
        """GPU ranks (or 'cpu') per component on a machine with `num_gpus` GPUs."""
        return resolve_placement(self.component_placement, num_gpus)


# ----------------------------------------------------------------------------------------- runner


LOGGER_BACKENDS = ("tensorboard", "wandb")


@dataclass
class LoggerConfig:
    """Where metrics, checkpoints and videos of a run go."""

    log_path: str = "runs"
    """Root directory of all runs; this run writes under <log_path>/<experiment_name>/."""
    project_name: str = "vla-rl"
    """Project name (the wandb project)."""
    experiment_name: str = "tiny_cpu_ppo"
    """Name of this run: its directory under log_path and its wandb run name."""
    logger_backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Metric sinks: any of 'tensorboard', 'wandb'."""

    def __post_init__(self) -> None:
        for i, backend in enumerate(self.logger_backends):
            _choice(f"logger_backends[{i}]", backend, LOGGER_BACKENDS)
        if not self.experiment_name:
            raise ConfigError("experiment_name", "must not be empty")


@dataclass
class RunnerConfig:
    """The training loop around the components."""

    max_epochs: int = 2
    """Training iterations (collect one rollout batch, then update), as in RLinf."""
    save_interval: int = 10
    """Save a checkpoint every this many iterations and at the end, also the end of a run
    stopped by Ctrl-C or SIGTERM (-1: only at the end); a rerun resumes from the latest."""
    val_check_interval: int = -1
    """Evaluate env.eval every this many policy versions (in the background, beside training)
    and the final policy; -1: only the final policy, and only when env.eval.video_cfg.save_video."""
    resume_dir: str | None = None
    """Checkpoint to start from when this run has none of its own: a global_step_N directory or a
    checkpoints directory (its latest); adapter, optimizer, iteration and policy version. A run
    that already has a checkpoint (a restart) continues from its own latest instead."""
    seed: int = 0
    """Seed of the learner (shuffling, LoRA init); env seeds are under env.train/env.eval."""
    segment_timeout_s: float = 600.0
    """The learner stops with an error naming what has arrived from which env server when no
    trajectory segment comes for this many seconds (a stalled env server or a wrong buffer
    shows up, instead of a silent hang); 0: wait forever."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metric logging."""

    def __post_init__(self) -> None:
        _at_least("max_epochs", self.max_epochs, 1)
        _interval("save_interval", self.save_interval)
        _interval("val_check_interval", self.val_check_interval)
        _at_least("segment_timeout_s", self.segment_timeout_s, 0)


# -------------------------------------------------------------------------------------- algorithm


ADV_TYPES = ("gae", "grpo")
# Older RLinf releases named the embodied estimators this way.
ADV_TYPE_ALIASES = {"embodied_gae": "gae", "embodied_grpo": "grpo"}
LOSS_TYPES = ("actor_critic", "actor")
LOGPROB_TYPES = ("token_level", "action_level", "chunk_level")
ENTROPY_TYPES = ("token_level", "action_level")
REWARD_TYPES = ("chunk_level", "action_level")
LOSS_AGG_FUNCS = ("token-mean", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class AlgorithmConfig:
    """PPO / GRPO: advantage estimator, losses and update schedule."""

    adv_type: str = "gae"
    """Advantage estimator: 'gae' (PPO with a critic) or 'grpo' (group-relative, no critic)."""
    loss_type: str = "actor_critic"
    """'actor_critic' (policy + value loss, for gae) or 'actor' (policy loss only, for grpo)."""
    group_size: int = 1
    """GRPO: episodes per group, started from the same initial state (1 for PPO)."""
    gamma: float = 0.99
    """Discount factor per decision."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    reward_scale: float = 1.0
    """PPO (gae): the env's rewards are multiplied by this before GAE (logged rewards stay the
    env's). The value head reads the LLM's hidden state, so the value loss trains the same LoRA
    as the policy loss; keep returns of order 1 or the critic's gradient swamps the policy's
    (returns up to 40 gave it 99% of the LoRA gradient: benchmarks/critic_share.py). A sparse
    reward of 1 per step over 50-step episodes wants about 1 / 50. GRPO normalises within
    groups, where a scale cancels: only 1 is accepted there."""
    normalize_advantages: bool | None = None
    """Standardise advantages over the batch before the policy loss; null: true for gae, false
    for grpo (group advantages are already normalised; re-standardising them per decision can
    flip a failure's sign), and true with grpo is refused."""
    update_epoch: int = 1
    """Passes over the rollout batch per iteration (PPO epochs)."""
    clip_ratio_low: float = 0.2
    """PPO ratio clip below 1 (ratio >= 1 - clip_ratio_low)."""
    clip_ratio_high: float = 0.2
    """PPO ratio clip above 1 (ratio <= 1 + clip_ratio_high; > low is DAPO's clip-higher)."""
    clip_ratio_c: float | None = None
    """Dual-clip bound c (> 1) on the loss for negative advantages; None disables it."""
    value_clip: float | None = 0.2
    """Clip of the value update around the old values; None disables it."""
    huber_delta: float | None = None
    """Huber loss with this delta for the critic instead of squared error; None: squared."""
    value_coef: float = 1.0
    """Weight of the value loss (RLinf adds it unweighted and sets the critic's own value_lr)."""
    entropy_bonus: float = 0.0
    """Weight of the entropy bonus."""
    logprob_type: str = "action_level"
    """Granularity of the PPO ratio: 'token_level', 'action_level' (7 tokens) or 'chunk_level'."""
    entropy_type: str = "action_level"
    """Entropy bonus per 'action_level' (the sum of its 7 tokens' entropies, as RLinf) or per
    'token_level' (the mean over tokens)."""
    reward_type: str = "chunk_level"
    """Reward and value per decision: 'chunk_level' (OFT: the chunk's env rewards summed, one
    value per chunk). RLinf's 'action_level' (per env step, a value per action) equals it for
    OpenVLA (chunks of 1) and is refused for OFT chunks (not built)."""
    loss_agg_func: str = "token-mean"
    """Loss aggregation: 'token-mean' (every decision weighs the same, RLinf's default) or
    'seq-mean-token-mean' (every episode weighs the same: its decisions 1 / its length each)."""
    kl_estimator: str = "k3"
    """Estimator of the logged train/actor/approx_kl: 'k1' (mean log(pi_old / pi), what RLinf
    and verl log), 'k2' or 'k3' (Schulman's unbiased, always >= 0)."""
    filter_rewards: bool = False
    """GRPO: train only on groups whose success rate lies within the bounds below (DAPO's dynamic
    sampling: all-success and all-failure groups have zero advantage)."""
    rewards_lower_bound: float = 0.1
    """filter_rewards: keep groups whose success rate is >= this (0.1 drops all-failure groups)."""
    rewards_upper_bound: float = 0.9
    """filter_rewards: keep groups whose success rate is <= this (0.9 drops all-success groups)."""
    max_staleness: int = 0
    """Policy versions collection may run ahead of the learner (0: on-policy). > 0 turns on
    decoupled PPO: the ratio is taken against the learner's recompute (the proximal policy) and
    each decision is weighted by pi_prox / pi_behaviour from the rollout's log-probs; segments
    older than this are dropped and counted."""
    behaviour_weight_cap: float | None = 5.0
    """Decoupled PPO (max_staleness > 0): truncate the weight pi_prox / pi_behaviour at this;
    null: no truncation."""
    recompute_logprobs: bool = True
    """Recompute the old log-probs with the learner's weights before the update (RLinf's key).
    false: take the rollout's log-probs of the sampled tokens as the old ones (on-policy they
    are the same policy's, up to the engines' numerics) and skip that forward; GRPO then runs
    no forward before the update at all, GAE still one for the critic's values. Needs
    max_staleness 0: decoupled PPO takes its ratio against the learner's recompute."""

    def __post_init__(self) -> None:
        self.adv_type = ADV_TYPE_ALIASES.get(self.adv_type, self.adv_type)
        _choice("adv_type", self.adv_type, ADV_TYPES)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("logprob_type", self.logprob_type, LOGPROB_TYPES)
        _choice("entropy_type", self.entropy_type, ENTROPY_TYPES)
        _choice("reward_type", self.reward_type, REWARD_TYPES)
        _choice("loss_agg_func", self.loss_agg_func, LOSS_AGG_FUNCS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.behaviour_weight_cap is not None and self.behaviour_weight_cap <= 1.0:
            raise ConfigError(
                "behaviour_weight_cap", f"must be > 1 (or null), got {self.behaviour_weight_cap!r}"
            )
        for name in ("rewards_lower_bound", "rewards_upper_bound"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(name, f"is a success rate in [0, 1], got {getattr(self, name)!r}")
        _at_least("group_size", self.group_size, 1)
        _at_least("update_epoch", self.update_epoch, 1)
        _at_least("max_staleness", self.max_staleness, 0)
        if not self.recompute_logprobs and self.max_staleness > 0:
            raise ConfigError(
                "recompute_logprobs",
                f"false needs max_staleness 0 (got {self.max_staleness}): decoupled PPO takes "
                "its ratio against the learner's recomputed log-probs (the proximal policy)",
            )
        if not self.reward_scale > 0:
            raise ConfigError("reward_scale", f"must be > 0, got {self.reward_scale!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(name, f"must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise ConfigError("clip_ratio_low", f"must be in [0, 1), got {self.clip_ratio_low!r}")
        _at_least("clip_ratio_high", self.clip_ratio_high, 0.0)
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ConfigError("clip_ratio_c", f"must be > 1 (or null), got {self.clip_ratio_c!r}")
        for name in ("value_clip", "huber_delta"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(name, f"must be > 0 (or null), got {value!r}")
        _at_least("value_coef", self.value_coef, 0.0)
        _at_least("entropy_bonus", self.entropy_bonus, 0.0)
        if self.normalize_advantages is None:
            self.normalize_advantages = self.adv_type == "gae"
        if self.rewards_lower_bound > self.rewards_upper_bound:
            raise ConfigError(
                "rewards_lower_bound",
                f"{self.rewards_lower_bound} is above rewards_upper_bound "
                f"{self.rewards_upper_bound}",
            )


# -------------------------------------------------------------------------------------------- env


ENV_TYPES = ("maniskill",)
SIM_BACKENDS = ("cpu", "gpu")
REWARD_MODES = ("normalized_dense", "dense", "sparse")


@dataclass
class VideoConfig:
    """Episode videos written by the env servers."""

    save_video: bool = False
    """env.eval: one MP4 per evaluation episode; env.train: one MP4 per iteration of each env
    server's first env, from the observations it already sends (no extra rendering)."""
    info_on_video: bool = True
    """Overlay reward, success and step on the frames."""
    video_base_dir: str | None = None
    """Directory of the videos (null: <log_path>/<experiment_name>/video/<train|eval>)."""


@dataclass
class EnvSectionConfig:
    """One set of envs (env.train or env.eval) and the env servers that step them."""

    env_type: str = "maniskill"
    """Simulator; RLinf's older name `simulator_type` is accepted."""
    task_ids: list[str] = field(default_factory=lambda: ["PickCube-v1"])
    """ManiSkill3 env ids; envs are split evenly over them."""
    task_modules: list[str] = field(default_factory=list)
    """Python modules the env servers import first, to register extra tasks."""
    total_num_envs: int = 2
    """Parallel envs over all env servers."""
    num_servers: int = 1
    """Env server processes; each steps total_num_envs / num_servers envs. For env.eval: how many
    of the training env servers share the evaluation episodes."""
    max_episode_steps: int = 8
    """Env steps before an episode is truncated."""
    max_steps_per_rollout_epoch: int = 8
    """Env steps each env takes per iteration (a multiple of actor.model.num_action_chunks); for
    env.eval, the most steps an evaluation episode plays."""
    auto_reset: bool = True
    """Reset an env as soon as its episode ends and keep collecting within the iteration. Only
    true is supported (RLinf's key, kept so its configs load): GRPO scores each env's first
    episode from the shared start and masks what follows."""
    ignore_terminations: bool = False
    """Run every episode to max_episode_steps: success does not end it (success_once still
    records it). RLinf's ManiSkill key. With a dense per-step reward and episodes that end on
    success, hovering near the goal pays more than finishing; this removes that incentive."""
    sim_backend: str = "cpu"
    """ManiSkill physics: 'cpu' (one process per env batch) or 'gpu' (needs an env GPU)."""
    control_mode: str | None = "pd_ee_delta_pose"
    """ManiSkill controller (OpenVLA's 7-D end-effector deltas); null: the task's default."""
    image_size: int = 224
    """Side of the square RGB camera image sent to the policy."""
    reward_mode: str = "normalized_dense"
    """ManiSkill reward: 'normalized_dense', 'dense' or 'sparse' (success only)."""
    seed: int = 0
    """Seed of the first env; env i uses seed + i, groups share their first member's seed."""
    video_cfg: VideoConfig = field(default_factory=VideoConfig)
    """Episode videos."""

    def __post_init__(self) -> None:
        _choice("env_type", self.env_type, ENV_TYPES)
        if not self.auto_reset:
            raise ConfigError(
                "auto_reset",
                "false is not supported: envs always reset when an episode ends (GRPO trains on "
                "each env's first episode and masks the rest)",
            )
        _choice("sim_backend", self.sim_backend, SIM_BACKENDS)
        _choice("reward_mode", self.reward_mode, REWARD_MODES)
        if not self.task_ids:
            raise ConfigError("task_ids", "must name at least one task")
        for name in ("total_num_envs", "num_servers", "max_episode_steps", "image_size"):
            _at_least(name, getattr(self, name), 1)
        _at_least("max_steps_per_rollout_epoch", self.max_steps_per_rollout_epoch, 1)
        if self.total_num_envs % self.num_servers:
            raise ConfigError(
                "total_num_envs",
                f"{self.total_num_envs} envs do not split evenly over num_servers="
                f"{self.num_servers}",
            )


def _eval_env_default() -> EnvSectionConfig:
    # Other seeds than training, so evaluation does not replay the training starts.
    return EnvSectionConfig(seed=1000)


@dataclass
class EnvConfig:
    """Training and evaluation envs."""

    train: EnvSectionConfig = field(default_factory=EnvSectionConfig)
    """Envs that collect training data."""
    eval: EnvSectionConfig = field(default_factory=_eval_env_default)
    """Envs for evaluation (runner.val_check_interval), sampled at temperature_eval."""


# ---------------------------------------------------------------------------------------- rollout


ENGINES = ("torch", "vllm")
WEIGHT_SYNCS = ("merge", "lora")  # vllm: how an adapter's LLM LoRA reaches the engine
# RLinf's embodied rollout backend "huggingface" is plain PyTorch, i.e. our torch engine.
ENGINE_ALIASES = {"huggingface": "torch"}


@dataclass
class SamplingParams:
    """How the rollout samples action tokens."""

    temperature_train: float = 1.0
    """Temperature while collecting training data (the learner scores at the same one)."""
    temperature_eval: float = 0.6
    """Temperature for the eval envs (0: greedy)."""
    top_k: int = 0
    """Only 0 (sample from all 256 bins) is supported: the learner scores actions under the full
    distribution, and top-k sampling would bias PPO's ratio (RLinf's key, kept so configs load)."""

    def __post_init__(self) -> None:
        if self.temperature_train <= 0:
            raise ConfigError(
                "temperature_train", f"must be > 0 for PPO/GRPO, got {self.temperature_train!r}"
            )
        _at_least("temperature_eval", self.temperature_eval, 0.0)
        if self.top_k != 0:
            raise ConfigError(
                "top_k",
                f"{self.top_k}: top-k sampling is not supported (the learner's log-probs are over "
                "all 256 bins, so the PPO ratio would be biased); set 0",
            )


@dataclass
class RolloutConfig:
    """The rollout servers that turn observations into actions."""

    engine: str = "torch"
    """'torch' (CPU/GPU, OpenVLA and OFT) or 'vllm' (GPU, OpenVLA only); RLinf's
    backend: huggingface means torch."""
    pipeline_stage_num: int = 1
    """Env batches per server in flight: while the rollout decodes one, the others step."""
    max_batch_size: int = 64
    """Most observations the rollout server batches into one forward."""
    max_wait_ms: float = 5.0
    """How long the server waits to fill a batch before running a partial one."""
    replicas: int = 1
    """Rollout server replicas (with addresses: their count)."""
    addresses: list[str] = field(default_factory=list)
    """'host:port' of running rollout replicas; empty: launch `replicas` locally."""
    discovery_service: str = ""
    """Kubernetes: the Service whose EndpointSlices list the rollout replicas; the learner
    watches them in its own namespace and pushes the current policy to each replica that
    appears (addresses then only serve env servers and evaluation). "": the addresses."""
    gpu_memory_utilization: float = 0.3
    """vllm: fraction of the GPU it may take (the rest is left to collocated components)."""
    weight_sync: str | None = None
    """vllm: how a pushed adapter's LLM LoRA reaches the engine. 'merge' (null means it): merged
    into vLLM's weights inside its workers, from a kept copy of the base (about 2 bytes per LLM
    parameter in bf16 beside the model, outside gpu_memory_utilization). 'lora': served as a
    vLLM LoRA on the decoder's linear layers (its punica kernels per step; both take about
    0.7 s per push for r32 on the 7B, measured on an H200). Refused with the torch engine, which copies adapters into its own modules."""
    precision: str | None = None
    """'fp32' or 'bf16' weights of the rollout model; null: actor.model.precision."""
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    """Sampling of action tokens."""

    def __post_init__(self) -> None:
        self.engine = ENGINE_ALIASES.get(self.engine, self.engine)
        _choice("engine", self.engine, ENGINES)
        if self.precision is not None:
            _choice("precision", self.precision, PRECISIONS)
        if self.weight_sync is not None:
            _choice("weight_sync", self.weight_sync, WEIGHT_SYNCS)
            if self.engine != "vllm":
                raise ConfigError(
                    "weight_sync",
                    f"{self.weight_sync!r} is for the vllm engine; the {self.engine} engine copies "
                    "adapters into its own modules (leave it null)",
                )
        for name in ("pipeline_stage_num", "max_batch_size", "replicas"):
            _at_least(name, getattr(self, name), 1)
        _at_least("max_wait_ms", self.max_wait_ms, 0.0)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )
        for i, address in enumerate(self.addresses):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"addresses[{i}]", f"expected 'host:port', got {address!r}")
        if self.addresses:
            if self.replicas == 1:
                self.replicas = len(self.addresses)
            elif self.replicas != len(self.addresses):
                raise ConfigError(
                    "replicas",
                    f"{self.replicas} does not match the {len(self.addresses)} addresses given",
                )


# ------------------------------------------------------------------------------------------ actor


MODEL_TYPES = ("openvla", "openvla_oft")
LORA_TARGETS = ("llm", "projector", "vision")


@dataclass
class ModelConfig:
    """The policy: which VLA, from where, at what precision."""

    model_type: str = "openvla"
    """'openvla' (autoregressive decoding) or 'openvla_oft' (parallel decoding of a chunk)."""
    model_path: str | None = None
    """Local checkpoint directory in the OpenVLA Hugging Face layout; null: a tiny random model
    built in memory."""
    action_dim: int = 7
    """Dimensions of one robot action (xyz, roll-pitch-yaw, gripper)."""
    num_action_chunks: int = 1
    """Actions per decision: 1 for OpenVLA, C > 1 (8 in RLinf) for OpenVLA-OFT."""
    unnorm_key: str | None = None
    """Entry of the checkpoint's norm_stats that un-normalises actions (e.g. 'bridge_orig');
    null: the checkpoint's only entry."""
    precision: str = "fp32"
    """'fp32' or 'bf16' weights of the learner's model."""

    def __post_init__(self) -> None:
        _choice("model_type", self.model_type, MODEL_TYPES)
        _choice("precision", self.precision, PRECISIONS)
        _at_least("action_dim", self.action_dim, 1)
        _at_least("num_action_chunks", self.num_action_chunks, 1)


@dataclass
class LoraConfig:
    """LoRA adapters: the trainable part of the policy (with the value head)."""

    rank: int = 32
    """LoRA rank r (RLinf: actor.model.lora_rank)."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps rollout and training log-probs identical."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Parts that get adapters: any of 'llm', 'projector', 'vision'."""
    path: str | None = None
    """Adapter to start from (RLinf: actor.model.lora_path). Only null (a fresh LoRA) is
    supported yet: loading an SFT adapter into both learner and rollout is not built; merge it
    into the base checkpoint instead."""

    def __post_init__(self) -> None:
        _at_least("rank", self.rank, 1)
        if self.alpha <= 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("targets", "must name at least one part")
        for i, target in enumerate(self.targets):
            _choice(f"targets[{i}]", target, LORA_TARGETS)
        if self.path is not None:
            raise ConfigError(
                "path",
                f"{self.path!r}: starting from an existing LoRA adapter is not supported yet; "
                "merge it into the base checkpoint (peft merge_and_unload) and set null",
            )


@dataclass
class OptimConfig:
    """AdamW for the LoRA weights and the value head."""

    lr: float = 1.0e-4
    """Learning rate of the LoRA weights."""
    value_lr: float = 3.0e-3
    """Learning rate of the value head."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    clip_grad: float = 10.0
    """Global gradient-norm clip."""
    critic_warmup_steps: int = 0
    """Learner iterations at the start of a run (iterations 1..N, so not again after a resume
    past them) that train only the value head: the policy loss is left out and the head reads
    the LLM's state detached, so the LoRA, and the policy collecting, stay the base's while the
    critic learns its returns. PPO's first advantages then come from a fitted value function
    instead of a head whose last layer starts at zero. Needs the critic (actor_critic)."""

    def __post_init__(self) -> None:
        for name in ("lr", "value_lr", "adam_eps", "clip_grad"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)!r}")
        _at_least("weight_decay", self.weight_decay, 0.0)
        _at_least("critic_warmup_steps", self.critic_warmup_steps, 0)


FSDP_BACKENDS = ("auto", "gloo", "nccl")
SHARDING_STRATEGIES = ("full_shard", "shard_grad_op", "no_shard")


@dataclass
class FSDPConfig:
    """Data-parallel training of the learner (torch.distributed FSDP)."""

    world_size: int | None = None
    """Learner processes; null: one per GPU of the actor placement (1 on the CPU)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (gloo on the CPU, nccl on GPUs), 'gloo' or 'nccl'."""
    sharding_strategy: str = "full_shard"
    """FSDP2 sharding: 'full_shard' (ZeRO-3: parameters re-sharded after each forward),
    'shard_grad_op' (ZeRO-2: kept gathered from forward to backward; more memory, less traffic)
    or 'no_shard' (DDP: every GPU holds the whole model; the frozen base is never communicated,
    only the adapter's gradients are all-reduced; fastest when the model fits one GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (needed for 7B at RLinf's micro-batch sizes)."""

    def __post_init__(self) -> None:
        _choice("backend", self.backend, FSDP_BACKENDS)
        _choice("sharding_strategy", self.sharding_strategy, SHARDING_STRATEGIES)
        if self.world_size is not None:
            _at_least("world_size", self.world_size, 1)


@dataclass
class ActorConfig:
    """The learner: model, trainable adapters, batch sizes, optimizer, parallelism."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters."""
    micro_batch_size: int = 8
    """Decisions per forward/backward on one learner process; gradients accumulate."""
    global_batch_size: int = 16
    """Decisions per optimizer step over all learner processes (the mini-batch)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    """Data parallelism."""
    checkpoint_dir: str | None = None
    """Where checkpoints go; null: <log_path>/<experiment_name>/checkpoints."""

    def __post_init__(self) -> None:
        _at_least("micro_batch_size", self.micro_batch_size, 1)
        _at_least("global_batch_size", self.global_batch_size, 1)
        world = self.fsdp_config.world_size or 1
        if self.global_batch_size % (self.micro_batch_size * world):
            raise ConfigError(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x fsdp_config.world_size {world}",
            )


# ----------------------------------------------------------------------------------------- buffer


BUFFER_BACKENDS = ("auto", "redis", "memory")
REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass
class BufferConfig:
    """The trajectory buffer between env servers and the learner (Redis Streams)."""

    backend: str = "auto"
    """'redis', 'memory' (the in-process store, or one served at memory://host:port) or 'auto'
    (a local redis-server when one is installed, else memory)."""
    url: str | None = None
    """redis://host:port/db (also rediss://, unix://) or memory://host:port; null: a local
    redis-server (redis) or the in-process store (memory)."""
    stream: str = "vla_rl:segments"
    """Stream the env servers XADD trajectory segments to."""
    group: str = "learner"
    """Consumer group the learner reads with (at-least-once delivery)."""
    maxlen: int | None = 10000
    """Trim acked segments once the stream holds more than this (unacked ones are never
    trimmed); null: keep every segment."""

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BUFFER_BACKENDS)
        if self.url is not None:
            scheme = self.url.partition("://")[0] if "://" in self.url else ""
            if scheme not in REDIS_SCHEMES + ("memory",):
                raise ConfigError(
                    "url", f"expected redis://host:port/db or memory://host:port, got {self.url!r}"
                )
            if self.backend != "auto" and (scheme == "memory") != (self.backend == "memory"):
                raise ConfigError("url", f"{self.url!r} does not match backend {self.backend!r}")
        if self.maxlen is not None:
            _at_least("maxlen", self.maxlen, 0)
        for name in ("stream", "group"):
            if not getattr(self, name):
                raise ConfigError(name, "must not be empty")


# ------------------------------------------------------------------------------------------- root


@dataclass
class TrainConfig:
    """A whole training run; `TrainConfig()` is the tiny CPU run."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Placement of the components."""
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    """Training loop and logging."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """PPO / GRPO."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Env servers."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout servers."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Learner."""
    buffer: BufferConfig = field(default_factory=BufferConfig)
    """Trajectory buffer."""

    def __post_init__(self) -> None:
        self._check_model()
        self._check_algorithm()
        self._check_envs()
        self._check_placement()
        self._fill_derived()

    @property
    def run_dir(self) -> str:
        """Directory of this run: <log_path>/<experiment_name>."""
        return os.path.join(self.runner.logger.log_path, self.runner.logger.experiment_name)

    @property
    def decisions_per_iteration(self) -> int:
        """Policy decisions one iteration collects (each env takes C env steps per decision)."""
        train = self.env.train
        return train.total_num_envs * (
            train.max_steps_per_rollout_epoch // self.actor.model.num_action_chunks
        )

    def actor_world_size(self, num_gpus: int) -> int:
        """Learner processes on a machine with `num_gpus` GPUs."""
        if self.actor.fsdp_config.world_size is not None:
            return self.actor.fsdp_config.world_size
        ranks = self.cluster.resolve(num_gpus)["actor"]
        return 1 if ranks == "cpu" else len(ranks)

    def _check_model(self) -> None:
        model = self.actor.model
        if model.model_type == "openvla_oft":
            if model.num_action_chunks < 2:
                raise ConfigError(
                    "actor.model.num_action_chunks",
                    "openvla_oft decodes a chunk of actions in parallel; set it > 1 (RLinf: 8)",
                )
            if self.rollout.engine == "vllm":
                raise ConfigError(
                    "rollout.engine",
                    "vllm decodes causally and serves OpenVLA only; openvla_oft needs 'torch'",
                )
        elif model.num_action_chunks != 1:
            raise ConfigError(
                "actor.model.num_action_chunks",
                f"openvla decodes one action per step, got {model.num_action_chunks}; "
                "use model_type openvla_oft for chunks",
            )

    def _check_algorithm(self) -> None:
        algo = self.algorithm
        if algo.adv_type == "gae" and algo.loss_type != "actor_critic":
            raise ConfigError(
                "algorithm.loss_type", "adv_type 'gae' needs the critic: 'actor_critic'"
            )
        if algo.adv_type == "grpo" and algo.loss_type != "actor":
            raise ConfigError("algorithm.loss_type", "adv_type 'grpo' has no critic: use 'actor'")
        warmup = self.actor.optim.critic_warmup_steps
        if warmup > 0 and (algo.loss_type != "actor_critic" or algo.value_coef <= 0):
            raise ConfigError(
                "actor.optim.critic_warmup_steps",
                f"{warmup} warms up a critic, and this run trains none (loss_type "
                f"{algo.loss_type!r}, value_coef {algo.value_coef!r}); leave it 0",
            )
        if algo.group_size > 1 and algo.adv_type != "grpo":
            raise ConfigError(
                "algorithm.group_size",
                f"{algo.group_size} > 1 needs adv_type 'grpo' (got {algo.adv_type!r})",
            )
        if algo.adv_type == "grpo" and algo.group_size < 2:
            raise ConfigError(
                "algorithm.group_size", "grpo compares episodes within a group; set it >= 2"
            )
        if algo.adv_type == "grpo" and algo.reward_scale != 1.0:
            raise ConfigError(
                "algorithm.reward_scale",
                f"{algo.reward_scale!r} has no effect with adv_type 'grpo' (group-normalised "
                "advantages do not change with the rewards' scale); leave it 1.0",
            )
        if algo.adv_type == "grpo" and algo.normalize_advantages:
            raise ConfigError(
                "algorithm.normalize_advantages",
                "true with adv_type 'grpo' would re-standardise the group-normalised advantages "
                "per decision, which can flip a failed episode's sign; set false (or null)",
            )
        if algo.reward_type == "action_level" and self.actor.model.num_action_chunks > 1:
            raise ConfigError(
                "algorithm.reward_type",
                "'action_level' (a reward and value per env step of a chunk) is not built; "
                "OFT chunks use 'chunk_level'",
            )
        if algo.filter_rewards and algo.group_size < 2:
            raise ConfigError(
                "algorithm.filter_rewards", "filters GRPO groups; needs group_size >= 2"
            )

    def _check_envs(self) -> None:
        chunks = self.actor.model.num_action_chunks
        stages = self.rollout.pipeline_stage_num
        for name in ("train", "eval"):
            section: EnvSectionConfig = getattr(self.env, name)
            key = f"env.{name}"
            if section.max_steps_per_rollout_epoch % chunks:
                raise ConfigError(
                    f"{key}.max_steps_per_rollout_epoch",
                    f"{section.max_steps_per_rollout_epoch} is not a multiple of "
                    f"actor.model.num_action_chunks {chunks}",
                )
            if section.total_num_envs % (section.num_servers * stages):
                raise ConfigError(
                    f"{key}.total_num_envs",
                    f"{section.total_num_envs} envs do not split evenly over num_servers "
                    f"{section.num_servers} x rollout.pipeline_stage_num {stages}",
                )
        if self.env.eval.num_servers > self.env.train.num_servers:
            raise ConfigError(
                "env.eval.num_servers",
                f"{self.env.eval.num_servers} is more than env.train.num_servers "
                f"{self.env.train.num_servers} (evaluation runs on the training env servers)",
            )
        group = self.algorithm.group_size
        per_server = self.env.train.total_num_envs // self.env.train.num_servers
        if per_server % group:
            raise ConfigError(
                "env.train.total_num_envs",
                f"{per_server} envs per server is not a multiple of algorithm.group_size {group} "
                "(a group runs on one env server)",
            )

    def _check_placement(self) -> None:
        specs = self.cluster.specs()
        for name in ("train", "eval"):
            if getattr(self.env, name).sim_backend == "gpu" and specs["env"] == "cpu":
                raise ConfigError(
                    f"env.{name}.sim_backend",
                    "'gpu' needs GPUs for env in cluster.component_placement (it is on the CPU)",
                )
        fsdp = self.actor.fsdp_config
        if fsdp.backend == "nccl" and specs["actor"] == "cpu":
            raise ConfigError(
                "actor.fsdp_config.backend",
                "'nccl' needs the actor on GPUs in cluster.component_placement",
            )
        actor_gpus = specs["actor"]
        if fsdp.world_size is not None and isinstance(actor_gpus, tuple):
            if fsdp.world_size != len(actor_gpus):
                raise ConfigError(
                    "actor.fsdp_config.world_size",
                    f"{fsdp.world_size} does not match the {len(actor_gpus)} actor GPUs placed",
                )

    def _fill_derived(self) -> None:
        if self.rollout.precision is None:
            self.rollout.precision = self.actor.model.precision
        if self.actor.checkpoint_dir is None:
            self.actor.checkpoint_dir = os.path.join(self.run_dir, "checkpoints")
        for name in ("train", "eval"):
            video = getattr(self.env, name).video_cfg
            if video.video_base_dir is None:
                video.video_base_dir = os.path.join(self.run_dir, "video", name)
