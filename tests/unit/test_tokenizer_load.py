"""load_tokenizer: the checkpoint's tokenizer without AutoConfig's 'model of type openvla' warning."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager

import pytest

from vla_rl.models import load_tokenizer
from vla_rl.models.checkpoint import CheckpointError

NOTICE = "instantiate a model of type"
PROMPT = "In: What action should the robot take to pick up the red cube?\nOut:"


@contextmanager
def transformers_warnings():
    """Warnings logged by transformers. Its loggers do not propagate to the root logger (so
    pytest's caplog does not see them): a handler goes on the library's own root logger."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("transformers")
    handler = Collect(level=logging.WARNING)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records]


def test_the_capture_sees_transformers_warnings():
    from transformers.utils import logging as hf_logging

    with transformers_warnings() as records:
        hf_logging.get_logger("transformers.configuration_utils").warning(f"probe {NOTICE}")
    assert any(NOTICE in m for m in _messages(records))


def test_tiny_checkpoint_tokenizer_loads_without_the_model_type_notice(tiny_ckpt, tiny_tokenizer):
    with transformers_warnings() as records:
        tok = load_tokenizer(tiny_ckpt)
    assert not [m for m in _messages(records) if NOTICE in m], _messages(records)
    assert tok(PROMPT).input_ids == tiny_tokenizer(PROMPT).input_ids
    assert tok.pad_token_id == 32000 and tok.bos_token_id == 1 and len(tok) == 32001


def _llama_files(dst, sp_model, with_tokenizer_json: bool):
    """The tokenizer files of a released OpenVLA checkpoint (tokenizer_config.json naming
    LlamaTokenizer, tokenizer.model, optionally tokenizer.json) next to its config.json."""
    from transformers import LlamaTokenizer

    dst.mkdir()
    shutil.copy(sp_model, dst / "tokenizer.model")
    (dst / "config.json").write_text(
        json.dumps({"model_type": "openvla", "architectures": ["OpenVLAForActionPrediction"]})
    )
    (dst / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "legacy": False,
                "model_max_length": 2048,
                "auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
                "processor_class": "PrismaticProcessor",
            }
        )
    )
    if with_tokenizer_json:
        tmp = dst.parent / f"{dst.name}_save"
        LlamaTokenizer.from_pretrained(str(dst)).save_pretrained(str(tmp))
        shutil.copy(tmp / "tokenizer.json", dst / "tokenizer.json")
    return dst


@pytest.mark.parametrize("with_tokenizer_json", [False, True])
def test_llama_tokenizer_files_load_as_llama_without_the_notice(tmp_path, with_tokenizer_json):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "in: what action should the robot take to pick up the red cube? out:\n"
        "push the blue cube onto the target\nstack the red cube on top of the green cube\n" * 20
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        minloglevel=2,
    )
    ckpt = _llama_files(tmp_path / "ckpt", tmp_path / "sp.model", with_tokenizer_json)
    with transformers_warnings() as records:
        tok = load_tokenizer(ckpt)
    assert not [m for m in _messages(records) if NOTICE in m], _messages(records)
    assert type(tok).__name__ == "LlamaTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    text = "what action should the robot take to pick up the red cube?"
    assert tok(text).input_ids == [1, *sp.encode(text)]


def test_missing_or_unknown_tokenizer_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "openvla"}))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTok"}))
    with pytest.raises(CheckpointError, match="NoSuchTok"):
        load_tokenizer(tmp_path)
