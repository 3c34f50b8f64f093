"""EnvPool on real ManiSkill3 rendering (CPU physics, software Vulkan): 1-2 envs, a few steps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE.parents[1], HERE):  # the repo root (services/) and the helper task module
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from services.env_server.env_pool import EnvPool, EnvPoolConfig  # noqa: E402
from services.env_server.tasks import register_task, registered_tasks  # noqa: E402

TEST_MODULE = "_env_pool_test_tasks"
SIZE = 224


def _zeros(pool: EnvPool) -> np.ndarray:
    return np.zeros((pool.num_envs, pool.action_dim), dtype=np.float32)


@pytest.fixture(scope="module")
def sub_pool():
    """Two envs of a user task, each in its own subprocess, with a 3-step time limit."""
    cfg = EnvPoolConfig(
        task_ids=["TestPickCube-v1"],
        num_envs=2,
        max_episode_steps=3,
        task_modules=[TEST_MODULE],
        worker_mode="subprocess",
        seed=3,
    )
    with EnvPool(cfg) as pool:
        yield pool


@pytest.fixture(scope="module")
def two_task_pool():
    """Two tasks in one pool, stepped in this process."""
    cfg = EnvPoolConfig(
        task_ids=["PickCube-v1", "PushCube-v1"], num_envs=2, worker_mode="in_process"
    )
    with EnvPool(cfg) as pool:
        yield pool


def _assert_real_images(images: np.ndarray, n: int) -> None:
    assert images.dtype == np.uint8 and images.shape == (n, SIZE, SIZE, 3)
    for img in images:  # a rendered scene, not a blank or constant frame
        assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 100


def test_user_task_in_subprocesses_same_seed_gives_same_start(sub_pool):
    from _env_pool_test_tasks import TEST_INSTRUCTION

    assert sub_pool.action_dim == 7
    assert sub_pool.max_episode_steps == {"TestPickCube-v1": 3}
    obs = sub_pool.reset(seeds=[11, 11])
    _assert_real_images(obs.images, 2)
    assert obs.instructions == [TEST_INSTRUCTION] * 2
    assert obs.task_ids == ["TestPickCube-v1"] * 2
    # A GRPO group: the same seed in two worker processes gives the same initial state.
    np.testing.assert_array_equal(obs.images[0], obs.images[1])
    again = sub_pool.reset(seeds=[11, 12])
    np.testing.assert_array_equal(again.images[0], obs.images[0])
    assert (again.images[1] != obs.images[1]).any()


def test_time_limit_truncates_with_final_images_and_auto_reset(sub_pool):
    first = sub_pool.reset(seeds=[5, 6])
    prev = first.images
    for t in range(1, 4):
        res = sub_pool.step(_zeros(sub_pool))
        assert res.rewards.dtype == np.float32 and res.rewards.shape == (2,)
        assert np.isfinite(res.rewards).all()
        assert res.success.dtype == bool and not res.success.any()
        assert not res.terminated.any()
        if t < 3:
            assert not res.truncated.any() and res.episodes == []
            np.testing.assert_array_equal(res.final_images, res.obs.images)
            prev = res.obs.images
    # Step 3 hit the limit: final_images is where the episode ended, obs the next episode's start.
    assert res.truncated.all()
    assert [i for i, _ in res.episodes] == [0, 1]
    for _, stats in res.episodes:
        assert stats["episode_len"] == 3 and stats["success_once"] is False
        assert isinstance(stats["return"], float) and stats["return"] > 0
    _assert_real_images(res.final_images, 2)
    assert not np.array_equal(res.final_images, res.obs.images)
    assert (np.abs(res.final_images.astype(int) - prev.astype(int)).max()) < 255  # same episode
    # The auto-reset drew fresh seeds, different per env and from the manual reset.
    assert (res.obs.images[0] != res.obs.images[1]).any()
    assert (res.obs.images[0] != first.images[0]).any()
    nxt = sub_pool.step(_zeros(sub_pool))
    assert not nxt.truncated.any() and nxt.episodes == []


@pytest.mark.parametrize(
    "bad",
    [
        np.full((2, 7), np.nan, dtype=np.float32),
        np.zeros((2, 6), dtype=np.float32),
        np.zeros((1, 7), dtype=np.float32),
        np.zeros(14, dtype=np.float32),
    ],
    ids=["nan", "wrong-dim", "wrong-batch", "flat"],
)
def test_bad_actions_raise(sub_pool, bad):
    with pytest.raises(ValueError, match="actions must"):
        sub_pool.step(bad)


def test_two_tasks_in_one_pool(two_task_pool):
    obs = two_task_pool.reset(seeds=[1, 1])
    _assert_real_images(obs.images, 2)
    assert obs.task_ids == ["PickCube-v1", "PushCube-v1"]
    assert obs.instructions == [registered_tasks()[t] for t in obs.task_ids]
    assert (obs.images[0] != obs.images[1]).any()
    assert two_task_pool.max_episode_steps == {"PickCube-v1": 50, "PushCube-v1": 50}
    res = two_task_pool.step(np.random.default_rng(0).uniform(-1, 1, (2, 7)).astype(np.float32))
    _assert_real_images(res.obs.images, 2)
    assert not res.done.any()
    # Resetting with the same seeds reproduces the first frames exactly.
    np.testing.assert_array_equal(two_task_pool.reset(seeds=[1, 1]).images, obs.images)


@pytest.mark.parametrize("ignore_terminations", [False, True])
def test_success_terminates_unless_ignored(ignore_terminations):
    cfg = EnvPoolConfig(
        task_ids=["TestAlwaysSuccess-v1"],
        max_episode_steps=2,
        ignore_terminations=ignore_terminations,
        task_modules=[TEST_MODULE],
    )
    with EnvPool(cfg) as pool:
        pool.reset(seeds=[0])
        res = pool.step(_zeros(pool))
        assert res.success.tolist() == [True]
        assert res.rewards.tolist() == [1.0]  # normalized_dense gives 1 on success
        if ignore_terminations:
            assert not res.terminated.any() and not res.truncated.any() and res.episodes == []
            res = pool.step(_zeros(pool))
            assert res.truncated.tolist() == [True] and not res.terminated.any()
        else:
            assert res.terminated.tolist() == [True] and not res.truncated.any()
        [(index, stats)] = res.episodes
        assert index == 0 and stats["success_once"] is True
        assert stats["episode_len"] == (2 if ignore_terminations else 1)
        assert stats["return"] == pytest.approx(float(stats["episode_len"]))


def test_reset_seeds_are_checked(two_task_pool):
    with pytest.raises(ValueError, match="one entry per env"):
        two_task_pool.reset(seeds=[1])
    with pytest.raises(ValueError, match="integers in"):
        two_task_pool.reset(seeds=[1, -1])


def test_unknown_task_names_it_and_lists_known():
    with pytest.raises(ValueError, match=r"NoSuchTask-v9.*PickCube-v1"):
        EnvPool(EnvPoolConfig(task_ids=["NoSuchTask-v9"]))


def test_instruction_without_env_asks_for_task_module():
    register_task("OnlyAnInstruction-v1", "do something")
    with pytest.raises(ValueError, match="task_modules"):
        EnvPool(EnvPoolConfig(task_ids=["OnlyAnInstruction-v1"]))


EE_DEFAULT_TASK_ID = "TestPickCubeEEDefault-v1"


def _register_task_with_own_default_controller() -> None:
    """PickCube whose env (not ManiSkill's Panda agent, whose first controller is the 8-d
    pd_joint_delta_pos) defaults to pd_ee_delta_pose, as the WidowX Bridge tasks default to
    their 7-d controller: only an unset control_mode gets it."""
    from mani_skill.envs.tasks.tabletop.pick_cube import PickCubeEnv
    from mani_skill.utils.registration import REGISTERED_ENVS, register_env

    if EE_DEFAULT_TASK_ID not in REGISTERED_ENVS:

        @register_env(EE_DEFAULT_TASK_ID, max_episode_steps=20)
        class _EEDefaultPickCube(PickCubeEnv):
            def __init__(self, *args, control_mode="pd_ee_delta_pose", **kwargs):
                super().__init__(*args, control_mode=control_mode, **kwargs)

    register_task(EE_DEFAULT_TASK_ID, "pick up the red cube")


def test_control_mode_none_is_the_tasks_default_controller():
    # None passes no control_mode to gym.make: the Panda agent's default, 8-d joint deltas.
    with EnvPool(EnvPoolConfig(control_mode=None, image_size=32)) as pool:
        assert pool.controllers == {"PickCube-v1": "pd_joint_delta_pos"}
        assert pool.action_dim == 8
        pool.reset(seeds=[0])
        assert pool.step(np.zeros((1, 8), np.float32)).obs.images.shape == (1, 32, 32, 3)
    # An explicit controller sets the action space.
    with EnvPool(EnvPoolConfig(control_mode="pd_ee_delta_pos", image_size=32)) as pool:
        assert pool.controllers == {"PickCube-v1": "pd_ee_delta_pos"} and pool.action_dim == 4
    # A task's own default (not ManiSkill's agent default) is kept when control_mode is None.
    _register_task_with_own_default_controller()
    cfg = EnvPoolConfig(
        task_ids=[EE_DEFAULT_TASK_ID], control_mode=None, image_size=32, action_dim=7
    )
    with EnvPool(cfg) as pool:
        assert pool.controllers == {EE_DEFAULT_TASK_ID: "pd_ee_delta_pose"}
        assert pool.action_dim == 7


@pytest.mark.parametrize(
    "control_mode, needles",
    [
        (None, ["control_mode unset", "pd_joint_delta_pos", "Box(8,)", "7-d"]),
        ("pd_ee_delta_pos", ["control_mode 'pd_ee_delta_pos'", "Box(4,)", "7-d"]),
        ("pd_no_such_mode", ["control_mode 'pd_no_such_mode'", "pd_ee_delta_pose"]),
    ],
)
def test_controller_must_take_the_policys_actions(control_mode, needles):
    """action_dim=7 (what the env server asks): a controller of another size fails at build
    time with a message naming control_mode and the action space, in this process and in a
    worker subprocess."""
    for worker_mode in ("in_process", "subprocess"):
        cfg = EnvPoolConfig(
            control_mode=control_mode, image_size=16, action_dim=7, worker_mode=worker_mode
        )
        with pytest.raises(ValueError) as err:
            EnvPool(cfg)
        for needle in needles:
            assert needle in str(err.value), (worker_mode, str(err.value))


def test_probe_controllers_reports_each_tasks_action_space():
    """The env server's pre-collection check: no rendering, in a subprocess."""
    from services.env_server.env_pool import probe_controllers

    [default, test_task] = probe_controllers(
        ["PickCube-v1", "TestPickCube-v1"], None, task_modules=[TEST_MODULE]
    )
    assert default == {
        "action_dim": 8,
        "control_mode": "pd_joint_delta_pos",
        "action_space": "Box(8,)",
    }
    assert test_task == default
    [ee] = probe_controllers(["PickCube-v1"], "pd_ee_delta_pose")
    assert ee["control_mode"] == "pd_ee_delta_pose" and ee["action_dim"] == 7
    with pytest.raises(ValueError, match="control_mode 'pd_no_such_mode'"):
        probe_controllers(["PickCube-v1"], "pd_no_such_mode")
    with pytest.raises(ValueError, match="no_such_module"):
        probe_controllers(["PickCube-v1"], None, task_modules=["no_such_module"])


