"""Rollout engine whose LLM backbone runs in vLLM; the vision towers and projector run in torch.

The torch side turns images + instructions into prompt embeddings (BOS, 256 projected patches, the
prompt tokens), vLLM decodes the 7 action tokens from them (`enable_prompt_embeds`), restricted to
the 256 action ids, and reports the log-probs of the sampling distribution. An adapter's LLM LoRA
reaches vLLM in one of two ways (`weight_sync`): 'merge' (default) merges it into the LLM's
weights inside vLLM's workers (vllm_merge.py: no LoRA kernels at all; a copy of the base weights
of the LoRA's layers is kept beside the model, about 2 bytes per LLM parameter in bf16), 'lora'
hands it to vLLM as a peft folder (one LoRARequest per version, on the decoder's linear layers
only: with the LM head too it crashed vLLM's engine on the GPU together with prompt embeddings).
Its vision / projector LoRA and value head are copied into the torch modules. OpenVLA only: vLLM
decodes causally, OFT does not.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file
from torch import nn

from services.rollout_server.engines.base import AdapterError, Engine, EngineOutput
from vla_rl.config.schema import WEIGHT_SYNCS, RolloutConfig
from vla_rl.models import PromptTokenizer, load_policy, load_tokenizer, read_config
from vla_rl.models.lora import (
    LLM_TARGETS,
    LoRASettings,
    adapter_metadata,
    apply_lora,
    base_fingerprint,
    lora_target_names,
    trainable_state,
)

_LLM_PREFIX = "language_model."
_LLM_LAYERS = "language_model.model.layers."
_PEFT_ADAPTER = "default"  # peft's adapter name in parameter names (…q_proj.lora_A.default.weight)
_KEPT_ADAPTER_DIRS = 2
_MERGE_EXTENSION = "services.rollout_server.engines.vllm_merge.MergeLoRAExtension"


@dataclass(frozen=True)
class _ServedAdapter:
    """What act() reads under the lock: the version and the vLLM LoRA to decode with."""

    policy_version: int
    lora_request: object | None  # vllm.lora.request.LoRARequest; None = the base LLM
    folder: Path | None


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _vllm_dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if dtype not in names:
        raise ValueError(f"vLLM supports float32, bfloat16 and float16, not {dtype}")
    return names[dtype]


def _llm_lora_shapes(text_config: dict, rank: int) -> dict[str, tuple[int, ...]]:
    """Expected LLM LoRA tensors of our adapter blob (names as in the torch policy) and shapes."""
    hidden = int(text_config["hidden_size"])
    inter = int(text_config["intermediate_size"])
    heads = int(text_config["num_attention_heads"])
    kv_heads = int(text_config.get("num_key_value_heads") or heads)
    head_dim = int(text_config.get("head_dim") or hidden // heads)
    io = {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    assert {m.rsplit(".", 1)[-1] for m in io} == set(LLM_TARGETS)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(int(text_config["num_hidden_layers"])):
        for module, (fan_in, fan_out) in io.items():
            name = f"{_LLM_LAYERS}{layer}.{module}"
            shapes[f"{name}.lora_A.{_PEFT_ADAPTER}.weight"] = (rank, fan_in)
            shapes[f"{name}.lora_B.{_PEFT_ADAPTER}.weight"] = (fan_out, rank)
    return shapes


def _peft_name(name: str) -> str:
    """language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight ->
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (vLLM's LoRA loader)."""
    return "base_model.model." + name[len(_LLM_PREFIX) :].replace(f".{_PEFT_ADAPTER}.", ".")


class VLLMEngine(Engine):
    """OpenVLA rollouts with vLLM decoding the LLM backbone (see the module docstring).

    Build it under `if __name__ == "__main__":` in scripts: vLLM spawns its engine process.
    """

    name = "vllm"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = torch.float32,
        gpu_memory_utilization: float = RolloutConfig.gpu_memory_utilization,
        kv_cache_memory_bytes: int | None = None,
        max_batch_size: int = RolloutConfig.max_batch_size,
        max_model_len: int = 512,
        max_num_batched_tokens: int | None = None,
        max_lora_rank: int = 64,
        enforce_eager: bool = True,
        work_dir: str | Path | None = None,
        seed: int = 0,
        weight_sync: str = "merge",
    ) -> None:
        """
        Args:
            checkpoint_dir: an OpenVLA checkpoint in the HF layout (vla_rl.models.checkpoint).
            device: where the torch side (vision towers, projector, embeddings) runs.
            dtype: weights and activations of both sides (float32 on CPU).
            gpu_memory_utilization: vLLM's memory share; on the CPU backend, of host memory.
            kv_cache_memory_bytes: an explicit KV-cache size; overrides gpu_memory_utilization
                and, with enforce_eager, skips vLLM's warm-up (much faster start on CPU).
            max_batch_size: most sequences vLLM decodes at once (larger act() batches queue).
            max_num_batched_tokens: vLLM's token budget per step (None: vLLM's default), at
                least max_model_len; prompts beyond it wait for later steps.
            max_model_len: longest prompt + 7 action tokens, in positions.
            max_lora_rank: largest LoRA rank an adapter may have (one of vLLM's sizes: 8 … 512).
            work_dir: where the exported LLM and adapter folders go; a temporary directory
                (removed by close()) if None.
            seed: vLLM's global seed (for act() calls without a seed).
            weight_sync: 'merge' (the LLM LoRA merged into vLLM's weights) or 'lora' (served
                as a vLLM LoRA): see the module docstring.
        """
        if weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"weight_sync must be one of {WEIGHT_SYNCS}, got {weight_sync!r}")
        config = read_config(checkpoint_dir)
        if config.decoding != "autoregressive":
            raise ValueError(
                f"{checkpoint_dir} is an OpenVLA-OFT (parallel decoding) checkpoint; vLLM decodes "
                "causally and cannot run it: use the torch engine"
            )
        from vllm import LLM

        self._dtype = _torch_dtype(dtype)
        self._config = config
        self._weight_sync = weight_sync
        merge = weight_sync == "merge"
        self._max_lora_rank = max_lora_rank
        self._own_work_dir = work_dir is None
        self._work_dir = Path(work_dir or tempfile.mkdtemp(prefix="vla_rl_vllm_"))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # serialises act() and the version switch (vLLM's LLM
        # is not thread-safe)
        self._adapter_lock = threading.Lock()  # one load_adapter at a time
        self._closed = False

        t0 = time.perf_counter()
        try:
            # Loaded on the CPU: the LLM's layers go to vLLM through the exported file and never
            # touch this process's GPU memory (loaded there, a 7B's 13 GB stayed in torch's
            # cache and vLLM's merged-weight base copy then ran out of memory on an H200).
            policy = load_policy(checkpoint_dir, dtype=self._dtype, device="cpu")
            self._prompts = PromptTokenizer(load_tokenizer(checkpoint_dir), config.pad_token_id)
            llm_dir = self._export_llm(policy)
            # The torch side only needs the token embeddings of the LLM; vLLM holds the rest.
            policy.language_model.model.layers = nn.ModuleList()
            policy.language_model.lm_head = nn.Identity()
            self._policy = policy.to(device)
            self._fingerprint = base_fingerprint(policy)
            self._lora_settings: LoRASettings | None = None  # set by the first adapter
            self._llm = LLM(
                model=str(llm_dir),
                skip_tokenizer_init=True,
                enable_prompt_embeds=True,
                **(
                    {"worker_extension_cls": _MERGE_EXTENSION}
                    if merge
                    else {
                        "enable_lora": True,
                        "max_lora_rank": max_lora_rank,
                        "max_loras": 1,
                        "max_cpu_loras": 2,
                    }  # fmt: skip
                ),
                logprobs_mode="processed_logprobs",
                dtype=_vllm_dtype_name(self._dtype),
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                max_model_len=max_model_len,
                # Only the decoder's linear layers get LoRA. Llama's default also wraps
                # embed_tokens and lm_head, and the wrapped embedding crashes the engine when a
                # step mixes prompt-embeds prefill with decoded token ids (vllm-project/vllm#51122).
                **({} if merge else {"lora_target_modules": list(LLM_TARGETS)}),
                max_num_seqs=max_batch_size,
                max_num_batched_tokens=max_num_batched_tokens,
                # A chunked prefill discards the sample of its partial step and rewinds the
                # request's seeded generator, which CPU generators cannot do ("CPU Generator does
                # not use offset"): prompts are prefilled whole.
                enable_chunked_prefill=False,
                enforce_eager=enforce_eager,
                # Every prompt starts with its own image patches: nothing to share but BOS.
                enable_prefix_caching=False,
                seed=seed,
            )
            if merge:
                self._llm.collective_rpc(
                    "vla_rl_keep_base", args=(str(llm_dir / "model.safetensors"),)
                )
        except BaseException:
            if self._own_work_dir:
                shutil.rmtree(self._work_dir, ignore_errors=True)
            raise
        self._max_model_len = max_model_len
        self._action_ids = list(range(config.action_vocab_start, config.action_vocab_end))
        self._served = _ServedAdapter(0, None, None)
        # Where the last act() spent its time: the towers, projector and prompt embeddings in
        # torch (with the copy to the CPU), then vLLM's generate (transfer to its engine
        # process included). Read by benchmarks/engine_throughput.py.
        self.last_act_seconds: dict[str, float] = {}
        self._next_lora_id = 1
        self.start_seconds = time.perf_counter() - t0
        """Seconds from the constructor's start to a ready engine (load, export, vLLM start)."""
        self.last_sync_seconds: float | None = None
        """Seconds the last load_adapter held the engine (the weight switch itself)."""

    # ------------------------------------------------------------------ Engine interface
    @property
    def policy_version(self) -> int:
        return self._served.policy_version

    @property
    def action_chunk(self) -> int:
        return self._config.action_chunk

    @property
    def work_dir(self) -> Path:
        """Folder of the exported LLM (`llm/`) and the recent adapters (`adapter_NNNNNN/`)."""
        return self._work_dir

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
        """images uint8 [B, 224, 224, 3], instructions [B] -> action tokens and log-probs [B, 7].

        Log-probs are those of the sampling distribution (action ids only, temperature and top-k
        applied). Greedy decoding reports log-probs at temperature 1 over all 256 action ids
        (vLLM's greedy path applies neither temperature nor top-k).
        """
        from vllm import SamplingParams

        self._check_inputs(images, instructions, temperature, top_k, greedy)
        K = self._config.tokens_per_step
        B = len(instructions)
        seeds = [None] * B
        if seed is not None:
            # One independent stream per sample: equal seeds would give equal noise to every row.
            seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(B) % 2**31]
        params = [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else float(temperature),
                top_k=int(top_k) if top_k and top_k < len(self._action_ids) else 0,
                max_tokens=K,
                min_tokens=K,
                ignore_eos=True,
                allowed_token_ids=self._action_ids,
                logprobs=0,  # only the sampled token's log-prob
                seed=s,
                detokenize=False,
            )
            for s in seeds
        ]
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            served = self._served
            t0 = time.perf_counter()
            prompts = [{"prompt_embeds": e} for e in self._prompt_embeds(images, instructions)]
            t1 = time.perf_counter()
            outputs = self._llm.generate(
                prompts, params, use_tqdm=False, lora_request=served.lora_request
            )
            self.last_act_seconds = {"prompt_embeds": t1 - t0, "generate": time.perf_counter() - t1}
        tokens = np.empty((B, K), dtype=np.int64)
        logprobs = np.empty((B, K), dtype=np.float32)
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if len(ids) != K or completion.logprobs is None:
                raise RuntimeError(f"vLLM returned {len(ids)} tokens for sample {i}, expected {K}")
            tokens[i] = ids
            logprobs[i] = [
                position[t].logprob for position, t in zip(completion.logprobs, ids, strict=True)
            ]
        if tokens.min() < self._action_ids[0] or tokens.max() > self._action_ids[-1]:
            raise RuntimeError("vLLM sampled a token outside the action ids")
        return EngineOutput(tokens, logprobs, served.policy_version)

    def load_adapter(self, blob: bytes) -> int:
        """Validate the adapter, stage its LLM part in vLLM, then switch versions under the lock."""
        with self._adapter_lock:
            return self._load_adapter(blob)

    def _load_adapter(self, blob: bytes) -> int:
        settings, version, tensors = self._validate_adapter(blob)
        llm_part = {n: t for n, t in tensors.items() if n.startswith(_LLM_PREFIX)}
        torch_part = {n: t for n, t in tensors.items() if not n.startswith(_LLM_PREFIX)}
        folder, lora_request = None, None
        if llm_part:
            lora_id = self._next_lora_id
            self._next_lora_id += 1
            folder = self._write_peft_adapter(lora_id, settings, llm_part)
            if self._weight_sync == "lora":
                from vllm.lora.request import LoRARequest

                # vLLM caches adapters by integer id: a fresh id per load, never the policy
                # version, so that a re-sent version with new weights is not served from cache.
                lora_request = LoRARequest(f"v{version}", lora_id, str(folder))
        from vllm.v1.engine.exceptions import EngineDeadError

        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            t0 = time.perf_counter()
            if self._weight_sync == "merge":
                self._merge(folder, settings, EngineDeadError)
            elif lora_request is not None:
                try:
                    # Load it now, so that errors surface here and not in the next act().
                    self._llm.llm_engine.add_lora(lora_request)
                except Exception as e:
                    shutil.rmtree(folder, ignore_errors=True)
                    if isinstance(e, EngineDeadError):
                        raise
                    raise AdapterError(f"vLLM refused the adapter's LLM LoRA: {e}") from e
            self._copy_torch_part(settings, torch_part)
            previous = self._served
            self._served = _ServedAdapter(version, lora_request, folder)
            if previous.lora_request is not None:
                self._llm.llm_engine.remove_lora(previous.lora_request.lora_int_id)
            self.last_sync_seconds = time.perf_counter() - t0
        self._prune_adapter_folders()
        return version

    def _merge(self, folder: Path | None, settings: LoRASettings, engine_dead: type) -> None:
        """Merge the adapter's LLM LoRA into vLLM's weights (None: the base). If that fails
        part way, the served version's weights are merged back before the error is raised."""
        try:
            self._merge_rpc(folder, settings)
        except Exception as e:
            if isinstance(e, engine_dead):
                raise
            self._merge_rpc(self._served.folder, self._lora_settings or settings)
            raise AdapterError(f"merging the adapter's LLM LoRA into vLLM failed: {e}") from e

    def _merge_rpc(self, folder: Path | None, settings: LoRASettings) -> None:
        adapter_file = None if folder is None else str(folder / "adapter_model.safetensors")
        self._llm.collective_rpc(
            "vla_rl_merge", args=(adapter_file, settings.alpha / settings.rank)
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._llm.llm_engine.engine_core.shutdown()
            del self._llm
        if self._own_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    # ------------------------------------------------------------------ torch side
    @torch.inference_mode()
    def _prompt_embeds(self, images: np.ndarray, instructions: Sequence[str]) -> list[torch.Tensor]:
        """One [L_i, hidden] prompt embedding per sample, computed as OpenVLAPolicy does
        (BOS, the projected patches, the prompt tokens), without padding."""
        policy = self._policy
        batch = self._prompts(instructions)
        patches = policy.embed_images(policy.pixel_values(torch.from_numpy(images)))
        embeds, mask = policy._prompt_embeddings(patches, batch)
        # Rows are cut on the device, then copied to the CPU (where vLLM takes prompt
        # embeddings) one by one. A variant that copied the padded batch once and cut it on the
        # CPU ran at 87 actions/s at batch 128 (7B, H200; 0.48 s of its 1.47 s per call in
        # building the embeddings) where this code ran at 109 on another H200 the same day.
        rows = [embeds[i][mask[i]].to("cpu", self._dtype).contiguous() for i in range(len(mask))]
        longest = max(len(r) for r in rows) + self._config.tokens_per_step
        if longest > self._max_model_len:
            raise ValueError(
                f"prompt of {longest - self._config.tokens_per_step} positions + actions exceeds "
                f"max_model_len={self._max_model_len}"
            )
        return rows

    def _check_inputs(
        self, images, instructions, temperature: float, top_k: int, greedy: bool
    ) -> None:
        size = self._config.image_sizes[0]
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"images must have shape [B, {size}, {size}, 3], got {images.shape}")
        if isinstance(instructions, str) or not isinstance(instructions, Sequence):
            raise ValueError("instructions must be a list of strings")
        if len(instructions) != len(images):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        if len(images) == 0:
            raise ValueError("empty batch")
        for i, text in enumerate(instructions):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction {i} is empty or not a string")
        if not greedy and not temperature > 0:
            raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")

    # ------------------------------------------------------------------ files and adapters
    def _export_llm(self, policy) -> Path:
        """The checkpoint's Llama as a plain HF folder that vLLM loads (no tokenizer)."""
        folder = self._work_dir / "llm"
        folder.mkdir(exist_ok=True)
        text_config = dict(self._config.text_config)
        text_config.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            torch_dtype=_vllm_dtype_name(self._dtype),
        )
        (folder / "config.json").write_text(json.dumps(text_config, indent=2))
        state = {
            n: t.detach().to(self._dtype).contiguous().cpu()
            for n, t in policy.language_model.state_dict().items()
        }
        if text_config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    def _validate_adapter(self, blob: bytes) -> tuple[LoRASettings, int, dict[str, torch.Tensor]]:
        """Everything is checked here, before anything served changes."""
        if not isinstance(blob, (bytes, bytearray)):
            raise AdapterError("adapter must be bytes")
        try:
            meta = adapter_metadata(bytes(blob))
            lora = json.loads(meta["lora"])
            settings = LoRASettings(
                rank=int(lora["rank"]), alpha=lora["alpha"], targets=list(lora["targets"])
            )
            version = int(meta["policy_version"])
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterError(f"malformed adapter: {e}") from e
        if meta.get("base_fingerprint") != self._fingerprint:
            raise AdapterError("adapter was trained for a different base model")
        if settings.rank > self._max_lora_rank:
            raise AdapterError(
                f"adapter rank {settings.rank} exceeds the engine's max_lora_rank "
                f"{self._max_lora_rank}"
            )
        current = self._lora_settings
        if current is not None and (
            current.rank != settings.rank
            or current.alpha != settings.alpha
            or sorted(current.targets) != sorted(settings.targets)
        ):
            raise AdapterError(
                f"adapter LoRA settings (rank {settings.rank}, alpha {settings.alpha}, targets "
                f"{settings.targets}) differ from the served ones (rank {current.rank}, alpha "
                f"{current.alpha}, targets {current.targets})"
            )
        try:
            tensors = st_load(bytes(blob))
        except Exception as e:
            raise AdapterError(f"adapter blob does not decode ({e})") from e

        expected = self._expected_torch_shapes(settings)
        if "llm" in settings.targets:
            expected.update(_llm_lora_shapes(self._config.text_config, settings.rank))
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected)
        if missing or extra:
            raise AdapterError(
                f"adapter does not match the model's LoRA layout: {len(missing)} missing "
                f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
            )
        for name, t in tensors.items():
            if tuple(t.shape) != expected[name]:
                raise AdapterError(
                    f"adapter tensor {name} has shape {tuple(t.shape)}, expected {expected[name]}"
                )
            if not torch.isfinite(t).all():
                raise AdapterError(f"adapter tensor {name} contains NaN or inf")
        return settings, version, tensors

    def _expected_torch_shapes(self, settings: LoRASettings) -> dict[str, tuple[int, ...]]:
        """Vision / projector LoRA and value-head tensors the blob must hold, with shapes."""
        policy = self._policy
        shapes = {
            n: tuple(p.shape) for n, p in policy.named_parameters() if n.startswith("value_head.")
        }
        torch_targets = [t for t in settings.targets if t != "llm"]
        for name in lora_target_names(policy, torch_targets) if torch_targets else []:
            module = policy.get_submodule(name)
            base = getattr(module, "base_layer", module)  # already wrapped by peft or not
            shapes[f"{name}.lora_A.{_PEFT_ADAPTER}.weight"] = (settings.rank, base.in_features)
            shapes[f"{name}.lora_B.{_PEFT_ADAPTER}.weight"] = (base.out_features, settings.rank)
        return shapes

    def _copy_torch_part(self, settings: LoRASettings, tensors: dict[str, torch.Tensor]) -> None:
        torch_targets = [t for t in settings.targets if t != "llm"]
        if self._lora_settings is None:
            if torch_targets:
                apply_lora(
                    self._policy,
                    LoRASettings(settings.rank, settings.alpha, targets=torch_targets),
                )
            self._lora_settings = settings
        params = dict(self._policy.named_parameters())
        assert set(trainable_state(self._policy)) == set(tensors)
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t.to(params[name].dtype))

    def _write_peft_adapter(
        self, lora_id: int, settings: LoRASettings, tensors: dict[str, torch.Tensor]
    ) -> Path:
        folder = self._work_dir / f"adapter_{lora_id:06d}"
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": settings.rank,
            "lora_alpha": settings.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": list(LLM_TARGETS),
            "base_model_name_or_path": str(self._work_dir / "llm"),
        }
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        state = {_peft_name(n): t.to(self._dtype).contiguous() for n, t in tensors.items()}
        save_file(state, str(staging / "adapter_model.safetensors"))
        staging.rename(folder)
        return folder

    def _prune_adapter_folders(self) -> None:
        folders = sorted(
            p for p in self._work_dir.glob("adapter_*") if p.is_dir() and p.suffix != ".partial"
        )
        served = self._served.folder
        for old in folders[:-_KEPT_ADAPTER_DIRS]:
            if old != served:
                shutil.rmtree(old, ignore_errors=True)
