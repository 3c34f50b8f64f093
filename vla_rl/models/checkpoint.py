"""Load and save policies in the OpenVLA Hugging Face layout (no remote code).

A checkpoint directory holds config.json, the weights as model.safetensors or as shards listed in
model.safetensors.index.json, and the tokenizer files. Weight names follow the released
checkpoints: `vision_backbone.featurizer.*`, `vision_backbone.fused_featurizer.*` (timm layer
scales stored as `.scale_factor`), `projector.fc{1,2,3}.*`, `language_model.*`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD, VLAConfig
from .openvla import OpenVLAPolicy, ValueHead


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


# Weights some released checkpoints carry that our discrete-token policy does not use
# (OFT's continuous action head and proprio projector, FiLM).
IGNORED_PREFIXES = ("action_head.", "proprio_projector.", "noisy_action_projector.")
_LS_TO_HF = re.compile(r"\.ls([12])\.gamma$")
_LS_FROM_HF = re.compile(r"\.ls([12])\.scale_factor$")


def _to_hf_name(name: str) -> str:
    return _LS_TO_HF.sub(r".ls\1.scale_factor", name)


def _from_hf_name(name: str) -> str:
    return _LS_FROM_HF.sub(r".ls\1.gamma", name)


def read_config(path: str | Path) -> VLAConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not an OpenVLA checkpoint directory)")
    try:
        raw = json.loads(cfg_file.read_text())
        return VLAConfig.from_hf_dict(raw)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists missing shard(s) {missing}")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_policy(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    config_overrides: dict | None = None,
) -> OpenVLAPolicy:
    """Build the policy from a checkpoint directory; every base weight must be present.

    The module is built on the meta device and the tensors are assigned straight from the
    safetensors files, so a 7B model never exists twice in memory. The value head is new.
    """
    path = Path(path)
    config = read_config(path)
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise CheckpointError(f"unknown model config key {key!r}")
        setattr(config, key, value)
    config.__post_init__()
    with torch.device("meta"):
        model = OpenVLAPolicy(config, attn_implementation=attn_implementation)
    expected = {n: p for n, p in model.state_dict().items() if not n.startswith("value_head.")}
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for hf_name in f.keys():
                    if hf_name.startswith(IGNORED_PREFIXES):
                        continue
                    name = _from_hf_name(hf_name)
                    if name not in expected:
                        raise CheckpointError(f"{file}: unexpected weight {hf_name!r}")
                    t = f.get_tensor(hf_name)
                    if t.shape != expected[name].shape:
                        raise CheckpointError(
                            f"{file}: {hf_name} has shape {tuple(t.shape)}, the config implies "
                            f"{tuple(expected[name].shape)}"
                        )
                    state[name] = t.to(dtype) if t.is_floating_point() else t
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e
    # A tied lm_head may be absent from the file.
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} weight(s) missing, e.g. {[_to_hf_name(m) for m in missing[:3]]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.value_head = ValueHead(config.hidden_size, config.value_head_hidden).to(device, dtype)
    materialize_buffers(model, device)
    model.image_stats = read_image_stats(path)
    return model.eval()


def read_image_stats(path: Path) -> tuple:
    """Per-tower normalisation from preprocessor_config.json (released OpenVLA checkpoints store
    `means` / `stds`, one triple per tower); the OpenVLA defaults when the file is absent."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return (DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD)
    try:
        raw = json.loads(file.read_text())
        means, stds = raw["means"], raw["stds"]
        if len(means) != 2 or len(stds) != 2 or any(len(x) != 3 for x in means + stds):
            raise ValueError("expected two towers of three channels")
        return (tuple(means[0]), tuple(stds[0]), tuple(means[1]), tuple(stds[1]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read image means/stds ({e})") from e


def materialize_buffers(model: OpenVLAPolicy, device) -> None:
    """Recreate non-persistent buffers (RoPE frequencies) that a meta-device build leaves empty."""
    lm = model.language_model.model
    rotary_cls = type(lm.rotary_emb)
    with torch.device(device):
        lm.rotary_emb = rotary_cls(config=model.language_model.config)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise CheckpointError(f"buffer {name} was not initialised while loading")


def save_policy(model: OpenVLAPolicy, path: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) in the OpenVLA HF layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    state = {
        _to_hf_name(n): t.detach().contiguous().cpu()
        for n, t in model.state_dict().items()
        if not n.startswith("value_head.")
    }
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    dm, ds, sm, ss = model.image_stats
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "PrismaticImageProcessor",
                "image_resize_strategy": "resize-naive",
                "input_sizes": [[3, s, s] for s in model.config.image_sizes],
                "means": [list(dm), list(sm)],
                "stds": [list(ds), list(ss)],
                "use_fused_vision_backbone": True,
            },
            indent=2,
        )
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer (Llama's for real OpenVLA checkpoints).

    The class is the one `tokenizer_config.json` names (`LlamaTokenizer` in released OpenVLA
    checkpoints, which ship `tokenizer.json` and/or `tokenizer.model`); without a name, the fast
    tokenizer in `tokenizer.json`. Not `AutoTokenizer`: it first reads config.json through
    AutoConfig, and transformers knows no model type `openvla`, so it falls back to a generic config
    and warns that the checkpoint may not fit. An `auto_map` in the file is ignored: no remote code.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "tokenizer_config.json"
    class_name = None
    if cfg_file.is_file():
        try:
            class_name = json.loads(cfg_file.read_text()).get("tokenizer_class")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{cfg_file}: unreadable ({e})") from e
    if class_name:
        # Also resolves names written before transformers 5, e.g. "LlamaTokenizerFast".
        tokenizer_cls = tokenizer_class_from_name(class_name)
        if tokenizer_cls is None:
            raise CheckpointError(f"{cfg_file}: unknown tokenizer_class {class_name!r}")
    elif (path / "tokenizer.json").is_file():
        tokenizer_cls = PreTrainedTokenizerFast
    else:
        raise CheckpointError(
            f"{path}: no tokenizer (tokenizer_config.json naming its class, or tokenizer.json)"
        )
    try:
        return tokenizer_cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({e})") from e
