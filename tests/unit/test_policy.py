"""The policy core on tiny random checkpoints: decoding, padding, log-probs, values, checkpoints."""

import json

import pytest
import torch

from tests.conftest import INSTRUCTIONS
from vla_rl.models import (
    CheckpointError,
    aggregate_logprobs,
    load_policy,
    read_config,
    sample_action_tokens,
    save_policy,
)


@pytest.fixture(scope="module")
def policy(tiny_ckpt):
    return load_policy(tiny_ckpt)


@pytest.fixture(scope="module")
def oft_policy(tiny_oft_ckpt):
    return load_policy(tiny_oft_ckpt)


def test_logits_are_not_degenerate(policy, prompt_tokenizer, images):
    out = policy.generate(policy.pixel_values(images), prompt_tokenizer(INSTRUCTIONS), greedy=True)
    spread = out.logits.max(-1).values - out.logits.min(-1).values
    assert spread.min() > 0.05  # otherwise the equality tests below would prove nothing


@pytest.mark.parametrize("which", ["openvla", "oft"])
def test_greedy_decode_equals_argmax_of_full_forward(
    which, policy, oft_policy, prompt_tokenizer, images
):
    model = policy if which == "openvla" else oft_policy
    pv, prompts = model.pixel_values(images), prompt_tokenizer(INSTRUCTIONS)
    out = model.generate(pv, prompts, greedy=True)
    assert out.action_tokens.shape == (3, model.config.tokens_per_step)
    logits, values = model.forward_actions(pv, prompts, out.action_tokens)
    assert torch.equal(logits.argmax(-1) + 31744, out.action_tokens)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, out.values)


@pytest.mark.parametrize("which", ["openvla", "oft"])
def test_left_padding_does_not_change_a_row(which, policy, oft_policy, prompt_tokenizer, images):
    model = policy if which == "openvla" else oft_policy
    batch = model.generate(model.pixel_values(images), prompt_tokenizer(INSTRUCTIONS), greedy=True)
    for i, text in enumerate(INSTRUCTIONS):
        alone = model.generate(
            model.pixel_values(images[i : i + 1]), prompt_tokenizer([text]), greedy=True
        )
        torch.testing.assert_close(alone.logits, batch.logits[i : i + 1], atol=1e-4, rtol=1e-4)


def test_oft_action_slots_attend_bidirectionally(oft_policy, prompt_tokenizer, images):
    """Perturbing the last slot's input must change the first slot's logits (not so if causal)."""
    model = oft_policy
    pv, prompts = model.pixel_values(images[:1]), prompt_tokenizer(INSTRUCTIONS[:1])
    embeds, mask = model._prompt_embeddings(model.embed_images(pv), prompts)
    K = model.config.tokens_per_step
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, K + 1)], 1)
    slots = torch.zeros(1, K, embeds.shape[-1])
    attn = model._parallel_mask(mask, K)
    with torch.no_grad():
        base = model._llm(torch.cat([embeds, slots], 1), attn, pos).last_hidden_state
        slots[:, -1] = 1.0
        moved = model._llm(torch.cat([embeds, slots], 1), attn, pos).last_hidden_state
    Lp = embeds.shape[1]
    assert (moved[:, Lp] - base[:, Lp]).abs().max() > 1e-4
    torch.testing.assert_close(moved[:, :Lp], base[:, :Lp])  # the prompt never sees the slots


def test_sampled_logprobs_match_evaluate_actions(policy, prompt_tokenizer, images):
    pv, prompts = policy.pixel_values(images), prompt_tokenizer(INSTRUCTIONS)
    g = torch.Generator().manual_seed(0)
    out = policy.generate(pv, prompts, temperature=1.3, generator=g)
    logp, ent, values = policy.evaluate_actions(pv, prompts, out.action_tokens, temperature=1.3)
    torch.testing.assert_close(logp, out.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, out.entropy, atol=1e-5, rtol=1e-5)
    assert values.shape == (3,)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    idx, logp, ent = sample_action_tokens(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=4).float() / idx.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)
    idx, _, _ = sample_action_tokens(
        logits[:100], top_k=2, generator=torch.Generator().manual_seed(0)
    )
    assert set(idx.tolist()) <= {1, 2}


