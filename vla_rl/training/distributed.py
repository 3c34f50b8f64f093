"""Data-parallel training with torch.distributed: FSDP2 sharding of the policy, and the few
collectives the learner needs around it (the batch from rank 0, the adapter as full tensors).

Every helper is a no-op in a single process, so the learner calls the same functions either way.
Under `torchrun --nproc_per_node W` every rank builds the same policy, applies LoRA, calls
`shard_policy`, then builds its optimizer over the (now sharded) parameters.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from vla_rl.models import OpenVLAPolicy
from vla_rl.models.lora import load_adapter, serialize_adapter, trainable_state

T = TypeVar("T")

# Methods of OpenVLAPolicy that the learner calls instead of forward(); FSDP must gather the
# root unit's parameters around them as it does around forward().
_FORWARD_METHODS = ("forward_actions", "generate")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK).

    `backend="auto"` picks nccl where CUDA is present and gloo otherwise; on CUDA each rank uses
    the GPU of its LOCAL_RANK. Without torchrun (or with one process) nothing is initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be auto, nccl or gloo, got {backend!r}")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            device_id=device if backend == "nccl" else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that talks to Redis and the replicas."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` from rank `src` on every rank (pickled; fine for a batch of segments)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


# ------------------------------------------------------------------------------ sharding
def _fsdp_units(policy: OpenVLAPolicy) -> list[nn.Module]:
    """The modules that get their own FSDP unit, innermost first (the root comes last).

    Transformer blocks are the units of compute; the LLM embedding and head are the largest
    single matrices (vocab x hidden) and are called directly by the policy, so they are units of
    their own. What is left (patch embeddings, norms, value head) lives in the root unit.
    """
    units: list[nn.Module] = []
    for tower in (policy.vision_backbone.featurizer, policy.vision_backbone.fused_featurizer):
        units += list(tower.blocks)
    units.append(policy.projector)
    lm = policy.language_model
    units += list(lm.model.layers)
    embed, head = lm.get_input_embeddings(), lm.lm_head
    if head.weight is not embed.weight:  # tied weights must stay in one unit (the root)
        units += [embed, head]
    return units


SHARDING_STRATEGIES = ("full_shard", "shard_grad_op", "no_shard")


@dataclass(frozen=True)
class DataParallel:
    """The data-parallel group a policy is sharded over (rank 0 of 1 when it is not)."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None


def shard_policy(
    policy: OpenVLAPolicy,
    strategy: str = "full_shard",
    device_mesh: DeviceMesh | None = None,
) -> OpenVLAPolicy:
    """Make the policy data-parallel over all ranks (in place; returns it). No-op in one
    process. `strategy` is actor.fsdp_config.sharding_strategy:

    - 'full_shard' (ZeRO-3, FSDP2): every parameter sharded; each unit gathers its parameters
      for the forward, frees them, and gathers them again for the backward.
    - 'shard_grad_op' (ZeRO-2, FSDP2): sharded, but kept gathered from forward to backward (more
      memory, half the traffic).
    - 'no_shard' (DDP): every rank holds the whole model as plain tensors, as one process does;
      the trainable parameters (LoRA, value head) start from rank 0's, and `reduce_gradients`
      averages their gradients once per optimizer step. No FSDP at all: with a frozen 7B base
      and a small adapter there is nothing to shard, and FSDP's per-unit hooks (three per unit
      and micro-batch with gradient checkpointing) would be pure overhead. Every rank must
      build the same base (the same checkpoint or seed): it is never communicated.

    Apply LoRA before (the adapter parameters must exist) and build the optimizer after (it
    must hold the sharded parameters).
    """
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"strategy must be one of {SHARDING_STRATEGIES}, got {strategy!r}")
    if strategy == "no_shard":
        if device_mesh is not None:
            raise ValueError("no_shard replicates over the default process group, not a mesh")
        return replicate_policy(policy)
    if device_mesh is None:
        if world_size() == 1:
            return policy
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        device_mesh = init_device_mesh(device_type, (world_size(),), mesh_dim_names=("shard",))
    if device_mesh.ndim != 1:
        raise ValueError(f"{strategy} needs a 1-D data-parallel device mesh")
    reshard_after_forward = strategy == "full_shard"
    for module in _fsdp_units(policy):
        fully_shard(module, mesh=device_mesh, reshard_after_forward=reshard_after_forward)
    # FSDP2 keeps the root unit's parameters gathered after forward unless told otherwise; after
    # a no-grad forward (the learner's recompute) no backward would reshard them, and the module
    # would go on exposing plain tensors in place of its sharded parameters.
    fully_shard(policy, mesh=device_mesh, reshard_after_forward=True)
    for name in _FORWARD_METHODS:
        register_fsdp_forward_method(policy, name)
    # The policy's outputs are slices of its logits; nothing here writes into them in place,
    # which is what this warning (once per rank and call site) is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPOpenVLAPolicy\)")
    return policy