def test_gpu_backend_without_cuda_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        EnvPool(EnvPoolConfig(sim_backend="gpu", num_envs=2))


def test_batched_backend_code_path_on_cpu_physics():
    """The GPU backend's code, run with physx_cpu and one env (all this machine can do)."""
    from services.env_server.env_pool import _GpuBatchedEnvs

    cfg = EnvPoolConfig(num_envs=1, max_episode_steps=2)
    envs = _GpuBatchedEnvs(cfg, "pick up the red cube", sim_backend="physx_cpu")
    try:
        images, texts = envs.reset([4])
        _assert_real_images(images, 1)
        assert texts == ["pick up the red cube"]
        np.testing.assert_array_equal(envs.reset([4])[0], images)
        envs.step(np.zeros((1, 7), np.float32), [9])
        out = envs.step(np.zeros((1, 7), np.float32), [9])
        assert out["truncated"].tolist() == [True] and out["episode_stats"][0]["episode_len"] == 2
        assert (out["final_images"] != out["images"]).any()
    finally:
        envs.close()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(task_ids="PickCube-v1"), "task_ids"),
        (dict(task_ids=[]), "task_ids"),
        (dict(num_envs=0), "num_envs"),
        (dict(task_ids=["PickCube-v1", "PushCube-v1"], num_envs=1), "num_envs"),
        (dict(sim_backend="tpu"), "sim_backend"),
        (dict(sim_backend="gpu", task_ids=["PickCube-v1", "PushCube-v1"], num_envs=2), "task_ids"),
        (dict(image_size=0), "image_size"),
        (dict(camera=""), "camera"),
        (dict(max_episode_steps=0), "max_episode_steps"),
        (dict(reward_mode="shaped"), "reward_mode"),
        (dict(seed=-1), "seed"),
        (dict(task_modules="my.module"), "task_modules"),
        (dict(worker_mode="threads"), "worker_mode"),
        (dict(ignore_terminations=1), "ignore_terminations"),
        (dict(control_mode=""), "control_mode"),
        (dict(action_dim=0), "action_dim"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EnvPoolConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    assert EnvPoolConfig.from_dict({"num_envs": 2}).num_envs == 2
    with pytest.raises(ValueError, match="num_env"):
        EnvPoolConfig.from_dict({"num_env": 2})


def test_a_killed_worker_is_replaced_and_one_that_cannot_start_stays_lost():
    """A worker killed and not yet reaped, as the OOM killer leaves it: the next step raises
    EnvWorkerDied and restart_dead_workers replaces it (the other worker keeps its process).
    A replacement that fails to start is stopped and stays lost: the pool's next call raises
    EnvWorkerDied again, and a later restart that succeeds brings the pool back."""
    import os
    import signal

    from services.env_server.env_pool import EnvWorkerDied

    cfg = EnvPoolConfig(task_ids=["PickCube-v1"], num_envs=2, max_episode_steps=5,
                        worker_mode="subprocess", image_size=64)  # fmt: skip
    with EnvPool(cfg) as pool:
        backend = pool._backend
        pool.reset([1, 2])
        survivor = backend.procs[0].pid
        os.kill(backend.procs[1].pid, signal.SIGKILL)  # not joined: the parent has not reaped it
        with pytest.raises(EnvWorkerDied, match="env worker 1 \\(PickCube-v1\\)"):
            pool.step(_zeros(pool))
        assert pool.restart_dead_workers() == [1]
        assert backend.procs[0].pid == survivor and not backend.lost
        obs = pool.reset([1, 2])
        assert obs.images.shape == (2, 64, 64, 3)

        os.kill(backend.procs[1].pid, signal.SIGKILL)
        with pytest.raises(EnvWorkerDied):
            pool.step(_zeros(pool))
        # Its replacement cannot build its env.
        backend.task_ids[1] = "NoSuchTask-v1"
        backend.instructions = {**backend.instructions, "NoSuchTask-v1": "do nothing"}
        assert pool.restart_dead_workers() == []
        assert backend.lost == {1} and not backend.procs[1].is_alive()
        with pytest.raises(EnvWorkerDied):
            pool.reset([1, 2])
        backend.task_ids[1] = "PickCube-v1"
        assert pool.restart_dead_workers() == [1]
        pool.reset([1, 2])  # a replaced env starts from a reset, as the collector does
        assert pool.step(_zeros(pool)).rewards.shape == (2,)
