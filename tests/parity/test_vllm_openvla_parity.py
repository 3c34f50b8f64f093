"""Checks our OpenVLA policy against vLLM's independent OpenVLAForActionPrediction.

A random full-size checkpoint (DINOv2 ViT-L/14 reg4 + SigLIP SO400M/14 towers, 2-layer Llama) is
run by both on the same images and prompts; the action logits at all 7 positions and the greedy
action tokens must agree. vLLM runs in a subprocess (its workers spawn, and it must have exited
before our copy of the 3 GB model is loaded).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_rl.models import (
    OpenVLAPolicy,
    PromptTokenizer,
    VLAConfig,
    default_norm_stats,
    load_policy,
    load_tokenizer,
    save_policy,
)
from vla_rl.models.config import DINO_MEAN, DINO_STD, tiny_text_config
from vla_rl.models.tiny import build_tiny_tokenizer

HELPER = Path(__file__).with_name("_vllm_openvla_logits.py")
INSTRUCTIONS = [
    "pick up the red cube",
    "push the blue block to the left",  # prompts of different lengths: left padding is exercised
    "open the drawer",
]

# vLLM's OpenVLA image processor (vllm/transformers_utils/processors/openvla.py) normalises with
# the ImageNet statistics rounded to bfloat16, as the released checkpoints' processor stored them,
# while we default to the exact values. Both sides must see the same pixels for a logit-level
# comparison, so our policy is given vLLM's constants here.
VLLM_DINO_MEAN = (0.484375, 0.455078125, 0.40625)
VLLM_DINO_STD = (0.228515625, 0.2236328125, 0.224609375)
VLLM_SIGLIP_MEAN = (0.5, 0.5, 0.5)
VLLM_SIGLIP_STD = (0.5, 0.5, 0.5)

# Both sides compute in float32 and agree to ~1e-6. The bf16 rounding of the ImageNet means alone
# moves the logits by ~5e-4, so a tolerance of 1e-3 or more could not see a preprocessing mismatch.
ATOL = 1e-4
MIN_LOGIT_SPREAD = 0.1


def vllm_import_error() -> str | None:
    """None if vLLM's LLM imports in a fresh interpreter, else the last line of its error."""
    probe = subprocess.run(
        [sys.executable, "-c", "from vllm import LLM, SamplingParams"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {probe.returncode}"


def write_random_checkpoint(path: Path, seed: int = 0) -> VLAConfig:
    """The default OpenVLA towers at full size and a 2-layer Llama, randomly initialised."""
    torch.manual_seed(seed)
    config = VLAConfig(
        text_config=tiny_text_config(hidden_size=256, layers=2, heads=4),
        timm_overrides=[{}, {}],
        norm_stats=default_norm_stats(),
        value_head_hidden=[64, 32],
    )
    model = OpenVLAPolicy(config).eval()
    # timm starts DINOv2's LayerScale at 1e-5, which would leave its blocks out of the features;
    # larger random scales make every block (and the .ls*.scale_factor renaming) count.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                param.uniform_(0.05, 0.3)
    save_policy(model, path, tokenizer=build_tiny_tokenizer())
    return config


def run_vllm(tmp_path: Path, checkpoint: Path, images: np.ndarray, prompt_ids, config) -> dict:
    """vLLM's greedy tokens [N, K] and raw action logits [N, K, n_bins], from a subprocess."""
    np.save(tmp_path / "images.npy", images)
    request = {
        "checkpoint": str(checkpoint),
        "images": str(tmp_path / "images.npy"),
        "prompt_token_ids": prompt_ids,
        "action_vocab_start": config.action_vocab_start,
        "action_vocab_end": config.action_vocab_end,
        "max_tokens": config.tokens_per_step,
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    output = tmp_path / "vllm_out.npz"
    try:
        proc = subprocess.run(
            [sys.executable, str(HELPER), str(tmp_path / "request.json"), str(output)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"vLLM subprocess timed out after 600 s; stderr tail:\n{stderr[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(
            f"vLLM subprocess failed (exit status {proc.returncode}); stderr tail:\n"
            f"{proc.stderr[-6000:]}"
        )
    with np.load(output) as data:
        return {
            "tokens": torch.from_numpy(data["tokens"]),
            "logits": torch.from_numpy(data["logits"]),
        }


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)
def test_openvla_matches_vllm(tmp_path):
    reason = vllm_import_error()
    if reason is not None:
        pytest.skip(f"vLLM is not usable here: {reason}")

    checkpoint = tmp_path / "checkpoint"
    config = write_random_checkpoint(checkpoint)
    gc.collect()  # the 3 GB model that wrote the checkpoint is gone before vLLM loads its copy

    prompt_tokenizer = PromptTokenizer(load_tokenizer(checkpoint))
    prompt_ids = [prompt_tokenizer.ids(text) for text in INSTRUCTIONS]
    assert all(ids[-1] == 29871 for ids in prompt_ids)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(INSTRUCTIONS), 224, 224, 3), dtype=np.uint8)

    reference = run_vllm(tmp_path, checkpoint, images, prompt_ids, config)
    ref_tokens, ref_logits = reference["tokens"], reference["logits"]
    K, n_bins = config.tokens_per_step, config.n_action_bins
    assert ref_tokens.shape == (len(INSTRUCTIONS), K)
    assert ref_logits.shape == (len(INSTRUCTIONS), K, n_bins)
    spread = ref_logits.std(dim=-1).min().item()
    assert spread > MIN_LOGIT_SPREAD, f"degenerate random logits (std over bins {spread:.3g})"

    policy = load_policy(checkpoint, dtype=torch.float32)
    policy.image_stats = (VLLM_DINO_MEAN, VLLM_DINO_STD, VLLM_SIGLIP_MEAN, VLLM_SIGLIP_STD)
    prompts = prompt_tokenizer(INSTRUCTIONS)
    with torch.inference_mode():
        pixel_values = policy.pixel_values(torch.from_numpy(images))
        # Teacher-forced on vLLM's tokens: position k is predicted after vLLM's first k tokens.
        logits, _ = policy.forward_actions(pixel_values, prompts, ref_tokens)
        decoded = policy.generate(pixel_values, prompts, greedy=True)

    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    diffs = {
        "forward_actions logits": max_abs_diff(logits, ref_logits),
        "forward_actions log-probs": max_abs_diff(torch.log_softmax(logits.double(), -1), ref_logp),
        "first position log-probs": max_abs_diff(
            torch.log_softmax(logits[:, 0].double(), -1), ref_logp[:, 0]
        ),
        "generate logits": max_abs_diff(decoded.logits, ref_logits),
    }
    print("\nmax |ours - vLLM|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for what, diff in diffs.items():
        assert diff < ATOL, f"{what} differ from vLLM's by {diff:.3g} (atol {ATOL})"
    first_id = config.action_vocab_start
    assert torch.equal(logits.argmax(-1) + first_id, ref_tokens)
    assert torch.equal(decoded.action_tokens, ref_tokens)

    # The tolerance must be able to tell the exact ImageNet statistics from vLLM's rounded ones.
    policy.image_stats = (DINO_MEAN, DINO_STD, VLLM_SIGLIP_MEAN, VLLM_SIGLIP_STD)
    with torch.inference_mode():
        exact_pixels = policy.pixel_values(torch.from_numpy(images[:1]))
        exact_logits, _ = policy.forward_actions(
            exact_pixels, prompt_tokenizer(INSTRUCTIONS[:1]), ref_tokens[:1]
        )
    unrounded_diff = max_abs_diff(exact_logits, ref_logits[:1])
    print(f"max |ours with exact ImageNet stats - vLLM| {unrounded_diff:.2e}")
    assert unrounded_diff > 2 * ATOL, "the tolerance is too loose to see a normalisation mismatch"
