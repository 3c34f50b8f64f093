"""LoRA placement, trainable set, and the adapter blob that travels learner -> rollout."""

import pytest
import torch

from tests.conftest import INSTRUCTIONS
from vla_rl.models import load_policy, tiny_config
from vla_rl.models.lora import (
    LoRASettings,
    adapter_metadata,
    apply_lora,
    load_adapter,
    lora_target_names,
    serialize_adapter,
    trainable_state,
)
from vla_rl.models.tiny import build_tiny_policy


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_targets_cover_vision_projector_and_llm(tiny_ckpt):
    model = load_policy(tiny_ckpt)
    names = lora_target_names(model, ["llm", "projector", "vision"])
    assert "projector.fc1" in names and "projector.fc3" in names
    assert "language_model.model.layers.1.mlp.down_proj" in names
    assert "vision_backbone.fused_featurizer.blocks.0.attn.qkv" in names
    # The last block of each tower is never read (OpenVLA uses the second-to-last block).
    depth = len(model.vision_backbone.featurizer.blocks)
    assert not any(f"featurizer.blocks.{depth - 1}." in n for n in names)
    assert lora_target_names(model, ["llm"]) == [n for n in names if n.startswith("language_model")]


def test_fresh_lora_is_the_identity_and_only_adapters_train(tiny_ckpt, prompt_tokenizer, images):
    model = load_policy(tiny_ckpt)
    pv, prompts = model.pixel_values(images), prompt_tokenizer(INSTRUCTIONS)
    before = model.generate(pv, prompts, greedy=True)
    apply_lora(model, LoRASettings(rank=4, alpha=8))
    after = model.generate(pv, prompts, greedy=True)
    torch.testing.assert_close(after.logits, before.logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    # Gradients reach every adapter that affects the output and the value head.
    _perturb(model)
    logp, _, values = model.evaluate_actions(pv, prompts, before.action_tokens)
    (logp.sum() + values.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert model.projector.fc1.lora_A["default"].weight.grad.abs().sum() > 0
    assert model.value_head.mlp[0].weight.grad.abs().sum() > 0


def test_adapter_round_trip_is_bit_exact(prompt_tokenizer, images):
    settings = LoRASettings(rank=4, alpha=8)
    src = apply_lora(build_tiny_policy(seed=0), settings)
    _perturb(src)
    blob = serialize_adapter(src, version=7)
    dst = apply_lora(build_tiny_policy(seed=0), settings)
    assert load_adapter(dst, blob) == 7
    a, b = trainable_state(src), trainable_state(dst)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pv, prompts = src.pixel_values(images), prompt_tokenizer(INSTRUCTIONS)
    assert torch.equal(
        src.generate(pv, prompts, greedy=True).logits, dst.generate(pv, prompts, greedy=True).logits
    )
    assert adapter_metadata(blob)["policy_version"] == "7"


def test_adapter_for_another_base_model_is_refused():
    blob = serialize_adapter(apply_lora(build_tiny_policy(), LoRASettings(rank=4)), 1)
    other = apply_lora(build_tiny_policy(tiny_config(hidden_size=32)), LoRASettings(rank=4))
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(other, blob)


def test_adapter_with_another_layout_is_refused_and_changes_nothing():
    blob = serialize_adapter(
        apply_lora(build_tiny_policy(), LoRASettings(rank=4, targets=["llm"])), 1
    )
    dst = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    before = {k: v.clone() for k, v in trainable_state(dst).items()}
    with pytest.raises(ValueError, match="LoRA layout"):
        load_adapter(dst, blob)
    assert all(torch.equal(before[k], v) for k, v in trainable_state(dst).items())


@pytest.mark.parametrize("blob", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{}", b"\xff" * 64])
def test_corrupt_adapter_blobs_are_clear_errors(blob):
    dst = apply_lora(build_tiny_policy(), LoRASettings(rank=4))
    with pytest.raises(ValueError, match="adapter"):
        load_adapter(dst, blob)


def test_bad_lora_settings():
    with pytest.raises(ValueError, match="unknown parts"):
        LoRASettings(targets=["llm", "head"])
    with pytest.raises(ValueError, match="rank"):
        LoRASettings(rank=0)
