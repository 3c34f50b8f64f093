"""OpenVLA's action tokenizer: continuous actions <-> the last 256 ids of Llama's vocabulary.

Follows the released OpenVLA convention exactly so that real checkpoints decode correctly:
`n_bins` uniform edges over [-1, 1], `bin = digitize(a, edges)` in 1..n_bins, token id =
vocab_end - bin (ids 31744..31999 for Llama); decoding maps an id to the centre of its bin
(n_bins - 1 centres; the top edge shares the last centre).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class ActionTokenizer:
    """Maps normalised actions in [-1, 1] to token ids and back."""

    vocab_end: int = 32000
    """One past the last action id (Llama's unpadded vocabulary size)."""
    n_bins: int = 256
    """Number of bin edges (OpenVLA: 256)."""
    action_dim: int = 7
    """Action dimensions per step."""

    @property
    def first_id(self) -> int:
        return self.vocab_end - self.n_bins

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-1.0, 1.0, self.n_bins)

    @property
    def centres(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2.0

    @property
    def bin_width(self) -> float:
        return 2.0 / (self.n_bins - 1)

    def _check(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim == 0 or actions.shape[-1] != self.action_dim:
            raise ValueError(
                f"actions must have last dimension {self.action_dim}, got shape {actions.shape}"
            )
        if not np.all(np.isfinite(actions)):
            raise ValueError("actions contain NaN or inf")
        return actions

    def encode(self, normalized_actions: np.ndarray) -> np.ndarray:
        """[..., action_dim] floats in [-1, 1] (clipped) -> [..., action_dim] int64 token ids."""
        a = np.clip(self._check(normalized_actions), -1.0, 1.0)
        bins = np.digitize(a, self.edges)  # 1..n_bins
        return (self.vocab_end - bins).astype(np.int64)

    def decode(self, token_ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """[..., action_dim] token ids -> [..., action_dim] bin centres in [-1, 1]."""
        ids = np.asarray(token_ids.cpu() if torch.is_tensor(token_ids) else token_ids)
        if ids.ndim == 0 or ids.shape[-1] != self.action_dim:
            raise ValueError(
                f"token ids must have last dimension {self.action_dim}, got shape {ids.shape}"
            )
        if np.any(ids < self.first_id) or np.any(ids >= self.vocab_end):
            raise ValueError(
                f"token ids outside the action range [{self.first_id}, {self.vocab_end})"
            )
        index = np.clip(self.vocab_end - ids - 1, 0, self.n_bins - 2)
        return self.centres[index]

    # Convenience for model code that works with indices into the restricted 256-way softmax.
    def ids_from_index(self, index: torch.Tensor) -> torch.Tensor:
        return index + self.first_id

    def index_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.first_id


@dataclass(frozen=True)
class ActionNormalizer:
    """OpenVLA's q01/q99 un-normalisation with a per-dimension mask (mask False passes through)."""

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_norm_stats(
        cls, norm_stats: Mapping[str, Any], unnorm_key: str | None
    ) -> ActionNormalizer:
        if not norm_stats:
            raise ValueError("checkpoint has no norm_stats; cannot un-normalise actions")
        if unnorm_key is None:
            if len(norm_stats) != 1:
                raise ValueError(
                    f"unnorm_key is required: the checkpoint has statistics for {sorted(norm_stats)}"
                )
            unnorm_key = next(iter(norm_stats))
        if unnorm_key not in norm_stats:
            raise ValueError(f"unnorm_key {unnorm_key!r} not in norm_stats {sorted(norm_stats)}")
        stats = norm_stats[unnorm_key]["action"]
        q01 = np.asarray(stats["q01"], dtype=np.float64)
        q99 = np.asarray(stats["q99"], dtype=np.float64)
        mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        if not (q01.shape == q99.shape == mask.shape) or q01.ndim != 1:
            raise ValueError(f"norm_stats[{unnorm_key!r}] has inconsistent q01/q99/mask shapes")
        return cls(q01, q99, mask)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """[..., D] in [-1, 1] -> [..., D] robot actions."""
        n = np.asarray(normalized, dtype=np.float64)
        if n.shape[-1] != self.q01.shape[0]:
            raise ValueError(
                f"actions have {n.shape[-1]} dims, norm_stats have {self.q01.shape[0]}"
            )
        scaled = 0.5 * (n + 1.0) * (self.q99 - self.q01) + self.q01
        return np.where(self.mask, scaled, n)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """Inverse of `unnormalize` (clipped to [-1, 1] on masked dims)."""
        a = np.asarray(actions, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError("actions contain NaN or inf")
        span = np.where(self.q99 - self.q01 == 0, 1.0, self.q99 - self.q01)
        scaled = np.clip(2.0 * (a - self.q01) / span - 1.0, -1.0, 1.0)
        return np.where(self.mask, scaled, a)


PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
# Llama's SentencePiece id of the bare "▁" piece; OpenVLA appends it after "Out:" when the tokenizer
# did not already, and the action tokens follow it.
SPIECE_SPACE_ID = 29871


def build_prompt(instruction: str) -> str:
    """The OpenVLA prompt for one instruction (lower-cased, as in OpenVLA's own pipeline)."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
    return PROMPT_TEMPLATE.format(instruction=instruction.strip().lower())
