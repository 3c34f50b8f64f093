"""A PPO update of the FSDP2-sharded policy on 2 processes (torchrun, gloo on CPU) equals the
unsharded single-process update: the same adapter, optimizer state and metrics."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from tests.unit import _fsdp_worker as worker
from vla_rl.models.lora import adapter_metadata, serialize_adapter
from vla_rl.training import distributed

SGD_RTOL = 1e-5
"""SGD: |change of FSDP - change of single| / max |change of single|, per tensor, beyond one ulp
of the weight. Reducing once per step sums the micro-batch gradients in another order than the
single process, so a gradient may differ in its last bits and the updated weight then rounds to
the neighbouring float (measured: exactly 1 ulp, 4e-4 of the tensor's change)."""
ADAMW_RTOL = 1e-5
"""AdamW: |FSDP - single| / max |single|, per tensor, beyond one ulp (measured: 1.7e-6). Adam
divides by sqrt(v) + eps, so entries with a near-zero gradient turn float-summation noise into
small steps; SGD shows that the gradients themselves agree to float rounding."""


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun is not installed")
    return [found]


def max_rel_error(got: dict, want: dict, base: dict | None = None) -> tuple[float, str]:
    """The worst tensor's max (|got - want| - ulp(want))+ / max |want - base| (base: what both
    started from): the difference beyond one rounding of the result."""
    worst = (0.0, "")
    for name in want:
        ref = want[name] if base is None else want[name] - base[name]
        w = want[name].abs()
        ulp = torch.nextafter(w, torch.full_like(w, float("inf"))) - w
        diff = float(((got[name] - want[name]).abs() - ulp).clamp(min=0).max())
        worst = max(worst, (diff / max(float(ref.abs().max()), 1e-12), name))
    return worst


@contextmanager
def torch_threads(n: int):
    """Run the reference with the workers' thread count (matmul sums split by thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Every strategy with the learner's once-per-step reduction; the per-micro-batch reduction (kept
# for benchmarks/fsdp_update.py's comparison) with one strategy.
CASES = [(s, "once") for s in distributed.SHARDING_STRATEGIES] + [("full_shard", "every_micro")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("strategy", "reduce"), CASES, ids=[f"{s}-{r}" for s, r in CASES])
def test_two_process_fsdp_update_equals_single_process(tmp_path, strategy, reduce):
    out = tmp_path / "fsdp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FSDP_STRATEGY=strategy,
               FSDP_REDUCE_ONCE="1" if reduce == "once" else "0")  # fmt: skip
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", worker.__file__, str(out)]
    log = tmp_path / "torchrun.log"
    ref: dict[str, object] = {}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            # The reference, unsharded in this process, while the two ranks run.
            batch = worker.build_batch()
            with torch_threads(1):
                for kind in worker.OPTIMIZERS:
                    policy = worker.build_policy()
                    ref["initial"] = st_load(serialize_adapter(policy, version=0))
                    if kind == "adamw":
                        ref["probes"] = worker.probe(policy, batch)
                    optimizer, ref[f"{kind}/metrics"], ref[f"{kind}/adapter"] = worker.run_update(
                        policy, batch, kind
                    )
                    if kind == "adamw":
                        state = copy.deepcopy(distributed.optimizer_state(policy, optimizer))
                        distributed.load_optimizer_state(policy, optimizer, state)
                        ref["optimizer"] = distributed.optimizer_state(policy, optimizer)
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == 0, log.read_text(errors="replace")[-4000:]
    got = torch.load(out, weights_only=False)
    assert got["world"] == 2
    initial = ref["initial"]

    for kind, rtol, base in (("sgd", SGD_RTOL, initial), ("adamw", ADAMW_RTOL, None)):
        # The adapter: same names, metadata and values; and the update did move it.
        blob, want_blob = got[f"{kind}/adapter"], ref[f"{kind}/adapter"]
        assert adapter_metadata(blob) == adapter_metadata(want_blob)
        fsdp, want = st_load(blob), st_load(want_blob)
        assert fsdp.keys() == want.keys() == initial.keys()
        err, name = max_rel_error(fsdp, want, base)
        print(f"{kind}: worst relative error {err:.2e} ({name})")
        assert err <= rtol, f"{kind}: {name} differs by {err:.2e}"
        moved = [n for n in want if not torch.equal(want[n], initial[n])]
        for part in ("lora_A", "lora_B", "value_head"):  # lora_A moves once B != 0
            assert any(part in n for n in moved), part

        # The metrics (averaged over ranks) are the single process's.
        metrics, want_metrics = got[f"{kind}/metrics"], ref[f"{kind}/metrics"]
        assert metrics.keys() == want_metrics.keys()
        for key, value in want_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (kind, key)
        # Clipping (by the global norm over the shards) was exercised.
        assert want_metrics["actor/grad_norm"] > worker.UPDATE.max_grad_norm

    # The no-grad methods the learner calls (recompute, generate) run on the sharded policy.
    for key, value in ref["probes"].items():
        assert torch.allclose(got["probes"][key], value, rtol=1e-5, atol=1e-6), key
    # A run stopped at iteration 2 checkpoints it with every rank taking part (save_interval 10),
    # or has it already (save_interval 2).
    assert got["stopped_run"] == [["global_step_2"], ["global_step_2"]]
    # A critic warm-up step moves the value head alone on every strategy.
    assert got["warmup"] == {"policy_unchanged": True, "head_moved": True}
    # In bf16 the optimizer steps fp32 masters through the shards and a checkpoint round trip.
    assert got["bf16"] == dict.fromkeys(
        (
            "rounded_after_one",
            "fp32_after_load",
            "masters_kept_through_load",
            "never_reseeded",
            "rounded_after_two",
        ),
        True,
    )
    # The optimizer state, gathered by name, matches and loads back through the shards.
    assert got["adapter_round_trip"]
    assert got.get("optimizer_same_on_every_rank", strategy != "no_shard")
    want_state = ref["optimizer"]["state"]
    assert want_state.keys() == {n for n in initial}  # by name; loads back unsharded too
    for opt in (got["optimizer"], got["optimizer_again"]):
        assert opt["state"].keys() == want_state.keys()
        for k in ("exp_avg", "exp_avg_sq"):
            err, name = max_rel_error(
                {n: s[k] for n, s in opt["state"].items()}, {n: s[k] for n, s in want_state.items()}
            )
            assert err <= ADAMW_RTOL, f"{k} of {name} differs by {err:.2e}"
        assert {float(s["step"]) for s in opt["state"].values()} == {4.0}


def test_the_config_offers_the_strategies_that_shard_policy_implements():
    from vla_rl.config.schema import SHARDING_STRATEGIES

    assert SHARDING_STRATEGIES == distributed.SHARDING_STRATEGIES
