"""The training config: dataclasses per component (RLinf's sections and names), YAML loading with
dotted overrides, and device placement."""

from .errors import ConfigError
from .loader import dump_yaml, load_config, parse_override, tiny_cpu_default, to_dict
from .placement import COMPONENTS, parse_placement, resolve_placement
from .schema import (
    ActorConfig,
    AlgorithmConfig,
    BufferConfig,
    ClusterConfig,
    EnvConfig,
    EnvSectionConfig,
    FSDPConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunnerConfig,
    SamplingParams,
    TrainConfig,
    VideoConfig,
)

__all__ = [
    "COMPONENTS",
    "ActorConfig",
    "AlgorithmConfig",
    "BufferConfig",
    "ClusterConfig",
    "ConfigError",
    "EnvConfig",
    "EnvSectionConfig",
    "FSDPConfig",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "RunnerConfig",
    "SamplingParams",
    "TrainConfig",
    "VideoConfig",
    "dump_yaml",
    "load_config",
    "parse_override",
    "parse_placement",
    "resolve_placement",
    "tiny_cpu_default",
    "to_dict",
]
