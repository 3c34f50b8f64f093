"""What `vla-rl train` starts on a machine of N GPUs for the three placements of RLinf's recipes
(collocated, disaggregated, hybrid), for several N: every process sees exactly the GPUs its
component was placed on, processes of one component are spread over its GPUs, and the learner
runs one process per actor GPU under torchrun. Nothing here assumes 4 GPUs."""

from __future__ import annotations

import itertools
import sys

import pytest

from vla_rl.config import load_config
from vla_rl.launch import Launch, child_visible_devices, idle_gpus, launch_plan


def placements(n: int) -> dict[str, str]:
    def ranks(lo: int, hi: int) -> str:
        return str(lo) if lo == hi else f"{lo}-{hi}"

    half = n // 2
    first, second, every = ranks(0, half - 1), ranks(half, n - 1), ranks(0, n - 1)
    return {
        # everything on every GPU; rollout and learner take turns
        "collocated": f'{{"actor,rollout,env": {every}}}',  # quoted: YAML splits on commas
        # env + rollout on the first half, learner on the second (collection overlaps training)
        "disaggregated": f"{{env: {first}, rollout: {first}, actor: {second}}}",
        # RLinf's default recipe: env and rollout apart, the learner on all
        "hybrid": f"{{env: {first}, rollout: {second}, actor: {every}}}",
    }


def plan_for(n: int, placement: str, servers: int, replicas: int):
    cfg = load_config(
        None,
        [
            f"cluster.component_placement={placement}",
            f"env.train.num_servers={servers}",
            f"env.train.total_num_envs={servers * 2}",
            f"rollout.replicas={replicas}",
        ],
    )
    ports = itertools.count(40000)
    return launch_plan(
        cfg, n, model_path="/m", buffer_url="redis://local", port=lambda kind: next(ports)
    )


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("name", ["collocated", "disaggregated", "hybrid"])
def test_each_process_sees_one_gpu_of_its_component(n, name):
    placement = placements(n)[name]
    cfg = load_config(None, [f"cluster.component_placement={placement}"])
    want = cfg.cluster.resolve(n)
    servers = replicas = 2 * n  # more processes than GPUs: each GPU gets some
    plan = plan_for(n, placement, servers, replicas)

    for procs, component in ((plan.env, "env"), (plan.rollout, "rollout")):
        assert all(len(p.gpus) == 1 for p in procs), (component, [p.gpus for p in procs])
        used = [p.gpus[0] for p in procs]
        assert set(used) == set(want[component]), component  # all of its GPUs, no other
        # round robin: no GPU carries more than its share
        assert max(used.count(g) for g in set(used)) == -(-len(procs) // len(want[component]))

    # The learner: one torchrun process per actor GPU, seeing exactly those GPUs.
    assert plan.learner.gpus == want["actor"]
    if len(want["actor"]) > 1:
        assert f"--nproc_per_node={len(want['actor'])}" in plan.learner.args
    else:
        assert "torch.distributed.run" not in plan.learner.args
    assert plan.learner.args[plan.learner.args.index("--device") + 1] == "cuda"


def test_the_cpu_placement_starts_everything_on_the_cpu():
    plan = plan_for(0, '{"actor,rollout,env": cpu}', servers=2, replicas=2)
    assert {p.gpus for p in [*plan.env, *plan.rollout, plan.learner]} == {"cpu"}
    assert "torch.distributed.run" not in plan.learner.args


def test_gpus_that_no_process_gets_are_named():
    placement = "{env: 0-1, rollout: 2-3, actor: 0-3}"
    assert idle_gpus(plan_for(4, placement, servers=2, replicas=2), 4) == []
    lines = idle_gpus(plan_for(4, placement, servers=1, replicas=1), 4)
    assert lines == [
        "rollout is placed on GPUs [2, 3] but rollout.replicas is 1: GPU(s) [3] get no rollout "
        "process",
        "env is placed on GPUs [0, 1] but env.train.num_servers is 1: GPU(s) [1] get no env "
        "process",
    ]


def test_placement_indices_count_the_gpus_the_run_was_given():
    """`CUDA_VISIBLE_DEVICES=1 vla-rl train` sizes its placement from the one GPU it sees, so
    placement index 0 must reach the child as GPU 1. Before this, the child got "0" and ran on a
    GPU outside what the user gave the run: two runs started side by side on a 2-GPU machine
    (GPU 0 and GPU 1) both landed on GPU 0 and ran ManiSkill's renderer out of memory."""
    assert child_visible_devices([0], "1") == "1"
    assert child_visible_devices([0, 1], "2,3") == "2,3"
    assert child_visible_devices([1], " 4 , 6 ") == "6"
    assert child_visible_devices([0], "GPU-4ae5dd9a") == "GPU-4ae5dd9a"  # UUIDs pass as given
    assert child_visible_devices([0, 2], None) == "0,2"  # nothing set: the indices are the GPUs
    assert child_visible_devices("cpu", "1") == ""
    with pytest.raises(ValueError, match="GPU index 1 .* 1 GPU"):
        child_visible_devices([1], "5")
    with pytest.raises(ValueError, match="GPU index 0"):
        child_visible_devices([0], "")  # the run was given no GPU


def test_a_started_child_sees_the_mapped_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    launch = Launch(tmp_path)
    show = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"]
    child = launch.start("probe", show, gpus=[1])
    assert child.proc.wait(timeout=60) == 0
    assert child.log_tail().strip() == "5"
