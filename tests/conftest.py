"""Shared fixtures: tiny random checkpoints written to a temporary directory."""

from __future__ import annotations

import pytest
import torch

from vla_rl.models import PromptTokenizer, tiny_config
from vla_rl.models.tiny import build_tiny_tokenizer, write_tiny_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def prompt_tokenizer(tiny_tokenizer):
    return PromptTokenizer(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_openvla"), tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_oft_ckpt(tmp_path_factory):
    cfg = tiny_config(decoding="parallel", action_chunk=8)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_oft"), cfg, seed=1)


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=g)


INSTRUCTIONS = ["pick up the red cube", "push the cube", "stack the red cube on the green cube"]
