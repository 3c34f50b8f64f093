"""Policy updates into vLLM by merging the LoRA into the LLM's weights, inside vLLM's workers.

vLLM's own LoRA path (a `LoRARequest` per version) costs its punica kernels on every step, and
with vLLM's default targets (the LM head included) it crashed the engine on the GPU together with
prompt embeddings (an illegal memory access in its LoRA logits kernel; with the decoder's linear
layers only, as VLLMEngine asks, it ran on an H200). RL frameworks sync weights into vLLM
instead: this class is mixed into each vLLM worker (`LLM(worker_extension_cls=...)`) and called
through `LLM.collective_rpc`:

- `vla_rl_keep_base(llm_file)` once: keep a copy of the base weights of every linear layer the
  LoRA can touch, in vLLM's fused layout (q, k, v stacked into qkv_proj; gate, up into
  gate_up_proj), read from the exported checkpoint file, on the model's device;
- `vla_rl_merge(adapter_file, scale)` per update: W = W_base + scale * B @ A for each layer
  (computed in float32, stored in the model's dtype), written into the live weights; None
  restores the base. Every update starts from the kept base, so rounding never accumulates
  over versions, and a layer without LoRA tensors gets its base back.

Only the file names travel through the RPC (the adapter is a safetensors file the engine
process wrote), not the tensors. Tensor parallelism (a weight split across workers) is not
supported: the fused weights here are whole.
"""

from __future__ import annotations

import torch

# vLLM's fused Llama linear layers and the HF modules stacked in each, in order.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
PEFT_PREFIX = "base_model.model."  # peft's names: base_model.model.model.layers.0.<module>...


class MergeLoRAExtension:
    """Methods added to vLLM's worker class; `self` is the worker."""

    def _vla_rl_layers(self):
        model = self.model_runner.get_model()
        return model.model.layers

    def vla_rl_keep_base(self, llm_file: str) -> int:
        """Copy the base weights of every fused linear layer; returns how many were kept."""
        from safetensors.torch import load_file

        parallel = self.vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise NotImplementedError(
                "merged weight sync needs one worker (no tensor or pipeline parallelism)"
            )
        hf = load_file(llm_file)
        base: dict[tuple[int, str], torch.Tensor] = {}
        for i, layer in enumerate(self._vla_rl_layers()):
            for fused, parts in FUSED.items():
                module = layer.get_submodule(fused)
                stacked = torch.cat([hf[f"model.layers.{i}.{p}.weight"] for p in parts], 0)
                dtype = _dtype_of(module)
                base[(i, fused)] = stacked.to(_device_of(module), dtype).contiguous()
        self._vla_rl_base = base
        return len(base)

    def vla_rl_merge(self, adapter_file: str | None, scale: float) -> int:
        """Serve base + scale * B @ A of the adapter file (None: the base); returns the number
        of layers that got a LoRA delta."""
        from safetensors.torch import load_file

        lora = load_file(adapter_file) if adapter_file else {}
        layers = self._vla_rl_layers()
        merged_layers = 0
        for (i, fused), base in self._vla_rl_base.items():
            module = layers[i].get_submodule(fused)
            deltas = []
            for part in FUSED[fused]:
                stem = f"{PEFT_PREFIX}model.layers.{i}.{part}"
                a, b = lora.get(f"{stem}.lora_A.weight"), lora.get(f"{stem}.lora_B.weight")
                if a is not None and b is not None:
                    a = a.to(base.device, torch.float32)
                    deltas.append(scale * (b.to(base.device, torch.float32) @ a))
            if len(deltas) not in (0, len(FUSED[fused])):
                raise ValueError(f"layer {i} {fused}: LoRA for some of {FUSED[fused]} only")
            weight = base
            if deltas:
                weight = (base.float() + torch.cat(deltas, 0)).to(base.dtype)
                merged_layers += 1
            _set_weight(module, weight)
        return merged_layers


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(p.device for p in module.parameters())


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _set_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Write `weight` into the layer. On the GPU the weight is used as it is: copy in place
    (CUDA graphs keep pointing at it). vLLM's CPU backend packs each weight for its GEMM
    kernels after loading and drops the original: give it a new weight and pack again."""
    if hasattr(module, "cpu_linear"):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        module.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(module, remove_weight=True)
    else:
        module.weight.data.copy_(weight)
