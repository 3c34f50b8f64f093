"""The OOD variants of services/env_server/ood_tasks.py on real ManiSkill3 (CPU physics and
rendering), built the way the env pool builds its envs: the module imported by path,
``resolve_task``, then env_pool's ``_SingleEnv`` (gym.make with obs 224x224, pd_ee_delta_pose).

Each variant runs one short episode of zero actions from SEED and is compared with its base task
from the same seed: what should change does, what should not does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from services.env_server.env_pool import EnvPoolConfig, _SingleEnv, probe_controllers
from services.env_server.tasks import import_task_modules, resolve_task

# 18 rendered env builds (~1 s each while one renderer stays alive) and a controller probe:
# ~45 s of CPU, 1.5-2 min on 2 shared cores.
pytestmark = pytest.mark.slow

MODULE = "services.env_server.ood_tasks"
SIZE = 224
SEED = 1  # the cube starts in the open, away from the gripper (seen in the images)
N_STEPS = 3
BASES = ("PickCube-v1", "PushCube-v1")
SUFFIXES = (
    "vision-light",
    "vision-table",
    "vision-camera",
    "semantic-colour",
    "semantic-size",
    "semantic-paraphrase",
    "execution-region",
    "execution-moved",
)
ALL_IDS = [f"{b}-{s}" for b in BASES for s in SUFFIXES]
REGION_SEEDS = (0, 1, 2, 3, 4, 5)


def _build(task_id: str) -> tuple[_SingleEnv, str, int]:
    import_task_modules([MODULE])
    instruction, max_steps = resolve_task(task_id)
    cfg = EnvPoolConfig(task_ids=[task_id], task_modules=[MODULE], image_size=SIZE)
    return _SingleEnv(cfg, task_id, instruction), instruction, max_steps


def _zeros() -> np.ndarray:
    return np.zeros(7, dtype=np.float32)


def _cube(env: _SingleEnv) -> Any:
    u = env.env.unwrapped
    return u.cube if hasattr(u, "cube") else u.obj  # PickCube: cube, PushCube: obj


def _goal(env: _SingleEnv) -> Any:
    u = env.env.unwrapped
    return u.goal_site if hasattr(u, "goal_site") else u.goal_region


def _pose(actor: Any) -> tuple[np.ndarray, np.ndarray]:
    pose = actor.pose
    return pose.p[0].numpy().copy(), pose.q[0].numpy().copy()


def _cube_rgba(env: _SingleEnv) -> list[float]:
    import sapien.render

    body = _cube(env)._objs[0].find_component_by_type(sapien.render.RenderBodyComponent)
    return list(body.render_shapes[0].material.base_color)


def _cube_collision_half_size(env: _SingleEnv) -> np.ndarray:
    import sapien.physx

    body = _cube(env)._objs[0].find_component_by_type(sapien.physx.PhysxRigidDynamicComponent)
    (shape,) = body.collision_shapes
    return np.asarray(shape.half_size)


def _camera_pose(env: _SingleEnv) -> tuple[np.ndarray, np.ndarray]:
    pose = env.env.unwrapped._sensors["base_camera"].camera.global_pose
    return pose.p[0].numpy().copy(), pose.q[0].numpy().copy()


def _assert_real_image(img: np.ndarray) -> None:
    assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3)
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 100


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose colour differs by more than 10 (of 255) in some channel."""
    return float((np.abs(a.astype(int) - b.astype(int)).max(axis=-1) > 10).mean())


@dataclass
class Episode:
    """One short zero-action episode from SEED, and what the env holds at its end."""

    env: _SingleEnv
    instruction: str
    max_steps: int
    first_image: np.ndarray
    cube_start: tuple[np.ndarray, np.ndarray]
    goal_start: tuple[np.ndarray, np.ndarray]
    cube_p: list[np.ndarray]  # after reset, then after each step
    images: list[np.ndarray]  # the same
    rewards: list[float]
    successes: list[bool]


def _episode(task_id: str, n_steps: int = N_STEPS, seed: int = SEED) -> Episode:
    env, instruction, max_steps = _build(task_id)
    img, got_instruction = env.reset(seed)
    assert got_instruction == instruction
    ep = Episode(
        env=env,
        instruction=instruction,
        max_steps=max_steps,
        first_image=img,
        cube_start=_pose(_cube(env)),
        goal_start=_pose(_goal(env)),
        cube_p=[_pose(_cube(env))[0]],
        images=[img],
        rewards=[],
        successes=[],
    )
    for _ in range(n_steps):
        out = env.step(_zeros(), seed + 1)
        assert out["episode"] is None  # no zero-action episode ends within a few steps
        ep.cube_p.append(_pose(_cube(env))[0])
        ep.images.append(out["image"])
        ep.rewards.append(out["reward"])
        ep.successes.append(out["success"])
    return ep


