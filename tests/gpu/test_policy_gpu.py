"""The policy core on a CUDA GPU in bf16 (skipped where no GPU is present)."""

import pytest
import torch

from tests.conftest import INSTRUCTIONS
from vla_rl.models import load_policy
from vla_rl.models.lora import (
    LoRASettings,
    apply_lora,
    load_adapter,
    serialize_adapter,
    trainable_state,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_oft_ckpt"])
def test_bf16_cuda_matches_fp32_cpu(ckpt, request, prompt_tokenizer, images):
    path = request.getfixturevalue(ckpt)
    cpu = load_policy(path)
    gpu = load_policy(path, dtype=torch.bfloat16, device="cuda")
    prompts = prompt_tokenizer(INSTRUCTIONS)
    ref = cpu.generate(cpu.pixel_values(images), prompts, greedy=True)
    # Teacher-force the CPU's tokens on both, so one bf16 near-tie cannot change the rest of the
    # sequence; bf16 keeps ~3 significant digits and the logits must agree to that precision.
    logits, values = gpu.forward_actions(gpu.pixel_values(images), prompts, ref.action_tokens)
    torch.testing.assert_close(logits.cpu(), ref.logits, atol=0.05, rtol=0.05)
    torch.testing.assert_close(values.cpu(), ref.values, atol=0.05, rtol=0.05)
    out = gpu.generate(gpu.pixel_values(images), prompts, greedy=True)
    again, _ = gpu.forward_actions(gpu.pixel_values(images), prompts, out.action_tokens)
    assert torch.equal(again.argmax(-1).cpu() + 31744, out.action_tokens.cpu())


def test_adapter_moves_between_devices_bit_exact(tiny_ckpt):
    src = apply_lora(load_policy(tiny_ckpt, device="cuda"), LoRASettings(rank=4))
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.add_(0.01)
    dst = apply_lora(load_policy(tiny_ckpt), LoRASettings(rank=4))
    load_adapter(dst, serialize_adapter(src, 2))
    a, b = trainable_state(src), trainable_state(dst)
    assert all(torch.equal(a[k].cpu(), b[k]) for k in a)
