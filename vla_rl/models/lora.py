"""LoRA (peft) on the vision towers, projector and LLM, plus the value head: the trainable state.

The trainable state travels as one safetensors blob (learner -> rollout replicas, checkpoints):
LoRA A/B matrices and the value head, with metadata naming the rank, alpha, target modules and
a fingerprint of the base architecture, so a replica can refuse an adapter built for another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .openvla import OpenVLAPolicy

MAX_LORA_RANK = 4096
"""No real adapter comes near it (RLinf's OpenVLA recipes: 32); a blob claiming more is refused
before anything is allocated."""
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ADAPTER_FORMAT = "vla-rl-adapter/1"


@dataclass
class LoRASettings:
    """Where and how big the LoRA adapters are."""

    rank: int = 32
    """LoRA rank r (RLinf's OpenVLA recipes use 32)."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps rollout and training log-probs identical."""
    targets: list[str] = field(default_factory=lambda: ["llm", "projector", "vision"])
    """Which parts get adapters: any of 'llm', 'projector', 'vision'."""

    def __post_init__(self) -> None:
        unknown = set(self.targets) - {"llm", "projector", "vision"}
        if unknown:
            raise ValueError(f"lora.targets has unknown parts {sorted(unknown)}")
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError("lora.rank must be >= 1 and lora.alpha > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("lora.dropout must be in [0, 1)")


def lora_target_names(model: OpenVLAPolicy, targets: list[str]) -> list[str]:
    """Full module names that receive LoRA, in the model's own order."""
    names: list[str] = []
    for tower_name in ("featurizer", "fused_featurizer"):
        if "vision" not in targets:
            break
        tower = getattr(model.vision_backbone, tower_name)
        # OpenVLA reads the second-to-last block, so the last block never affects the output.
        used_blocks = len(tower.blocks) - 1
        for i in range(used_blocks):
            names += [f"vision_backbone.{tower_name}.blocks.{i}.{t}" for t in VISION_TARGETS]
    if "projector" in targets:
        names += [f"projector.fc{i}" for i in (1, 2, 3)]
    if "llm" in targets:
        for name, module in model.language_model.model.layers.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LLM_TARGETS:
                names.append(f"language_model.model.layers.{name}")
    return names


def apply_lora(model: OpenVLAPolicy, settings: LoRASettings) -> OpenVLAPolicy:
    """Inject LoRA in place; freeze the base, leave LoRA and the value head trainable."""
    names = lora_target_names(model, settings.targets)
    if not names:
        raise ValueError("LoRA has no target modules")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        bias="none",
    )
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith("value_head.")
    model.lora_settings = settings
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA and value-head tensors by parameter name (the adapter)."""
    return {
        n: p.detach()
        for n, p in model.named_parameters()
        if "lora_" in n or n.startswith("value_head.")
    }


def base_fingerprint(model: OpenVLAPolicy) -> str:
    """Hash of the base architecture: adapters only load onto the model they were trained on."""
    cfg = model.config.to_hf_dict()
    key = {k: cfg[k] for k in ("timm_model_ids", "text_config", "n_action_bins", "vla_rl")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def serialize_adapter(model: OpenVLAPolicy, version: int) -> bytes:
    """The adapter + value head as safetensors bytes, tagged with its policy version."""
    settings: LoRASettings = model.lora_settings
    state = {n: t.contiguous().cpu() for n, t in trainable_state(model).items()}
    meta = {
        "format": ADAPTER_FORMAT,
        "policy_version": str(int(version)),
        "base_fingerprint": base_fingerprint(model),
        "lora": json.dumps(
            {"rank": settings.rank, "alpha": settings.alpha, "targets": settings.targets}
        ),
    }
    return st_save(state, metadata=meta)


def adapter_metadata(blob: bytes) -> dict[str, str]:
    """The metadata header of an adapter blob, without reading the tensors."""
    if len(blob) < 8:
        raise ValueError("adapter blob is truncated")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise ValueError("adapter blob has a corrupt safetensors header")
    header = _header(blob)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("adapter blob's safetensors metadata is not a map of strings")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"not a vla-rl adapter (format {meta.get('format')!r})")
    return meta


def _header(blob: bytes) -> dict:
    """The JSON header of a safetensors blob (names, dtypes, shapes, metadata)."""
    if len(blob) < 8:
        raise ValueError("adapter blob is truncated")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise ValueError("adapter blob has a corrupt safetensors header")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"adapter blob has a corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError("adapter blob's safetensors header is not a JSON object")
    return header


def check_adapter_fits(model: OpenVLAPolicy, blob: bytes, settings: LoRASettings) -> None:
    """ValueError unless the blob holds exactly the tensors (names and shapes) that LoRA with
    `settings` on this model would have, read from its header alone. For a model that has no
    LoRA yet: injecting it first would allocate whatever rank a blob claims (2**40 was tried)
    and leave it in place when the blob is refused after all."""
    if settings.rank > MAX_LORA_RANK:
        raise ValueError(f"adapter claims LoRA rank {settings.rank} (at most {MAX_LORA_RANK})")
    modules = dict(model.named_modules())
    want: dict[str, tuple[int, ...]] = {}
    for name in lora_target_names(model, settings.targets):
        layer = modules[name]
        base = getattr(layer, "base_layer", layer)  # already wrapped by an earlier injection
        want[f"{name}.lora_A.default.weight"] = (settings.rank, base.in_features)
        want[f"{name}.lora_B.default.weight"] = (base.out_features, settings.rank)
    for name, p in model.named_parameters():
        if name.startswith("value_head."):
            want[name] = tuple(p.shape)
    header = _header(blob)
    have = {
        k: tuple(v.get("shape", ())) if isinstance(v, dict) else None
        for k, v in header.items()
        if k != "__metadata__"
    }
    if set(have) != set(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise ValueError(
            f"adapter does not match LoRA {settings.rank}/{settings.alpha}/{settings.targets} on "
            f"this model: {len(missing)} tensors missing (e.g. {missing[:2]}), {len(extra)} "
            f"unexpected (e.g. {extra[:2]})"
        )
    for name, shape in want.items():
        if have[name] != shape:
            raise ValueError(f"adapter tensor {name} has shape {have[name]}, LoRA needs {shape}")


def load_adapter(model: OpenVLAPolicy, blob: bytes) -> int:
    """Copy an adapter blob into the model (bit-exact); returns its policy version.

    Everything is checked before the first tensor is copied, so a bad blob leaves the model as
    it was.
    """
    meta = adapter_metadata(blob)
    if meta.get("base_fingerprint") != base_fingerprint(model):
        raise ValueError("adapter was trained for a different base model")
    try:
        incoming = st_load(blob)
    except Exception as e:
        raise ValueError(f"adapter blob does not decode ({e})") from e
    params = dict(model.named_parameters())
    expected = set(trainable_state(model))
    if set(incoming) != expected:
        missing, extra = sorted(expected - set(incoming)), sorted(set(incoming) - expected)
        raise ValueError(
            f"adapter does not match the model's LoRA layout: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for name, t in incoming.items():
        if t.shape != params[name].shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"adapter tensor {name} contains NaN or inf")
    with torch.no_grad():
        for name, t in incoming.items():
            params[name].copy_(t.to(params[name].dtype))
    return int(meta["policy_version"])
