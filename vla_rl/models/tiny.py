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
    "block plate bowl spoon carrot eggplant object move lift grasp open close drawer"
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


def build_tiny_policy(config: VLAConfig | None = None, seed: int = 0) -> OpenVLAPolicy:
    """A random tiny policy; weights are scaled so that logits are not degenerate."""
    torch.manual_seed(seed)
    return OpenVLAPolicy(config or tiny_config()).eval()


def write_tiny_checkpoint(path: str | Path, config: VLAConfig | None = None, seed: int = 0) -> Path:
    """Write a random tiny checkpoint (config, weights, tokenizer) to `path`."""
    model = build_tiny_policy(config, seed)
    return save_policy(model, path, tokenizer=build_tiny_tokenizer())
