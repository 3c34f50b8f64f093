"""Turns instructions into left-padded OpenVLA prompt ids (BOS ... "Out:" + 29871)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .action_tokenizer import SPIECE_SPACE_ID, build_prompt
from .openvla import PromptBatch


class PromptTokenizer:
    """Wraps the checkpoint's Hugging Face tokenizer; caches ids per instruction (tasks repeat)."""

    def __init__(self, tokenizer, pad_token_id: int = 32000) -> None:
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.bos_token_id = tokenizer.bos_token_id
        if self.bos_token_id is None:
            raise ValueError("the checkpoint's tokenizer has no BOS token")
        self._cache: dict[str, list[int]] = {}

    def ids(self, instruction: str) -> list[int]:
        """Prompt ids for one instruction, as OpenVLA builds them."""
        cached = self._cache.get(instruction)
        if cached is not None:
            return cached
        ids = list(self.tokenizer(build_prompt(instruction), add_special_tokens=True)["input_ids"])
        if not ids or ids[0] != self.bos_token_id:
            ids = [self.bos_token_id] + ids
        # OpenVLA appends the bare-space piece after "Out:"; the first action token follows it.
        if ids[-1] != SPIECE_SPACE_ID:
            ids.append(SPIECE_SPACE_ID)
        self._cache[instruction] = ids
        return ids

    def __call__(self, instructions: Sequence[str]) -> PromptBatch:
        rows = [self.ids(text) for text in instructions]
        if not rows:
            raise ValueError("no instructions given")
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = True
        return PromptBatch(input_ids, mask)
