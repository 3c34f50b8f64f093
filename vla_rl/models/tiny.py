"""Tiny random OpenVLA-architecture checkpoints for tests, demos and CPU benchmarks.

Nothing can be downloaded here, so a small word-level tokenizer with Llama's id layout (BOS 1,
32000 ids, <PAD> 32000) stands in for Llama's SentencePiece model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import save_policy
from .config import VLAConfig, tiny_config
from .openvla import OpenVLAPolicy
from .processor import PromptTokenizer

_BASE_WORDS = (
    "in : what action should the robot take to ? out pick up push pull stack put place the "
    "a an cube red green blue yellow on onto of goal target region left right top bottom "
    "block plate bowl spoon carrot eggplant object move lift grasp open close drawer reach and "
    "gripper toward away from with then"
).split()


def build_tiny_tokenizer(extra_words: tuple[str, ...] = ()):
    """A fast word-level tokenizer with Llama's special ids and vocabulary size (32000)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in list(_BASE_WORDS) + [w.lower() for w in extra_words]:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < 32000:
        vocab.setdefault(f"<extra_{i}>", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"pad_token": "<PAD>"})  # id 32000, as in OpenVLA
    return fast


def build_tiny_policy(
    config: VLAConfig | None = None,
    seed: int = 0,
    ordinal_action_head: bool = True,
    *,
    ordinal_action_embeddings: bool = False,
    centred_action_head: bool = False,
) -> OpenVLAPolicy:
    """A random tiny policy.

    With `ordinal_action_head`, the lm_head rows of the action ids get a shared direction scaled
    by the bin's position, as a pretrained VLA's action embeddings are ordered (neighbouring bins
    are similar). Without it every bin is an unrelated random vector, and moving probability mass
    toward "x < 0" needs each of 128 bins to be sampled and reinforced separately, which no
    pretrained model has to do.

    Two more options make a random checkpoint start where a pretrained one does; the demo turns
    them on for autoregressive (OpenVLA) decoding, where without them the first action token
    starts pinned to one end of its range and every later token is conditioned on noise:

    - `centred_action_head`: the ordinal direction is made orthogonal to the hidden states that
      predict the action tokens (measured on a neutral input: a grey image and a generic
      instruction). A random LLM's hidden state at those positions hardly depends on the input,
      so its component along the ordinal direction tilts every observation's distribution the
      same way: P(x < 0) starts at 0.95 for every image with seed 0 (0.61, 0.94 for seeds 1, 2),
      and a policy pinned to one sign seldom samples the other, whose reward it must see to learn
      the image. Centred, every token starts near 0.5 (0.39 to 0.59 on the demo's images, seeds 0-3,
      5, 8).
    - `ordinal_action_embeddings`: the *input* embeddings of the action ids (which OpenVLA feeds
      back while decoding its 7 tokens) become one shared vector plus a small component along a
      direction scaled by the bin's position, as trained action embeddings are, instead of 256
      unrelated random vectors. With unrelated vectors each of the 6 sampled tokens before the
      gripper token swings its distribution at random (P(gripper < 0) varies with std 0.3 between
      samples of one prompt), and the instruction's signal is buried under that noise. OFT never
      embeds action ids (its slots are empty), so this changes nothing there.
    """
    torch.manual_seed(seed)
    model = OpenVLAPolicy(config or tiny_config()).eval()
    cfg = model.config
    with torch.no_grad():
        # transformers initialises embeddings with std 0.02 (norm ~0.16 at width 64): next to the
        # projected patches (norm ~0.7) the instruction is then almost invisible to a random
        # 2-layer LLM. Pretrained Llama embeddings are not that small; match the patches' scale.
        model.language_model.model.embed_tokens.weight.normal_(0.0, 0.1)
        if ordinal_action_embeddings:
            emb = model.language_model.model.embed_tokens.weight[
                cfg.action_vocab_start : cfg.action_vocab_end
            ]
            shared = emb[0].clone()
            # A generator of its own, so the other weights stay those of the default checkpoint.
            step = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(seed + 7))
            step *= shared.norm() / step.norm()
            position = torch.linspace(1.0, -1.0, emb.shape[0]).unsqueeze(1)
            emb.copy_(shared + 0.25 * position * step)  # ends of the range 25% apart from shared
    if ordinal_action_head:
        with torch.no_grad():
            rows = model.language_model.lm_head.weight[
                cfg.action_vocab_start : cfg.action_vocab_end
            ]
            direction = torch.randn(rows.shape[1]) / rows.shape[1] ** 0.5
            if centred_action_head:
                direction = _orthogonal_to(direction, _action_hidden_states(model))
            position = torch.linspace(1.0, -1.0, rows.shape[0]).unsqueeze(
                1
            )  # id order: x high->low
            rows.mul_(0.5).add_(2.0 * position * direction)
    return model


def _action_hidden_states(model: OpenVLAPolicy) -> torch.Tensor:
    """Final-norm hidden states [K, hidden] that the action logits are read from, for a neutral
    input: a grey image, a generic instruction and (OpenVLA) the middle bin as every earlier
    action token. They do not depend on lm_head."""
    cfg = model.config
    size = cfg.image_sizes[0]
    images = torch.full((1, size, size, 3), 128, dtype=torch.uint8)
    prompts = PromptTokenizer(build_tiny_tokenizer())(["pick up the object"])
    k = cfg.tokens_per_step
    earlier = torch.full((1, k), cfg.action_vocab_start + cfg.n_action_bins // 2)
    captured: list[torch.Tensor] = []
    hook = model.language_model.model.norm.register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    try:
        with torch.no_grad():
            model.forward_actions(model.pixel_values(images), prompts, earlier)
    finally:
        hook.remove()
    return captured[0][0, -k:].float()


def _orthogonal_to(direction: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`direction` without its components in the span of `hidden`'s rows, rescaled to its norm.
    (OFT's many slots hold nearly the same state: directions with a singular value under 1e-4 of
    the largest are left alone, so a few remain even when there are more slots than widths.)"""
    _, s, vh = torch.linalg.svd(hidden, full_matrices=False)
    basis = vh[s > 1e-4 * s[0]].T  # [hidden, rank]
    rest = direction - basis @ (basis.T @ direction)
    return rest * (direction.norm() / rest.norm())


def write_tiny_checkpoint(path: str | Path, config: VLAConfig | None = None, seed: int = 0) -> Path:
    """Write a random tiny checkpoint (config, weights, tokenizer) to `path`."""
    model = build_tiny_policy(config, seed)
    return save_policy(model, path, tokenizer=build_tiny_tokenizer())
