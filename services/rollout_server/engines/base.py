"""The interface every rollout engine implements (torch, vllm).

An engine holds the base policy, the current adapter and its version; it turns a batch of camera
images and instructions into sampled action tokens with the behaviour log-probs of the sampling
distribution (temperature and top-k applied, restricted to the 256 action ids).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from vla_rl.rpc import MAX_TEMPERATURE, MIN_TEMPERATURE, temperature_in_range


@dataclass
class EngineOutput:
    action_tokens: np.ndarray
    """int64 [B, K]: vocabulary ids of the sampled action tokens, K = 7 * action_chunk."""
    logprobs: np.ndarray
    """float32 [B, K]: log-probability of each sampled token under the sampling distribution."""
    policy_version: int
    """Version of the adapter that produced these tokens (0 = the base checkpoint)."""


class AdapterError(ValueError):
    """An adapter that does not fit the engine's base model or is malformed."""


class Engine(ABC):
    """A batched action sampler for one policy checkpoint."""

    name: str = "engine"

    @property
    @abstractmethod
    def policy_version(self) -> int:
        """Version of the adapter currently served."""

    @property
    @abstractmethod
    def action_chunk(self) -> int:
        """Actions per decision (1 for OpenVLA, C for OpenVLA-OFT)."""

    @abstractmethod
    def act(
        self,
        images: np.ndarray,
        instructions: list[str],
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        seed: int | None = None,
    ) -> EngineOutput:
        """images uint8 [B, 224, 224, 3], instructions [B] -> sampled action tokens.

        Raises ValueError on malformed input (wrong shape/dtype, empty instruction).
        """

    @abstractmethod
    def load_adapter(self, blob: bytes) -> int:
        """Validate a serialised adapter (vla_rl.models.lora.serialize_adapter), then switch to it
        atomically: calls to act() that started before see the old weights, later ones the new.
        Returns the new policy version. Raises AdapterError without changing anything."""

    def close(self) -> None:  # noqa: B027 - engines without resources need not override it
        """Release the engine's resources."""


MAX_INSTRUCTION_CHARS = 1000


def validate_batch(
    images: np.ndarray,
    instructions: list[str],
    image_size: int,
    temperature: float,
    top_k: int,
    greedy: bool,
) -> None:
    """Raise ValueError naming what is wrong with an Act batch; every engine checks the same."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise ValueError(
            f"images must have shape [B, {image_size}, {image_size}, 3], got {list(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("the batch is empty")
    if len(instructions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
    for i, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instruction {i} is empty")
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise ValueError(f"instruction {i} is longer than {MAX_INSTRUCTION_CHARS} characters")
    if not greedy and not temperature_in_range(temperature):
        # greedy=true is the way to ask for the argmax.
        raise ValueError(
            f"temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] when sampling "
            f"(greedy=true for the argmax), got {temperature}"
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
