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
    config: VLAConfig | None = None, seed: int = 0, ordinal_action_head: bool = True
) -> OpenVLAPolicy:
    """A random tiny policy.

    With `ordinal_action_head`, the lm_head rows of the action ids get a shared direction scaled
    by the bin's position, as a pretrained VLA's action embeddings are ordered (neighbouring bins
    are similar). Without it every bin is an unrelated random vector, and moving probability mass
    toward "x < 0" needs each of 128 bins to be sampled and reinforced separately, which no
    pretrained model has to do.
    """
    torch.manual_seed(seed)
    model = OpenVLAPolicy(config or tiny_config()).eval()
    with torch.no_grad():
        # transformers initialises embeddings with std 0.02 (norm ~0.16 at width 64): next to the
        # projected patches (norm ~0.7) the instruction is then almost invisible to a random
        # 2-layer LLM. Pretrained Llama embeddings are not that small; match the patches' scale.
        model.language_model.model.embed_tokens.weight.normal_(0.0, 0.1)
    if ordinal_action_head:
        cfg = model.config
        with torch.no_grad():
            rows = model.language_model.lm_head.weight[
                cfg.action_vocab_start : cfg.action_vocab_end
            ]
            direction = torch.randn(rows.shape[1]) / rows.shape[1] ** 0.5
            position = torch.linspace(1.0, -1.0, rows.shape[0]).unsqueeze(
                1
            )  # id order: x high->low
            rows.mul_(0.5).add_(2.0 * position * direction)
    return model


def write_tiny_checkpoint(path: str | Path, config: VLAConfig | None = None, seed: int = 0) -> Path:
    """Write a random tiny checkpoint (config, weights, tokenizer) to `path`."""
    model = build_tiny_policy(config, seed)
    return save_policy(model, path, tokenizer=build_tiny_tokenizer())
