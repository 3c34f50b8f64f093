"""The vLLM rollout engine against our torch OpenVLA policy, on a real vLLM CPU engine.

One engine serves the whole module (it takes ~30 s to start). Tests run in file order: the first
ones check the base checkpoint (version 0), later ones load adapters.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:  # `services` is a top-level folder, not an installed package
    sys.path.insert(0, REPO_ROOT)

from services.rollout_server.engines.base import AdapterError  # noqa: E402
from vla_rl.models import PromptTokenizer, load_policy, load_tokenizer, tiny_config  # noqa: E402
from vla_rl.models.lora import LoRASettings, apply_lora, serialize_adapter  # noqa: E402
from vla_rl.models.tiny import build_tiny_policy  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1200)]

# Prompts of different lengths: the torch policy left-pads, vLLM gets each prompt unpadded.
INSTRUCTIONS = [
    "pick up the red cube",
    "push the cube",
    "stack the red cube on the green cube",
    "open the drawer",
    "put the carrot on the plate",
    "move the blue block to the left",
    "close the drawer",
    "lift the spoon",
]
# Both sides compute in float32; observed differences are ~1e-6 (with and without LoRA).
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module", params=["merge", "lora"])
def engine(request, tiny_ckpt):
    """Both ways an adapter reaches vLLM: merged into its weights inside the workers (the
    default) and served as a vLLM LoRA. Every test below runs against each."""
    pytest.importorskip("vllm")
    from services.rollout_server.engines.vllm_engine import VLLMEngine

    # A token budget below one batch's prompts (8 x ~270) makes vLLM prefill them over several
    # steps shared with decoding: the case that breaks vLLM's LoRA embedding layer (see the
    # engine), exercised here on every call.
    eng = VLLMEngine(
        tiny_ckpt,
        kv_cache_memory_bytes=128 * 2**20,
        max_batch_size=16,
        max_num_batched_tokens=1024,
        weight_sync=request.param,
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """The torch policy on the same checkpoint, and its prompt tokenizer."""
    return load_policy(tiny_ckpt), PromptTokenizer(load_tokenizer(tiny_ckpt))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(len(INSTRUCTIONS), 224, 224, 3), dtype=np.uint8)


def torch_inputs(policy, prompt_tokenizer, images, instructions=INSTRUCTIONS):
    return policy.pixel_values(torch.from_numpy(images)), prompt_tokenizer(instructions)


def torch_logprobs(policy, prompt_tokenizer, images, tokens, temperature=1.0, top_k=0):
    """Log-probs of given action tokens under the sampling distribution, teacher-forced."""
    pv, prompts = torch_inputs(policy, prompt_tokenizer, images)
    tokens = torch.from_numpy(tokens)
    with torch.inference_mode():
        logits, _ = policy.forward_actions(pv, prompts, tokens)
    scaled = logits / temperature
    if top_k:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    index = tokens - policy.config.action_vocab_start
    return torch.log_softmax(scaled, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1).numpy()


def assert_greedy_matches(engine, policy, prompt_tokenizer, images):
    out = engine.act(images, INSTRUCTIONS, greedy=True)
    with torch.inference_mode():
        ref = policy.generate(*torch_inputs(policy, prompt_tokenizer, images), greedy=True)
    np.testing.assert_array_equal(out.action_tokens, ref.action_tokens.numpy())
    np.testing.assert_allclose(out.logprobs, ref.logprobs.numpy(), atol=LOGPROB_ATOL, rtol=0)
    return out


def test_oft_checkpoint_is_refused(tiny_oft_ckpt):
    from services.rollout_server.engines.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="torch engine"):
        VLLMEngine(tiny_oft_ckpt)


def test_greedy_matches_torch_policy(engine, reference, batch):
    policy, prompt_tokenizer = reference
    out = assert_greedy_matches(engine, policy, prompt_tokenizer, batch)
    assert out.action_tokens.dtype == np.int64 and out.logprobs.dtype == np.float32
    assert out.action_tokens.shape == (len(INSTRUCTIONS), 7)
    assert out.policy_version == 0 and engine.policy_version == 0
    assert engine.action_chunk == 1
    # Where the call spent its time, for benchmarks/engine_throughput.py.
    assert set(engine.last_act_seconds) == {"prompt_embeds", "generate"}
    assert all(s > 0 for s in engine.last_act_seconds.values())


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 20)])
def test_sampled_logprobs_match_torch_policy(engine, reference, batch, temperature, top_k):
    policy, prompt_tokenizer = reference
    out = engine.act(batch, INSTRUCTIONS, temperature=temperature, top_k=top_k, seed=1)
    expected = torch_logprobs(
        policy, prompt_tokenizer, batch, out.action_tokens, temperature, top_k
    )
    np.testing.assert_allclose(out.logprobs, expected, atol=LOGPROB_ATOL, rtol=0)
    # Every sampled token lies in the top-k of its position (else its log-prob would be -inf).
    assert np.isfinite(expected).all()
    # Sampling, not argmax: some tokens differ from the greedy ones.
    greedy = engine.act(batch, INSTRUCTIONS, greedy=True)
    assert (out.action_tokens != greedy.action_tokens).any()


def test_seed_makes_sampling_reproducible(engine, batch):
    a = engine.act(batch, INSTRUCTIONS, seed=123)
    b = engine.act(batch, INSTRUCTIONS, seed=123)
    c = engine.act(batch, INSTRUCTIONS, seed=124)
    np.testing.assert_array_equal(a.action_tokens, b.action_tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.action_tokens != c.action_tokens).any()
    # Two equal observations in one batch are still sampled independently.
    twice = np.concatenate([batch[:1]] * 4)
    d = engine.act(twice, [INSTRUCTIONS[0]] * 4, seed=5)
    assert len({tuple(row) for row in d.action_tokens}) > 1


@pytest.mark.parametrize(
    "images, instructions, kwargs, match",
    [
        (np.zeros((2, 224, 224, 3), np.float32), ["a", "b"], {}, "uint8"),
        (np.zeros((2, 112, 112, 3), np.uint8), ["a", "b"], {}, "shape"),
        (np.zeros((224, 224, 3), np.uint8), ["a"], {}, "shape"),
        (np.zeros((2, 224, 224, 3), np.uint8), ["pick up the cube"], {}, "2 images but 1"),
        (np.zeros((2, 224, 224, 3), np.uint8), ["pick up the cube", "  "], {}, "empty"),
        (np.zeros((0, 224, 224, 3), np.uint8), [], {}, "empty batch"),
        (np.zeros((1, 224, 224, 3), np.uint8), "pick", {}, "list of strings"),
        (np.zeros((1, 224, 224, 3), np.uint8), ["a"], {"temperature": 0.0}, "temperature"),
        (np.zeros((1, 224, 224, 3), np.uint8), ["a"], {"top_k": -1}, "top_k"),
    ],
)
def test_bad_inputs_raise_value_error(engine, images, instructions, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.act(images, instructions, **kwargs)


def trained_copy(tiny_ckpt, settings: LoRASettings, seed: int):
    """A torch policy with LoRA whose weights moved as training would move them."""
    policy = apply_lora(load_policy(tiny_ckpt), settings)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return policy


SETTINGS = LoRASettings(rank=4, alpha=8)


def test_adapter_switch_matches_torch_copy(engine, reference, batch, tiny_ckpt):
    _, prompt_tokenizer = reference
    base = engine.act(batch, INSTRUCTIONS, greedy=True)
    trained = trained_copy(tiny_ckpt, SETTINGS, seed=0)
    assert engine.load_adapter(serialize_adapter(trained, version=3)) == 3
    assert engine.policy_version == 3

    out = assert_greedy_matches(engine, trained, prompt_tokenizer, batch)
    assert out.policy_version == 3
    assert (out.action_tokens != base.action_tokens).any(), "the adapter changed nothing"
    sampled = engine.act(batch, INSTRUCTIONS, temperature=1.0, seed=2)
    expected = torch_logprobs(trained, prompt_tokenizer, batch, sampled.action_tokens)
    np.testing.assert_allclose(sampled.logprobs, expected, atol=LOGPROB_ATOL, rtol=0)

    # The LLM part alone is not enough: without the vision/projector LoRA the outputs differ.
    llm_only = trained_copy(tiny_ckpt, LoRASettings(rank=4, alpha=8, targets=["llm"]), seed=0)
    with torch.inference_mode():
        llm_only_logits, _ = llm_only.forward_actions(
            *torch_inputs(llm_only, prompt_tokenizer, batch), torch.from_numpy(out.action_tokens)
        )
        trained_logits, _ = trained.forward_actions(
            *torch_inputs(trained, prompt_tokenizer, batch), torch.from_numpy(out.action_tokens)
        )
    assert (llm_only_logits - trained_logits).abs().max() > 1e-2


def test_later_versions_replace_earlier_and_folders_stay_bounded(
    engine, reference, batch, tiny_ckpt
):
    _, prompt_tokenizer = reference
    for version, seed in ((4, 1), (5, 2), (6, 3)):
        trained = trained_copy(tiny_ckpt, SETTINGS, seed=seed)
        assert engine.load_adapter(serialize_adapter(trained, version=version)) == version
    assert engine.policy_version == 6
    assert_greedy_matches(engine, trained, prompt_tokenizer, batch)
    assert len(list(engine.work_dir.glob("adapter_*"))) <= 2

    # A version re-sent with other weights is served with the new weights (not vLLM's cache).
    retrained = trained_copy(tiny_ckpt, SETTINGS, seed=9)
    engine.load_adapter(serialize_adapter(retrained, version=6))
    assert_greedy_matches(engine, retrained, prompt_tokenizer, batch)


def test_bad_adapters_are_refused_and_the_old_version_kept(engine, batch):
    before = engine.act(batch, INSTRUCTIONS, greedy=True)
    version = engine.policy_version
    other_base = apply_lora(build_tiny_policy(tiny_config(hidden_size=32)), SETTINGS)
    other_rank = apply_lora(build_tiny_policy(), LoRASettings(rank=8, alpha=8))
    bad = {
        "different base model": serialize_adapter(other_base, version=99),
        "differ from the served": serialize_adapter(other_rank, version=99),
        "truncated|corrupt": serialize_adapter(other_rank, version=99)[:100],
        "not a vla-rl adapter": (8).to_bytes(8, "little") + b"{}      ",
    }
    for match, blob in bad.items():
        with pytest.raises(AdapterError, match=match):
            engine.load_adapter(blob)
    assert engine.policy_version == version
    after = engine.act(batch, INSTRUCTIONS, greedy=True)
    assert after.policy_version == version
    np.testing.assert_array_equal(after.action_tokens, before.action_tokens)
    np.testing.assert_array_equal(after.logprobs, before.logprobs)


def test_switch_is_atomic_for_concurrent_act(engine, reference, batch, tiny_ckpt):
    """Every act() result is exactly one version's output, and labelled with that version."""
    _, prompt_tokenizer = reference
    old = engine.act(batch, INSTRUCTIONS, greedy=True)
    trained = trained_copy(tiny_ckpt, SETTINGS, seed=11)
    with torch.inference_mode():
        new_ref = trained.generate(*torch_inputs(trained, prompt_tokenizer, batch), greedy=True)
    expected = {old.policy_version: old.action_tokens, 7: new_ref.action_tokens.numpy()}

    results, errors = [], []

    def keep_acting():
        try:
            for _ in range(6):
                results.append(engine.act(batch, INSTRUCTIONS, greedy=True))
        except Exception as e:  # surfaced below
            errors.append(e)

    worker = threading.Thread(target=keep_acting)
    worker.start()
    engine.load_adapter(serialize_adapter(trained, version=7))
    worker.join()
    assert not errors, errors
    results.append(engine.act(batch, INSTRUCTIONS, greedy=True))
    assert results[-1].policy_version == 7
    for r in results:
        np.testing.assert_array_equal(r.action_tokens, expected[r.policy_version])