@pytest.fixture(scope="module")
def base():
    """Per base task, from SEED: its instruction, first image, state and appearance.

    The base envs stay open until the module ends: while any env is alive SAPIEN keeps its
    renderer, so building each variant's env takes about a second instead of ~15 s."""
    refs, envs = {}, []
    try:
        yield _base_refs(refs, envs)
    finally:
        for env in envs:
            env.close()


def _base_refs(refs: dict, envs: list) -> dict[str, dict[str, Any]]:
    for task_id in BASES:
        ep = _episode(task_id)
        envs.append(ep.env)
        starts = {}
        for s in REGION_SEEDS:
            ep.env.reset(s)
            starts[s] = (_pose(_cube(ep.env))[0], _pose(_goal(ep.env))[0])
        refs[task_id] = dict(
            instruction=ep.instruction,
            max_steps=ep.max_steps,
            first_image=ep.first_image,
            cube_start=ep.cube_start,
            goal_start=ep.goal_start,
            cube_p=ep.cube_p,
            cube_rgba=_cube_rgba(ep.env),
            cube_half_size=_cube_collision_half_size(ep.env),
            camera=_camera_pose(ep.env),
            starts=starts,
        )
    return refs


@pytest.fixture(scope="module")
def episode(request, base):
    """_episode(task_id) for the test's parametrised task id, shared by that id's tests (pytest
    groups them; the env is closed before the next id's is built). Tests that step or reset the
    env again compare against the recorded episode, never against the env's current state."""
    ep = _episode(request.param)
    yield ep
    ep.env.close()


def _base_of(task_id: str) -> str:
    return next(b for b in BASES if task_id.startswith(b + "-"))


