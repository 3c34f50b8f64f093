"""The pure-PyTorch engine: our OpenVLAPolicy (batched prefill + cached decode, or OFT's single
parallel pass) on CPU or GPU. It is the numerical reference and the only engine for OFT."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from vla_rl.models import PromptTokenizer, load_policy, load_tokenizer
from vla_rl.models.lora import (
    LoRASettings,
    adapter_metadata,
    apply_lora,
    base_fingerprint,
    check_adapter_fits,
    load_adapter,
)

from .base import AdapterError, Engine, EngineOutput, validate_batch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine(Engine):
    name = "torch"

    def __init__(
        self, checkpoint_dir: str | Path, *, device: str = "cpu", precision: str = "fp32"
    ) -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        self.device = torch.device(device)
        self.policy = load_policy(checkpoint_dir, dtype=_DTYPES[precision], device=self.device)
        self.policy.eval()
        self.prompts = PromptTokenizer(load_tokenizer(checkpoint_dir))
        self.image_size = int(self.policy.config.image_sizes[0])
        # One lock for forwards and adapter swaps: a swap never lands in the middle of a batch.
        self._lock = threading.Lock()
        self._version = 0

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def action_chunk(self) -> int:
        return int(self.policy.config.action_chunk)

    @torch.inference_mode()
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
        validate_batch(images, instructions, self.image_size, temperature, top_k, greedy)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        prompts = self.prompts(instructions)
        with self._lock:
            pixels = self.policy.pixel_values(torch.from_numpy(images).to(self.device))
            out = self.policy.generate(pixels, prompts, temperature, top_k, greedy, generator)
            version = self._version
        return EngineOutput(
            out.action_tokens.cpu().numpy().astype(np.int64),
            out.logprobs.float().cpu().numpy(),
            version,
        )

    def load_adapter(self, blob: bytes) -> int:
        try:
            meta = adapter_metadata(blob)
            lora = LoRASettings(**_lora_fields(meta))
            incoming = int(meta["policy_version"])
        except (ValueError, TypeError, KeyError) as e:
            raise AdapterError(str(e)) from e
        with self._lock:
            if incoming <= self._version:
                raise AdapterError(
                    f"adapter version {incoming} is not newer than the served {self._version}"
                )
            current = getattr(self.policy, "lora_settings", None)
            if current is None:
                # The first adapter decides the LoRA layout: the blob must hold exactly its
                # tensors before any is injected (a refused blob used to leave its LoRA behind).
                try:
                    check_adapter_fits(self.policy, blob, lora)
                    if meta.get("base_fingerprint") != base_fingerprint(self.policy):
                        raise ValueError("adapter was trained for a different base model")
                except ValueError as e:
                    raise AdapterError(str(e)) from e
                apply_lora(self.policy, lora)
                self.policy.to(self.device)
            elif (current.rank, current.alpha, sorted(current.targets)) != (
                lora.rank,
                lora.alpha,
                sorted(lora.targets),
            ):
                raise AdapterError(
                    f"adapter LoRA {lora.rank}/{lora.alpha}/{lora.targets} differs from the "
                    f"served {current.rank}/{current.alpha}/{current.targets}"
                )
            try:
                version = load_adapter(self.policy, blob)
            except ValueError as e:
                raise AdapterError(str(e)) from e
            self._version = version
        return version


def _lora_fields(meta: dict[str, str]) -> dict:
    fields = json.loads(meta["lora"])
    return {k: fields[k] for k in ("rank", "alpha", "targets")}