def assert_still_served(engine, batch, before) -> None:
    """The engine serves the version and the actions of `before` (greedy), after a refusal."""
    after = engine.act(batch, INSTRUCTIONS, greedy=True)
    assert engine.policy_version == after.policy_version == before.policy_version
    np.testing.assert_array_equal(after.action_tokens, before.action_tokens)
    np.testing.assert_allclose(after.logprobs, before.logprobs, atol=LOGPROB_ATOL, rtol=0)


def test_a_switch_that_fails_inside_vllm_keeps_the_served_version(
    engine, reference, batch, tiny_ckpt, monkeypatch
):
    """A valid adapter whose LLM part vLLM cannot read (here: the staged file is cut short, as a
    full disk would leave it) is refused, and the version served before keeps being served with
    its own weights (the merge path merges it back)."""
    _, prompt_tokenizer = reference
    before = engine.act(batch, INSTRUCTIONS, greedy=True)
    version = engine.policy_version
    stage = type(engine)._write_peft_adapter

    def truncated(self, *args, **kwargs):
        folder = stage(self, *args, **kwargs)
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:64])
        return folder

    monkeypatch.setattr(type(engine), "_write_peft_adapter", truncated)
    trained = trained_copy(tiny_ckpt, SETTINGS, seed=21)
    with pytest.raises(AdapterError):
        engine.load_adapter(serialize_adapter(trained, version=version + 1))
    monkeypatch.undo()
    assert_still_served(engine, batch, before)
    # And the engine still takes the next good adapter.
    assert engine.load_adapter(serialize_adapter(trained, version=version + 1)) == version + 1
    assert_greedy_matches(engine, trained, prompt_tokenizer, batch)


