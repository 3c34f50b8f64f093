"""MasterWeightAdamW: bf16 LoRA and value-head parameters follow the fp32 trajectory (plain
AdamW on bf16 loses small updates), fp32 parameters are stepped exactly as by AdamW, an adapter
written into the parameters from outside is kept, a checkpointed optimizer resumes exactly (and
one saved by plain AdamW, with bf16 moments, resumes too), and a closure runs first."""

from __future__ import annotations

import copy

import torch

from vla_rl.models import tiny_config
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.models.tiny import build_tiny_policy
from vla_rl.training.distributed import load_optimizer_state, optimizer_state
from vla_rl.training.optim import MasterWeightAdamW
from vla_rl.training.update import make_optimizer

LR, VALUE_LR = 1e-4, 3e-3  # RLinf's 7B actor lr and our value-head default


def _policy(dtype: torch.dtype = torch.float32):
    return apply_lora(build_tiny_policy(tiny_config(), seed=0), LoRASettings(rank=4, alpha=8)).to(
        dtype
    )


def _trainable(policy) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in policy.named_parameters() if p.requires_grad]


def _set_grads(policies, seed: int) -> None:
    """The same random gradients (rounded to bf16, so every policy can hold them exactly)."""
    g = torch.Generator().manual_seed(seed)
    for params in zip(*(_trainable(p) for p in policies), strict=True):
        grad = torch.randn(params[0][1].shape, generator=g).to(torch.bfloat16)
        for _, p in params:
            p.grad = grad.to(p.dtype)


def _stepped_bf16(steps: int = 3):
    """A bf16 policy and its optimizer after `steps` steps of random gradients."""
    policy = _policy(torch.bfloat16)
    opt = make_optimizer(policy, LR, VALUE_LR)
    for step in range(steps):
        _set_grads([policy], seed=step)
        opt.step()
    return policy, opt


def _fp32_twin(low):
    """An fp32 copy of a bf16 policy with the same (exactly representable) values."""
    return copy.deepcopy(low).to(torch.float32)


def test_bf16_parameters_follow_the_fp32_trajectory_where_plain_adamw_loses_updates():
    low = _policy(torch.bfloat16)
    ref, plain = _fp32_twin(low), copy.deepcopy(low)
    opt_low, opt_ref = make_optimizer(low, LR, VALUE_LR), make_optimizer(ref, LR, VALUE_LR)
    opt_plain = torch.optim.AdamW(
        [{"params": [p for _, p in _trainable(plain)]}], lr=LR, weight_decay=0.0
    )
    assert isinstance(opt_low, MasterWeightAdamW)
    for step in range(10):
        _set_grads([low, ref, plain], seed=step)
        for opt in (opt_low, opt_ref, opt_plain):
            opt.step()
    kept = lost = 0
    for (name, p_low), (_, p_ref), (_, p_plain) in zip(
        _trainable(low), _trainable(ref), _trainable(plain), strict=True
    ):
        master = opt_low.state[p_low]["master"]
        assert master.dtype == torch.float32
        assert torch.equal(master, p_ref), name  # the fp32 trajectory, bit for bit
        assert torch.equal(p_low, p_ref.to(torch.bfloat16)), name  # rounded into the model
        if "lora_A" in name:  # A starts at random values, where lr 1e-4 is below bf16's step
            kept += int((p_plain == p_ref.to(torch.bfloat16)).sum())
            lost += int((p_plain != p_ref.to(torch.bfloat16)).sum())
    assert lost > kept  # why the masters exist: plain AdamW on bf16 left most of A behind


def test_fp32_parameters_are_stepped_exactly_as_by_adamw():
    mine = _policy()
    theirs = copy.deepcopy(mine)
    opt = make_optimizer(mine, LR, VALUE_LR)
    head = [p for n, p in _trainable(theirs) if n.startswith("value_head.")]
    rest = [p for n, p in _trainable(theirs) if not n.startswith("value_head.")]
    ref = torch.optim.AdamW(
        [{"params": rest, "lr": LR}, {"params": head, "lr": VALUE_LR}], weight_decay=0.0
    )
    for step in range(5):
        _set_grads([mine, theirs], seed=step)
        opt.step()
        ref.step()
    for (name, a), (_, b) in zip(_trainable(mine), _trainable(theirs), strict=True):
        assert torch.equal(a, b), name
        assert "master" not in opt.state[a]