def test_logprob_levels():
    tok = torch.arange(2 * 14, dtype=torch.float).view(2, 14)
    assert aggregate_logprobs(tok, 7, "action").shape == (2, 2)
    torch.testing.assert_close(aggregate_logprobs(tok, 7, "chunk"), tok.sum(-1))
    with pytest.raises(ValueError):
        aggregate_logprobs(tok, 7, "episode")


def test_bad_images_are_clear_errors(policy):
    with pytest.raises(ValueError, match="uint8"):
        policy.pixel_values(torch.zeros(1, 224, 224, 3))
    with pytest.raises(ValueError, match="224x224"):
        policy.pixel_values(torch.zeros(1, 128, 128, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        policy.pixel_values(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


def test_checkpoint_layout_and_round_trip(policy, tiny_ckpt, tmp_path, prompt_tokenizer, images):
    from safetensors import safe_open

    with safe_open(str(tiny_ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in names
    assert any(n.startswith("vision_backbone.fused_featurizer.") for n in names)
    assert {"projector.fc1.weight", "projector.fc3.bias", "language_model.lm_head.weight"} <= names
    assert not any("value_head" in n or ".gamma" in n for n in names)
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    assert raw["model_type"] == "openvla" and raw["n_action_bins"] == 256
    assert raw["text_config"]["vocab_size"] == 32064

    save_policy(policy, tmp_path / "again")
    again = load_policy(tmp_path / "again")
    base = [(n, t) for n, t in policy.state_dict().items() if not n.startswith("value_head.")]
    loaded = [(n, t) for n, t in again.state_dict().items() if not n.startswith("value_head.")]
    assert [n for n, _ in base] == [n for n, _ in loaded]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(base, loaded, strict=True))


def test_real_openvla_config_keys_load(tiny_ckpt):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    raw.pop("vla_rl")
    raw.update(
        {
            "vision_backbone_id": "dinosiglip-vit-so-224px",
            "arch_specifier": "no-align+fused-gelu-mlp",
        }
    )
    (tiny_ckpt.parent / "cfg_only").mkdir(exist_ok=True)
    (tiny_ckpt.parent / "cfg_only" / "config.json").write_text(json.dumps(raw))
    cfg = read_config(tiny_ckpt.parent / "cfg_only")
    assert cfg.extra["arch_specifier"] == "no-align+fused-gelu-mlp"
    assert cfg.decoding == "autoregressive" and cfg.action_chunk == 1
    assert cfg.to_hf_dict()["vision_backbone_id"] == "dinosiglip-vit-so-224px"


def test_checkpoint_errors_are_one_clear_line(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_policy(tmp_path / "empty")
    bad = tmp_path / "no_weights"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_policy(bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_policy(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_policy(bad)


def test_missing_and_misshapen_weights(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_ckpt / "model.safetensors"))
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    partial = dict(state)
    partial.pop("projector.fc2.weight")
    save_file(partial, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 weight\(s\) missing.*projector.fc2.weight"):
        load_policy(d)
    wrong = dict(state)
    wrong["projector.fc2.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="projector.fc2.weight has shape"):
        load_policy(d)


def test_sharded_checkpoint_loads(policy, tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_ckpt / "model.safetensors"))
    names = sorted(state)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(d / fname))
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_policy(d)
    for (_, a), (_, b) in zip(
        policy.language_model.state_dict().items(),
        loaded.language_model.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_image_statistics_come_from_preprocessor_config(tiny_ckpt, tmp_path):
    model = load_policy(tiny_ckpt)
    assert model.image_stats[0] == (0.485, 0.456, 0.406)
    bf16_means = [[0.484375, 0.455078125, 0.40625], [0.5, 0.5, 0.5]]
    model.image_stats = (tuple(bf16_means[0]), (0.23, 0.22, 0.22), (0.5,) * 3, (0.5,) * 3)
    save_policy(model, tmp_path / "stats")
    assert load_policy(tmp_path / "stats").image_stats[0] == tuple(bf16_means[0])
    (tmp_path / "stats" / "preprocessor_config.json").write_text('{"means": [[1, 2]]}')
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_policy(tmp_path / "stats")