def test_a_merge_that_fails_part_way_is_merged_back(engine, batch, tiny_ckpt, monkeypatch):
    """merge only: the staged LoRA lacks one tensor of the last layer, so vLLM's workers have
    already rewritten the earlier layers when the merge fails; the served version's weights
    are merged back before the refusal."""
    if engine._weight_sync != "merge":
        pytest.skip("vLLM's LoRA path does not write weights")
    from safetensors.torch import load_file, save_file

    before = engine.act(batch, INSTRUCTIONS, greedy=True)
    stage = type(engine)._write_peft_adapter

    def without_last_v_proj(self, *args, **kwargs):
        folder = stage(self, *args, **kwargs)
        weights = folder / "adapter_model.safetensors"
        tensors = load_file(weights)
        last = max(int(n.split(".layers.")[1].split(".")[0]) for n in tensors)
        del tensors[f"base_model.model.model.layers.{last}.self_attn.v_proj.lora_A.weight"]
        save_file(tensors, weights)
        return folder

    monkeypatch.setattr(type(engine), "_write_peft_adapter", without_last_v_proj)
    with pytest.raises(AdapterError, match="some of"):
        engine.load_adapter(serialize_adapter(trained_copy(tiny_ckpt, SETTINGS, seed=22), 99))
    assert_still_served(engine, batch, before)
