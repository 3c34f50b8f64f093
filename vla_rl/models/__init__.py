"""The VLA policy core: OpenVLA / OpenVLA-OFT with a value head, action tokenizer, checkpoints, LoRA.

Does no I/O beyond checkpoint files and imports no service.
"""

from .action_tokenizer import ActionNormalizer, ActionTokenizer, build_prompt
from .checkpoint import CheckpointError, load_policy, load_tokenizer, read_config, save_policy
from .config import MODEL_SIZES, VLAConfig, default_norm_stats, sized_config, tiny_config
from .openvla import (
    OpenVLAPolicy,
    PolicyOutput,
    PromptBatch,
    aggregate_entropy,
    aggregate_logprobs,
    preprocess_images,
    sample_action_tokens,
)
from .processor import PromptTokenizer

__all__ = [
    "MODEL_SIZES",
    "ActionNormalizer",
    "ActionTokenizer",
    "CheckpointError",
    "OpenVLAPolicy",
    "PolicyOutput",
    "PromptBatch",
    "PromptTokenizer",
    "VLAConfig",
    "aggregate_entropy",
    "aggregate_logprobs",
    "build_prompt",
    "default_norm_stats",
    "load_policy",
    "load_tokenizer",
    "preprocess_images",
    "read_config",
    "sample_action_tokens",
    "save_policy",
    "sized_config",
    "tiny_config",
]
