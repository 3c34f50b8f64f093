"""Model configuration in the OpenVLA Hugging Face layout (config.json), plus the few fields RL needs.

A real OpenVLA checkpoint's config.json loads into `VLAConfig` unchanged; the fields we add for RL
(action chunking, decoding mode, tiny-tower overrides) live under the `vla_rl` key so that the file
stays readable by other OpenVLA implementations (vLLM's `OpenVLAForActionPrediction` among them).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

OPENVLA_TIMM_IDS = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]

# ImageNet statistics for the DINOv2 tower, (0.5, 0.5, 0.5) for SigLIP, as in OpenVLA's processor.
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Keys of an OpenVLA config.json that describe the Prismatic training recipe; kept verbatim on a
# round trip, not used by this implementation.
_PASSTHROUGH_KEYS = (
    "vision_backbone_id",
    "llm_backbone_id",
    "arch_specifier",
    "image_resize_strategy",
    "llm_max_length",
    "output_projector_states",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "auto_map",
    "hf_llm_id",
)


@dataclass
class VLAConfig:
    """Architecture of an OpenVLA / OpenVLA-OFT policy."""

    text_config: dict[str, Any]
    """LlamaConfig fields of the language backbone (OpenVLA-7B: Llama-2-7B, vocab 32064)."""
    timm_model_ids: list[str] = field(default_factory=lambda: list(OPENVLA_TIMM_IDS))
    """timm ids of the DINOv2 featurizer and the fused SigLIP featurizer."""
    timm_override_act_layers: list[str | None] = field(default_factory=lambda: [None, None])
    """Per-tower activation override passed to timm (None keeps timm's default)."""
    image_sizes: list[int] = field(default_factory=lambda: [224, 224])
    """Input resolution of each tower; OpenVLA uses 224 for both."""
    use_fused_vision_backbone: bool = True
    """DINOv2 + SigLIP features concatenated (True for every released OpenVLA)."""
    n_action_bins: int = 256
    """Number of discretisation bins per action dimension."""
    norm_stats: dict[str, Any] = field(default_factory=dict)
    """Per-dataset action statistics: norm_stats[unnorm_key]['action'] has q01, q99, mask."""
    pad_token_id: int = 32000
    """Id of the <PAD> token added on top of Llama's 32000 ids."""
    pad_to_multiple_of: int = 64
    """The LLM vocab is padded to a multiple of this (32000 + 1 -> 32064)."""
    image_token_index: int = 32000
    """Placeholder id vLLM uses for image patches (never embedded by us)."""
    # --- fields for RL, stored under config.json["vla_rl"] ---
    action_dim: int = 7
    """Dimensions of one robot action (xyz, roll-pitch-yaw, gripper)."""
    action_chunk: int = 1
    """Actions decoded per forward: 1 for OpenVLA, C (8 by default) for OpenVLA-OFT."""
    decoding: str = "autoregressive"
    """'autoregressive' (OpenVLA, causal decode) or 'parallel' (OFT, one bidirectional pass)."""
    timm_overrides: list[dict[str, Any]] = field(default_factory=lambda: [{}, {}])
    """Extra timm.create_model kwargs per tower (tiny towers for tests); empty for real models."""
    value_head_hidden: list[int] = field(default_factory=lambda: [512, 128])
    """Hidden sizes of the value head MLP (hidden -> 512 -> 128 -> 1)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of the original config.json this implementation does not use, kept for the round trip."""

    def __post_init__(self) -> None:
        if self.decoding not in ("autoregressive", "parallel"):
            raise ValueError(
                f"config.decoding must be 'autoregressive' or 'parallel', got {self.decoding!r}"
            )
        if self.decoding == "autoregressive" and self.action_chunk != 1:
            raise ValueError("config.action_chunk must be 1 for autoregressive (OpenVLA) decoding")
        if self.action_chunk < 1 or self.action_dim < 1:
            raise ValueError("config.action_chunk and config.action_dim must be >= 1")
        if len(self.timm_model_ids) != (2 if self.use_fused_vision_backbone else 1):
            raise ValueError("config.timm_model_ids must name one tower per featurizer")
        if len(self.timm_overrides) < len(self.timm_model_ids):
            self.timm_overrides = list(self.timm_overrides) + [{}] * (
                len(self.timm_model_ids) - len(self.timm_overrides)
            )
        vocab = int(self.text_config.get("vocab_size", 0))
        if self.action_vocab_end > vocab or self.action_vocab_start < 0:
            raise ValueError(
                f"text_config.vocab_size={vocab} leaves no room for {self.n_action_bins} action ids"
            )

    # The action ids are the last n_action_bins ids of the *unpadded* vocabulary (Llama's 32000).
    @property
    def base_vocab_size(self) -> int:
        return int(self.text_config["vocab_size"]) - self.pad_to_multiple_of

    @property
    def action_vocab_end(self) -> int:
        return self.base_vocab_size

    @property
    def action_vocab_start(self) -> int:
        return self.base_vocab_size - self.n_action_bins

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def num_patches(self) -> int:
        # Both towers use patch 14 at 224 in OpenVLA; tiny towers must keep the same grid.
        patch = self.timm_overrides[0].get("patch_size", 14)
        return (self.image_sizes[0] // patch) ** 2

    @property
    def tokens_per_step(self) -> int:
        """Action tokens emitted per policy call (7 for OpenVLA, 7*C for OFT)."""
        return self.action_dim * self.action_chunk

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content in the OpenVLA Hugging Face layout."""
        out: dict[str, Any] = dict(copy.deepcopy(self.extra))
        out.update(
            {
                "architectures": ["OpenVLAForActionPrediction"],
                "model_type": "openvla",
                "timm_model_ids": list(self.timm_model_ids),
                "timm_override_act_layers": list(self.timm_override_act_layers),
                "image_sizes": list(self.image_sizes),
                "use_fused_vision_backbone": self.use_fused_vision_backbone,
                "n_action_bins": self.n_action_bins,
                "norm_stats": copy.deepcopy(self.norm_stats),
                "pad_token_id": self.pad_token_id,
                "pad_to_multiple_of": self.pad_to_multiple_of,
                "image_token_index": self.image_token_index,
                "text_config": copy.deepcopy(self.text_config),
                "vla_rl": {
                    "action_dim": self.action_dim,
                    "action_chunk": self.action_chunk,
                    "decoding": self.decoding,
                    "timm_overrides": copy.deepcopy(self.timm_overrides),
                    "value_head_hidden": list(self.value_head_hidden),
                },
            }
        )
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> VLAConfig:
        """Parse an OpenVLA config.json; unknown top-level keys are kept in `extra`."""
        raw = copy.deepcopy(raw)
        if "text_config" not in raw:
            raise ValueError("config.json has no 'text_config' (is this an OpenVLA checkpoint?)")
        if raw.get("use_fused_vision_backbone", True) is False:
            raise ValueError("only the fused DINOv2 + SigLIP vision backbone is supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rl = raw.pop("vla_rl", {}) or {}
        unknown_rl = set(rl) - names
        if unknown_rl:
            raise ValueError(f"config.json vla_rl has unknown keys: {sorted(unknown_rl)}")
        kwargs = {k: raw.pop(k) for k in list(raw) if k in names}
        kwargs.update(rl)
        for key in ("architectures", "model_type"):
            raw.pop(key, None)
        kwargs["extra"] = raw
        return cls(**kwargs)


def tiny_text_config(hidden_size: int = 64, layers: int = 2, heads: int = 2) -> dict[str, Any]:
    """A small Llama with the real OpenVLA vocabulary (32000 + pad -> 32064)."""
    return {
        "model_type": "llama",
        "vocab_size": 32064,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32000,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }


MODEL_SIZES: dict[str, dict[str, int]] = {
    # 4.4M parameters, 4.1M of them the two 32064-row vocabulary matrices (embeddings, lm_head):
    # trains on a laptop CPU; every test and the embedded default use it.
    "tiny": {"vision_dim": 32, "tower_depth": 3, "tower_heads": 2, "hidden_size": 64,
             "llm_layers": 2, "llm_heads": 2},
    # 25.2M parameters for one GPU (16.4M of them the vocabulary matrices): towers 6 deep and 192
    # wide (ViT-Tiny's width), a 4-layer Llama of width 256. The tiny towers read a 224 px scene through 32-wide patches, which is
    # a guess at why its bases stay at 15-30% success on PushCube (they miss where the goal is).
    "small": {"vision_dim": 192, "tower_depth": 6, "tower_heads": 3, "hidden_size": 256,
              "llm_layers": 4, "llm_heads": 4},
}  # fmt: skip


def tiny_config(
    *,
    decoding: str = "autoregressive",
    action_chunk: int = 1,
    action_dim: int = 7,
    vision_dim: int = 32,
    tower_depth: int = 3,
    tower_heads: int = 2,
    hidden_size: int = 64,
    llm_layers: int = 2,
    llm_heads: int = 2,
    norm_stats: dict[str, Any] | None = None,
) -> VLAConfig:
    """A small OpenVLA-architecture config (shallow towers, a few-layer Llama) for CPU tests,
    demos and single-GPU experiments; `MODEL_SIZES` names the sizes the commands offer.

    Towers keep the OpenVLA timm ids and patch size 14 at 224 px, so the prompt still carries 256
    image patches; only widths and depths shrink.
    """
    tower = {"embed_dim": vision_dim, "depth": tower_depth, "num_heads": tower_heads}
    return VLAConfig(
        text_config=tiny_text_config(hidden_size, llm_layers, llm_heads),
        timm_overrides=[dict(tower), dict(tower, mlp_ratio=2.0)],
        decoding=decoding,
        action_chunk=action_chunk,
        action_dim=action_dim,
        norm_stats=norm_stats
        if norm_stats is not None
        else default_norm_stats(action_dim=action_dim),
        value_head_hidden=[64, 32],
    )


def sized_config(size: str, **kwargs: Any) -> VLAConfig:
    """tiny_config at one of MODEL_SIZES (decoding, action_chunk, ... passed through)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
    return tiny_config(**MODEL_SIZES[size], **kwargs)


def default_norm_stats(key: str = "maniskill", action_dim: int = 7) -> dict[str, Any]:
    """Identity-like statistics: q01=-1, q99=1 on the arm dims, the gripper (last) passes
    through."""
    arm = action_dim - 1
    return {
        key: {
            "action": {
                "q01": [-1.0] * arm + [0.0],
                "q99": [1.0] * arm + [1.0],
                "mask": [True] * arm + [False],
            }
        }
    }