# Set on a policy by replicate_policy: its DataParallel (plain modules carry no mesh to read).
_REPLICATED = "_vla_rl_replicated"


def replicate_policy(policy: OpenVLAPolicy) -> OpenVLAPolicy:
    """'no_shard': the policy stays a plain module on every rank; its trainable parameters are
    set to rank 0's (LoRA's random init differs between ranks unless seeded alike) and it is
    marked as replicated over the default process group. No-op in one process."""
    if world_size() == 1:
        return policy
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    setattr(policy, _REPLICATED, DataParallel(rank(), world_size(), dist.group.WORLD))
    return policy


def is_replicated(policy: nn.Module) -> bool:
    return getattr(policy, _REPLICATED, None) is not None


def reduce_gradients(policy: nn.Module, params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over the ranks of a replicated ('no_shard') policy, in
    one all-reduce per dtype; a no-op otherwise (FSDP reduces in its backward hooks). Call it
    once per optimizer step, after the last backward: gradients are accumulated locally until
    then, as FSDP does with gradient sync off."""
    dp = getattr(policy, _REPLICATED, None)
    if dp is None or dp.world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:  # never used in this step's passes: a zero gradient, on every rank
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=dp.group)  # a sum: gloo has no average
        flat /= dp.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def data_parallel(policy: nn.Module) -> DataParallel:
    """Read the data-parallel group off a policy made data-parallel by `shard_policy`."""
    replicated = getattr(policy, _REPLICATED, None)
    if replicated is not None:
        return replicated
    if not isinstance(policy, FSDPModule):
        return DataParallel()
    mesh = next(p.device_mesh for p in policy.parameters() if isinstance(p, DTensor))
    return DataParallel(mesh.get_local_rank(), mesh.size(), mesh.get_group())


def set_gradient_sync(policy: nn.Module, sync: bool) -> None:
    """Whether the next backward reduces gradients over the ranks (no-op unsharded). Without
    it the gradients add up unsharded on each rank (adapter-sized) until a backward with it."""
    if isinstance(policy, FSDPModule):
        policy.set_requires_gradient_sync(sync)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` that also takes sharded (DTensor) gradients: the norm is
    the global one over all shards, returned as a plain tensor equal on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def all_reduce_sums(
    sums: dict[str, float], counts: dict[str, int], dp: DataParallel
) -> tuple[dict[str, float], dict[str, int]]:
    """Add metric sums and counts over the ranks (ranks may have recorded different keys)."""
    if dp.world_size == 1:
        return dict(sums), dict(counts)
    gathered: list[Any] = [None] * dp.world_size
    dist.all_gather_object(gathered, (dict(sums), dict(counts)), group=dp.group)
    total_sums: dict[str, float] = {}
    total_counts: dict[str, int] = {}
    for s, c in gathered:
        for k, v in s.items():
            total_sums[k] = total_sums.get(k, 0.0) + v
            total_counts[k] = total_counts.get(k, 0) + c[k]
    return total_sums, total_counts


def reshard(policy: nn.Module) -> None:
    """Put every FSDP unit back to its sharded parameters. Without resharding after forward
    (sharding_strategy shard_grad_op), a no-grad forward (the recompute, generate) leaves units
    gathered until the next backward, and reading or loading state then sees plain tensors where
    the optimizer holds the sharded ones."""
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ------------------------------------------------------------------------------ the adapter
def full_trainable_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA and value-head tensors as plain, full, contiguous CPU copies, by parameter name.

    A collective when the policy is sharded: every rank must call it (every rank gets the full
    tensors; they are adapter-sized).
    """
    reshard(policy)
    out = {}
    for name, t in trainable_state(policy).items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.detach().to("cpu", copy=True).contiguous()  # a copy, never the live tensor
    return out


class _AdapterView:
    """What `lora.serialize_adapter` / `lora.load_adapter` read from a model (parameter names and
    tensors, config, LoRA settings), with the sharded adapter tensors gathered to full ones."""

    def __init__(self, policy: OpenVLAPolicy) -> None:
        self.state = full_trainable_state(policy)
        self.config = policy.config
        self.lora_settings = policy.lora_settings

    def named_parameters(self):
        return iter(self.state.items())


def serialize_adapter_distributed(policy: OpenVLAPolicy, version: int) -> bytes:
    """What `lora.serialize_adapter` gives for the unsharded policy: the same tensors and
    metadata (safetensors writes the metadata keys in hash order, so bytes vary between calls).

    Works sharded or not; when sharded it is a collective (every rank calls it, every rank
    gets the blob; rank 0 is the one that publishes and checkpoints it).
    """
    if not isinstance(policy, FSDPModule):
        return serialize_adapter(policy, version)
    return serialize_adapter(_AdapterView(policy), version)  # type: ignore[arg-type]


def load_adapter_distributed(policy: OpenVLAPolicy, blob: bytes) -> int:
    """`lora.load_adapter` for a sharded policy: every rank passes the same blob and keeps its
    shard of each tensor; a bad blob raises on every rank and changes nothing. Returns the
    adapter's policy version."""
    if not isinstance(policy, FSDPModule):
        return load_adapter(policy, blob)
    # load_adapter checks the blob and copies it into full tensors; each rank then takes its
    # shard of them (DTensor's in-place copy_ cannot reshard uneven shards itself).
    view = _AdapterView(policy)
    version = load_adapter(view, blob)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name in view.state and isinstance(p, DTensor):
                full = view.state[name].to(device=p.device, dtype=p.dtype)
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
    return version


# ------------------------------------------------------------------------------ optimizer state
def optimizer_state(policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as full tensors keyed by parameter name (a collective when sharded;
    complete on rank 0, empty on the others), for a checkpoint that any world size can load.
    Unsharded it holds references to the live state: save it before the next step."""
    sharded = isinstance(policy, FSDPModule)
    reshard(policy)
    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_optimizer_state_dict(policy, optimizer, options=options)


def load_optimizer_state(
    policy: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what `optimizer_state` saved. When data-parallel only rank 0's `state` is read (the
    others may pass {}); it is broadcast and each rank keeps its shard (or, replicated, all)."""
    sharded = isinstance(policy, FSDPModule)
    reshard(policy)
    if is_replicated(policy):
        # On the CPU: pickled CUDA tensors would unpickle onto rank 0's GPU on every rank.
        state = broadcast_object(_on_cpu(state) if rank() == 0 else None)
        if not state.get("state"):
            return
    if sharded and not broadcast_object(bool(state.get("state"))):
        return  # nothing to load (no step taken yet, or a stateless optimizer)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(policy, optimizer, state, options=options)


def _on_cpu(obj: Any) -> Any:
    """A copy of a nested dict/list of tensors with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj
