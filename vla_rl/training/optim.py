"""AdamW that steps low-precision parameters through fp32 master copies.

Why: with `actor.model.precision: bf16` the LoRA and value-head parameters are stored in bf16,
which keeps 8 significant bits. An AdamW update smaller than about 0.4% of a weight rounds away
entirely: one step at lr 1e-4 (RLinf's 7B learning rate) changed only 12.5% of a LoRA A matrix's
elements in our test, so most of what the learner computed was lost. Mixed-precision trainers
(apex O2, DeepSpeed's bf16 optimizer, Megatron) keep an fp32 "master" copy of each such weight,
step that, and write the rounded result back; this does the same.

The forward and backward are untouched: the model keeps computing in its own precision, so the
learner and the rollout engines see the same weights. fp32 parameters are stepped exactly as by
`torch.optim.AdamW`.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly FSDP-sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


LOW_PRECISION = (torch.bfloat16, torch.float16)
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _is_fp32(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


class MasterWeightAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose state holds, for every bf16 or fp16 parameter, an fp32 `master`
    copy (checkpointed with the moments, so a resumed run continues exactly), and fp32 moments.
    Each step updates the master and rounds it into the parameter.

    A parameter written from outside since the last step (an adapter loaded into the learner)
    no longer equals its master rounded; the master is then taken from the parameter again and
    `masters_reseeded` counts it. Moments saved in bf16 (by plain AdamW, before this class) are
    widened to fp32 at the next step.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.masters_reseeded = 0

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype on load; a bf16
        # parameter's master and moments are fp32 and must come back as they were saved.
        fp32 = {
            pid: {k: v for k, v in s.items() if k != "step" and _is_fp32(v)}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params, strict=True):
            if p.dtype not in LOW_PRECISION:
                # A master saved for a parameter now held in full precision is of no use.
                self.state.get(p, {}).pop("master", None)
            elif pid in fp32:
                for key, value in fp32[pid].items():
                    self.state[p][key] = value.to(device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # before the swap below, so its backward fills the parameters
            with torch.enable_grad():
                loss = closure()
        # AdamW steps what is in param_groups and keys its state by tensor: the masters stand in
        # for their parameters for the duration of the step, sharing the parameters' state.
        swapped: list[tuple[list[torch.Tensor], int, torch.Tensor, torch.Tensor]] = []
        try:
            for group in self.param_groups:
                params = group["params"]
                for i, p in enumerate(params):
                    if p.grad is None or p.dtype not in LOW_PRECISION:
                        continue
                    state = self.state[p]
                    master = state.get("master")
                    if master is None or not torch.equal(_local(master).to(p.dtype), _local(p)):
                        self.masters_reseeded += master is not None
                        master = p.detach().to(torch.float32)
                    for key in MOMENTS:
                        if key in state and state[key].dtype != torch.float32:
                            state[key] = state[key].to(torch.float32)
                    master.grad = p.grad.to(torch.float32)
                    # Out of the state during the step: AdamW creates its moments in an empty one.
                    state.pop("master", None)
                    self.state[master] = state
                    params[i] = master
                    swapped.append((params, i, p, master))
            super().step()
        finally:
            for params, i, p, master in swapped:
                params[i] = p
                self.state[p] = self.state.pop(master)
                self.state[p]["master"] = master
                master.grad = None
                p.copy_(master)
        return loss