def _assert_same_state_as_base(ep: Episode, ref: dict) -> None:
    np.testing.assert_allclose(ep.cube_start[0], ref["cube_start"][0], atol=1e-6)
    np.testing.assert_allclose(ep.cube_start[1], ref["cube_start"][1], atol=1e-6)
    np.testing.assert_allclose(ep.goal_start[0], ref["goal_start"][0], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Every variant
# --------------------------------------------------------------------------------------------


def test_module_registers_exactly_the_expected_variants():
    import_task_modules([MODULE])
    from services.env_server import ood_tasks

    assert sorted(ood_tasks.VARIANT_IDS) == sorted(ALL_IDS)
    for task_id in ALL_IDS:
        instruction, max_steps = resolve_task(task_id)
        base_instruction, base_steps = resolve_task(_base_of(task_id))
        assert max_steps == base_steps == 50
        changed = task_id.endswith(("semantic-colour", "semantic-paraphrase"))
        assert (instruction != base_instruction) == changed, task_id


def test_every_variant_builds_without_a_renderer_for_the_controller_probe():
    # What the launcher checks before it starts anything: every env built with CPU physics and
    # render_backend="none" (no render bodies to recolour) takes the policy's 7-d actions.
    infos = probe_controllers(ALL_IDS, "pd_ee_delta_pose", [MODULE], timeout_s=300)
    assert [i["action_dim"] for i in infos] == [7] * len(ALL_IDS)
    assert {i["control_mode"] for i in infos} == {"pd_ee_delta_pose"}


@pytest.mark.parametrize("episode", ALL_IDS, indirect=True)
def test_variant_runs_keeps_success_and_reward_and_is_deterministic(episode, base):
    ep, task_id = episode, episode.env.task_id
    ref = base[_base_of(task_id)]
    assert ep.max_steps == ref["max_steps"]
    _assert_real_image(ep.first_image)
    rewards = np.array(ep.rewards)
    assert np.isfinite(rewards).all() and ((rewards >= 0) & (rewards <= 1)).all()
    assert not any(ep.successes)

    # Success still means "the cube is on the goal" (PickCube: placed within goal_thresh of
    # the goal; PushCube: on the target and resting on the table, at its own half-size).
    u = ep.env.env.unwrapped
    cube, goal = _cube(ep.env), _goal(ep.env)
    from mani_skill.utils.structs.pose import Pose

    key = "is_obj_placed" if task_id.startswith("PickCube") else "success"
    assert not bool(u.evaluate()[key][0])
    on_goal = goal.pose.p.clone()
    if task_id.startswith("PushCube"):
        on_goal[:, 2] = u.cube_half_size
    cube.set_pose(Pose.create_from_pq(on_goal, cube.pose.q))
    info = u.evaluate()
    assert bool(info[key][0])
    if task_id.startswith("PushCube"):  # the dense reward's maximum comes with success
        reward = u.compute_normalized_dense_reward(obs=None, action=None, info=info)
        assert float(reward[0]) == pytest.approx(1.0)

    # Determinism: the same seed gives the same start again, after an episode in between.
    img, _ = ep.env.reset(SEED)
    np.testing.assert_array_equal(img, ep.first_image)
    np.testing.assert_array_equal(_pose(cube)[0], ep.cube_start[0])
    other, _ = ep.env.reset(SEED + 1)
    assert (other != ep.first_image).any()


# --------------------------------------------------------------------------------------------
# Vision: the same episode, another picture
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("episode", [f"{b}-vision-light" for b in BASES], indirect=True)
def test_vision_light_darkens_the_same_scene(episode, base):
    ref = base[_base_of(episode.env.task_id)]
    _assert_same_state_as_base(episode, ref)
    assert episode.instruction == ref["instruction"]
    assert _changed_fraction(episode.first_image, ref["first_image"]) > 0.8
    # Dimmer overall, and warmer (more red than blue) than the base's white light.
    assert episode.first_image.mean() < 0.7 * ref["first_image"].mean()
    # What is white or grey under the base light (robot, floor) turns orange: red over blue.
    img, base_img = episode.first_image.astype(float), ref["first_image"].astype(float)
    grey = (np.abs(base_img[..., 0] - base_img[..., 2]) < 15) & (base_img.mean(axis=-1) > 60)
    assert grey.mean() > 0.1
    warmth = img[grey][:, 0].mean() / img[grey][:, 2].mean()
    base_warmth = base_img[grey][:, 0].mean() / base_img[grey][:, 2].mean()
    assert warmth > base_warmth + 0.1, (warmth, base_warmth)


@pytest.mark.parametrize("episode", [f"{b}-vision-table" for b in BASES], indirect=True)
def test_vision_table_is_green_instead_of_wood(episode, base):
    ref = base[_base_of(episode.env.task_id)]
    _assert_same_state_as_base(episode, ref)
    assert episode.instruction == ref["instruction"]
    corner = (slice(SIZE - 30, SIZE), slice(0, 30))  # bottom left: table only
    r, g, _ = episode.first_image[corner].reshape(-1, 3).mean(axis=0)
    br, bg, _ = ref["first_image"][corner].reshape(-1, 3).mean(axis=0)
    assert br > bg  # wood: orange-brown
    assert g > r  # green
    assert _changed_fraction(episode.first_image, ref["first_image"]) > 0.3


@pytest.mark.parametrize("episode", [f"{b}-vision-camera" for b in BASES], indirect=True)
def test_vision_camera_moves_the_viewpoint_a_few_cm_and_degrees(episode, base):
    ref = base[_base_of(episode.env.task_id)]
    _assert_same_state_as_base(episode, ref)
    assert episode.instruction == ref["instruction"]
    p, q = _camera_pose(episode.env)
    bp, bq = ref["camera"]
    shift = np.linalg.norm(p - bp)
    angle = math.degrees(2 * math.acos(min(1.0, abs(float(np.dot(q, bq))))))
    assert 0.02 <= shift <= 0.06, shift
    assert 2.0 <= angle <= 8.0, angle
    assert _changed_fraction(episode.first_image, ref["first_image"]) > 0.3


# --------------------------------------------------------------------------------------------
# Semantic: another object, other words
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("episode", [f"{b}-semantic-colour" for b in BASES], indirect=True)
def test_semantic_colour_recolours_the_cube_and_names_the_colour(episode, base):
    task_id = episode.env.task_id
    ref = base[_base_of(task_id)]
    _assert_same_state_as_base(episode, ref)
    colour = {"PickCube-v1": "yellow", "PushCube-v1": "purple"}[_base_of(task_id)]
    old = {"PickCube-v1": "red", "PushCube-v1": "blue"}[_base_of(task_id)]
    assert colour in episode.instruction and old not in episode.instruction
    assert episode.instruction == ref["instruction"].replace(old, colour)
    rgba = _cube_rgba(episode.env)
    assert not np.allclose(rgba, ref["cube_rgba"], atol=0.1)
    if colour == "yellow":
        assert rgba[0] > 0.8 and rgba[1] > 0.7 and rgba[2] < 0.2
    else:
        assert rgba[2] > rgba[1] and rgba[0] > rgba[1]
    # Only the cube's pixels change: a small, non-empty part of the image.
    assert 0.0 < _changed_fraction(episode.first_image, ref["first_image"]) < 0.05


@pytest.mark.parametrize("episode", [f"{b}-semantic-size" for b in BASES], indirect=True)
def test_semantic_size_scales_the_cube_in_physics_and_task_logic(episode, base):
    ref = base[_base_of(episode.env.task_id)]
    assert episode.instruction == ref["instruction"]
    np.testing.assert_allclose(
        _cube_collision_half_size(episode.env), 1.25 * ref["cube_half_size"], rtol=1e-5
    )
    assert episode.env.env.unwrapped.cube_half_size == pytest.approx(1.25 * 0.02)
    # Same xy and yaw as the base start; it rests on the table at its own half-size.
    np.testing.assert_allclose(episode.cube_start[0][:2], ref["cube_start"][0][:2], atol=1e-6)
    np.testing.assert_allclose(episode.cube_p[-1][2], 0.025, atol=1e-3)
    np.testing.assert_allclose(ref["cube_p"][-1][2], 0.02, atol=1e-3)
    assert _changed_fraction(episode.first_image, ref["first_image"]) > 0.0


@pytest.mark.parametrize("episode", [f"{b}-semantic-paraphrase" for b in BASES], indirect=True)
def test_semantic_paraphrase_changes_only_the_words(episode, base):
    ref = base[_base_of(episode.env.task_id)]
    _assert_same_state_as_base(episode, ref)
    np.testing.assert_array_equal(episode.first_image, ref["first_image"])
    assert episode.instruction != ref["instruction"]
    words, base_words = episode.instruction.split(), ref["instruction"].split()
    colour = "red" if episode.env.task_id.startswith("PickCube") else "blue"
    assert colour in words  # the same object,
    assert "cube" in base_words and "cube" not in words  # named otherwise,
    assert words[0] != base_words[0]  # and another verb


# --------------------------------------------------------------------------------------------
# Execution: another start, a moved cube
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("episode", [f"{b}-execution-region" for b in BASES], indirect=True)
def test_execution_region_starts_the_cube_outside_the_training_square(episode, base):
    task_id = episode.env.task_id
    ref = base[_base_of(task_id)]
    assert episode.instruction == ref["instruction"]
    assert _changed_fraction(episode.first_image, ref["first_image"]) > 0.0
    for s in REGION_SEEDS:
        episode.env.reset(s)
        cube_p, goal_p = _pose(_cube(episode.env))[0], _pose(_goal(episode.env))[0]
        base_cube, base_goal = ref["starts"][s]
        assert abs(base_cube[1]) <= 0.1 and abs(base_cube[0]) <= 0.1  # the training square
        assert 0.13 - 1e-6 <= abs(cube_p[1]) <= 0.20 + 1e-6, (s, cube_p)
        assert np.sign(cube_p[1]) == np.sign(base_cube[1])
        assert cube_p[0] == pytest.approx(base_cube[0], abs=1e-6)
        assert cube_p[2] == pytest.approx(base_cube[2], abs=1e-6)
        if task_id.startswith("PushCube"):  # the target stays 0.2 m in front of the cube
            np.testing.assert_allclose(goal_p[:2] - cube_p[:2], [0.2, 0.0], atol=1e-5)
        else:  # PickCube's goal is the base task's
            np.testing.assert_allclose(goal_p, base_goal, atol=1e-6)


@pytest.mark.parametrize("episode", [f"{b}-execution-moved" for b in BASES], indirect=True)
def test_execution_moved_displaces_the_cube_once_at_step_10(episode, base):
    ref = base[_base_of(episode.env.task_id)]
    _assert_same_state_as_base(episode, ref)
    np.testing.assert_array_equal(episode.first_image, ref["first_image"])
    env = episode.env

    def jumps(seed: int) -> list[np.ndarray]:
        env.reset(seed)
        ps = [_pose(_cube(env))[0]]
        for _ in range(12):
            out = env.step(_zeros(), seed)
            assert out["episode"] is None
            ps.append(_pose(_cube(env))[0])
        return [b - a for a, b in zip(ps[:-1], ps[1:], strict=True)]  # [t-1]: over step t

    first = jumps(SEED)
    for t, d in enumerate(first, start=1):
        if t == 10:
            assert np.linalg.norm(d[:2]) == pytest.approx(0.05, abs=0.005), d
            assert abs(d[2]) < 2e-3  # put back down on the table
        else:
            assert np.linalg.norm(d) < 2e-3, (t, d)  # the cube otherwise rests
    np.testing.assert_allclose(jumps(SEED)[9], first[9], atol=1e-6)  # every episode, same seed
    assert np.linalg.norm(jumps(SEED + 1)[9][:2] - first[9][:2]) > 1e-3  # another seed
