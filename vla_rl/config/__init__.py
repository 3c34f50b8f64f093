"""The training config: dataclasses per component (RLinf's sections and names), YAML loading with
dotted overrides and `${key}` interpolation, help text from the field docstrings, and device
placement."""

from .docs import describe_config, field_docs
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
    "describe_config",
    "dump_yaml",
    "field_docs",
    "load_config",
    "parse_override",
    "parse_placement",
    "resolve_placement",
    "tiny_cpu_default",
    "to_dict",
]