def test_a_parameter_written_from_outside_is_kept_not_overwritten_by_its_master():
    policy, opt = _stepped_bf16()
    name, p = next((n, p) for n, p in _trainable(policy) if "lora_A" in n)
    loaded = torch.randn(p.shape).to(torch.bfloat16)  # e.g. an adapter loaded into the learner
    with torch.no_grad():
        p.copy_(loaded)
    for group in opt.param_groups:  # a step that moves nothing: lr 0
        group["lr"] = 0.0
    _set_grads([policy], seed=99)
    opt.step()
    assert torch.equal(p, loaded), name
    assert torch.equal(opt.state[p]["master"], loaded.float())


def test_a_checkpointed_optimizer_resumes_with_its_masters_exactly():
    a, opt_a = _stepped_bf16()
    saved = copy.deepcopy(optimizer_state(a, opt_a))
    assert any("master" in s for s in saved["state"].values())
    b = copy.deepcopy(a)  # the parameters come back from the checkpoint's adapter
    opt_b = make_optimizer(b, LR, VALUE_LR)
    load_optimizer_state(b, opt_b, saved)
    for step in range(3, 6):
        _set_grads([a, b], seed=step)
        opt_a.step()
        opt_b.step()
    for (name, pa), (_, pb) in zip(_trainable(a), _trainable(b), strict=True):
        assert torch.equal(pa, pb), name
        assert torch.equal(opt_a.state[pa]["master"], opt_b.state[pb]["master"]), name


def test_a_checkpoint_of_plain_adamw_with_bf16_moments_resumes():
    """Checkpoints written before the masters hold bf16 moments: they are widened, not refused."""
    a = _policy(torch.bfloat16)
    plain = torch.optim.AdamW([p for _, p in _trainable(a)], lr=LR, weight_decay=0.0)
    _set_grads([a], seed=0)
    plain.step()
    saved = copy.deepcopy(optimizer_state(a, plain))
    b = copy.deepcopy(a)
    opt = MasterWeightAdamW([p for _, p in _trainable(b)], lr=LR, weight_decay=0.0)
    load_optimizer_state(b, opt, saved)
    _set_grads([b], seed=1)
    opt.step()
    for name, p in _trainable(b):
        state = opt.state[p]
        assert {state[k].dtype for k in ("master", "exp_avg", "exp_avg_sq")} == {torch.float32}
        assert torch.equal(state["master"].to(torch.bfloat16), p), name


def test_a_bf16_checkpoint_loads_into_an_fp32_learner_without_its_masters():
    a, opt_a = _stepped_bf16(steps=1)
    b = _fp32_twin(a)
    opt_b = make_optimizer(b, LR, VALUE_LR)
    load_optimizer_state(b, opt_b, copy.deepcopy(optimizer_state(a, opt_a)))
    assert all("master" not in opt_b.state[p] for _, p in _trainable(b))


def test_a_closure_is_evaluated_before_the_masters_step():
    torch.manual_seed(0)
    low = torch.nn.Linear(8, 4).to(torch.bfloat16)
    ref = copy.deepcopy(low).float()
    x = torch.randn(16, 8)
    opt_low = MasterWeightAdamW(low.parameters(), lr=LR, weight_decay=0.0)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)

    def closure():
        opt_low.zero_grad()
        loss = low(x.to(torch.bfloat16)).float().square().mean()
        loss.backward()
        return loss

    loss = opt_low.step(closure)
    assert loss is not None  # the closure's loss is returned, as by torch's optimizers
    for p_low, p_ref in zip(low.parameters(), ref.parameters(), strict=True):
        p_ref.grad = p_low.grad.float()  # the closure's gradients, as the fp32 twin would get them
    opt_ref.step()
    for p_low, p_ref in zip(low.parameters(), ref.parameters(), strict=True):
        assert torch.equal(opt_low.state[p_low]["master"], p_ref)
        assert torch.equal(p_low, p_ref.to(torch.bfloat16))
