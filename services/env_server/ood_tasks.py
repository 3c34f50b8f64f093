"""Out-of-distribution evaluation splits of PickCube-v1 and PushCube-v1, in RL4VLA's three
categories (Vision, Semantic, Execution), as ManiSkill envs under new ids.

Name this module in a config and the split's ids in ``task_ids``::

    env:
      eval:
        task_modules: [services.env_server.ood_tasks]
        task_ids: [PickCube-v1-vision-light, PickCube-v1-execution-moved]

Every variant subclasses the base task (which stays untouched), keeps its success test
(``evaluate``), its dense reward and its time limit (50 steps), and is deterministic for a given
reset seed. Only ManiSkill's own assets and the base tasks' own randomisation are used. The ids are
``<base id>-<category>-<variant>``, for base ids PickCube-v1 and PushCube-v1:

Vision: the physical episode (robot, cube, goal, every reward) is exactly the base task's for the
same seed; only the picture changes, so a drop in success measures visual robustness alone.

- ``-vision-light``: dim, warm lighting. The base scene has a grey ambient light of 0.3 and two
  white directional lights (one from behind the robot's right, one from straight above); this
  one has a faint blue-grey ambient light (0.08) and a single low orange light (1.0, 0.55, 0.3)
  from the robot's front left. Every pixel's colour and brightness shift, shading falls on the
  other side of the cube, and the red/blue cube hues change, none of which the policy has seen.
- ``-vision-table``: the table's wood texture is replaced by a uniform dark green matte surface
  (the same table mesh, retinted). The policy has only seen the table as the background of every
  image; everything that is not robot or cube changes.
- ``-vision-camera``: the observation camera (``base_camera``) is moved by a fixed offset, drawn
  once with seed 7: 4 cm in a random direction and a 5 degree rotation about a random axis
  (``CAMERA_OFFSET_M`` = (0.000, +0.029, -0.027) m, i.e. to the robot's left and down;
  ``CAMERA_ROTATION_QUAT``: about 3 degrees of roll, 3.5 of pan and 1.5 of tilt, so the
  horizon tilts). The same scene seen from a viewpoint the policy never had: image-space
  positions of the gripper and cube shift, and the image-to-action mapping a policy learnt is
  off by the same amount.

Semantic: the object or the words differ from training.

- ``-semantic-colour``: the cube is yellow (PickCube; base red) or purple (PushCube; base blue),
  and the instruction names that colour. An unseen object appearance together with an unseen
  word: the policy must ground the new colour name in the new pixels.
- ``-semantic-size``: the cube's half-size is 1.25x the base task's (0.025 m instead of 0.02 m,
  a 5 cm cube that the Panda gripper's 8 cm opening still grasps). The instruction is unchanged.
  Every use of the size follows (spawn height, PickCube's goal height, PushCube's push pose,
  on-the-table test and z reward), through ``cube_half_size``; PickCube's goal threshold
  (0.025 m from the cube centre) does not depend on the size. An unseen object shape that also
  needs a wider grasp.
- ``-semantic-paraphrase``: the scene is the base task's; only the instruction is reworded
  (PickCube: "grab the red block and bring it to the goal location"; PushCube: "slide the blue
  block ahead until it rests on the red and white target"). Tests whether the policy follows
  the meaning or the exact training string.

Execution: the motion the task needs differs from training.

- ``-execution-region``: the cube starts outside the training region. The base task samples its
  xy uniformly in [-0.1, 0.1]^2 (table frame, robot base at x = -0.615); here x is the base
  sample and y is mapped from the base sample to the side bands 0.13 <= |y| <= 0.20 (same side
  as the base sample), so the cube is fully outside every training footprint yet within the
  Panda's reach and the camera's view. PushCube's goal moves with the cube (it is defined as
  cube xy + (0.2, 0)); PickCube's hidden goal stays where the base task puts it. The arm must
  reach into a part of the workspace it has never acted in.
- ``-execution-moved``: once per episode, right before the physics of step
  ``MOVE_AT_STEP`` (10; 1-based), the cube is picked up by the environment and put down on the
  table ``MOVE_DISTANCE_M`` (5 cm) away, in a horizontal direction drawn from the episode's seed,
  with its orientation kept and its velocity zeroed (a cube held in the air is put back on the
  table; with a time limit under 10 steps nothing moves). The observation returned by step 10
  is the first that shows the moved cube. A policy trained on static scenes must notice the
  change and re-plan mid-episode.

Variants that change appearance skip it when the env is built without a renderer (as
env_pool's ``probe_controllers`` builds them). The GPU sim (``physx_cuda``) paths of
``-execution-region`` and ``-execution-moved`` follow ManiSkill's batched API (per-env masks,
``_gpu_apply_all``) but have not been run here: no machine here has GPU physics.

Determinism: the vision and semantic changes are fixed; the region mapping is a function of the
base task's own seeded sample; the move direction is a function of the episode seed (ManiSkill's
``_episode_seed``, set by every seeded reset, which the env pool always does).

The registered instructions are in ``INSTRUCTIONS``, and every variant id is in ``VARIANT_IDS``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import sapien
import sapien.render
import torch
from mani_skill.envs.tasks.tabletop.pick_cube import PickCubeEnv
from mani_skill.envs.tasks.tabletop.push_cube import PushCubeEnv
from mani_skill.utils.registration import REGISTERED_ENVS, register_env
from mani_skill.utils.structs.pose import Pose
from transforms3d.quaternions import axangle2quat

from services.env_server.tasks import register_task, registered_tasks

# --------------------------------------------------------------------------------------------
# The fixed parameters of each variant
# --------------------------------------------------------------------------------------------

LIGHT_AMBIENT = (0.08, 0.08, 0.1)
"""-vision-light: ambient light (base: 0.3 grey)."""
LIGHT_DIRECTION = (-0.6, -1.0, -0.35)
"""-vision-light: direction the single directional light travels (from the robot's front left,
low over the table); the base lights travel along (1, 1, -1) and (0, 0, -1)."""
LIGHT_COLOUR = (1.0, 0.55, 0.3)
"""-vision-light: colour (and intensity) of that light; the base lights are white (1, 1, 1)."""

TABLE_COLOUR = (0.12, 0.32, 0.2, 1.0)
"""-vision-table: RGBA of the untextured, matte table (base: a wood texture)."""
TABLE_ROUGHNESS = 0.9

CAMERA_PERTURBATION_SEED = 7
CAMERA_SHIFT_M = 0.04
CAMERA_ROTATION_DEG = 5.0


def _camera_perturbation() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(CAMERA_PERTURBATION_SEED)
    shift = rng.normal(size=3)
    shift *= CAMERA_SHIFT_M / np.linalg.norm(shift)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return shift, axangle2quat(axis, math.radians(CAMERA_ROTATION_DEG))


CAMERA_OFFSET_M, CAMERA_ROTATION_QUAT = _camera_perturbation()
"""-vision-camera: the camera's position moves by CAMERA_OFFSET_M (world frame, |.| = 4 cm) and
its orientation turns by CAMERA_ROTATION_QUAT (wxyz, in the camera's own frame, 5 degrees)."""

CUBE_COLOURS = {
    "PickCube-v1": ("yellow", (1.0, 0.85, 0.0, 1.0)),
    "PushCube-v1": ("purple", (0.45, 0.1, 0.65, 1.0)),
}
"""-semantic-colour: the cube's colour name and RGBA (base: red / blue)."""

SIZE_SCALE = 1.25
"""-semantic-size: the cube's half-size is this times the base task's (0.02 m)."""

TRAIN_XY_HALF_RANGE = 0.1
"""Both base tasks sample the cube's xy uniformly in [-0.1, 0.1]^2."""
REGION_Y_BAND = (0.13, 0.20)
"""-execution-region: |y| of the cube's start (base: |y| <= 0.1)."""

MOVE_AT_STEP = 10
"""-execution-moved: the cube moves right before the physics of this step (1-based), so the
observation, reward and success returned by this step are the first to see it moved."""
MOVE_DISTANCE_M = 0.05
"""-execution-moved: how far the cube moves, horizontally."""
_MOVE_SALT = 0x0D0D


def move_offset(episode_seed: int) -> np.ndarray:
    """-execution-moved: the (dx, dy) by which the cube moves in the episode of this seed."""
    angle = np.random.default_rng([_MOVE_SALT, int(episode_seed)]).uniform(0.0, 2.0 * np.pi)
    return MOVE_DISTANCE_M * np.array([np.cos(angle), np.sin(angle)])


# --------------------------------------------------------------------------------------------
# Mixins: one per variant, over either base task
# --------------------------------------------------------------------------------------------


class _OodBase:
    """What the mixins need to know about the base task."""

    _cube_attr: str = "cube"
    """Name of the cube actor (PickCube: cube, PushCube: obj)."""
    _goal_follows_cube: str | None = None
    """Actor whose pose is defined relative to the cube's start (PushCube: goal_region)."""

    @property
    def ood_cube(self) -> Any:
        return getattr(self, self._cube_attr)


class _DimWarmLight(_OodBase):
    def _load_lighting(self, options: dict) -> None:
        self.scene.set_ambient_light(list(LIGHT_AMBIENT))
        self.scene.add_directional_light(
            list(LIGHT_DIRECTION),
            list(LIGHT_COLOUR),
            shadow=self.enable_shadow,
            shadow_scale=5,
            shadow_map_size=2048,
        )


class _GreenTable(_OodBase):
    def _load_scene(self, options: dict) -> None:
        super()._load_scene(options)
        # Each built table owns its materials (they are not shared with other envs that load
        # the same .glb), so retinting them changes this env only.
        for obj in self.table_scene.table._objs:
            body = obj.find_component_by_type(sapien.render.RenderBodyComponent)
            if body is None:  # built without a renderer (render_backend="none")
                continue
            for shape in body.render_shapes:
                for part in shape.parts:
                    mat = part.material
                    mat.base_color_texture = None  # the wood
                    mat.normal_texture = None  # its grain
                    mat.roughness_texture = None
                    mat.metallic_texture = None
                    mat.base_color = list(TABLE_COLOUR)
                    mat.roughness = TABLE_ROUGHNESS
                    mat.metallic = 0.0


class _MovedCamera(_OodBase):
    @property
    def _default_sensor_configs(self):
        configs = super()._default_sensor_configs
        configs = list(configs) if isinstance(configs, (list, tuple)) else [configs]
        out = []
        for cfg in configs:
            if cfg.uid == "base_camera":
                pose = cfg.pose
                moved = Pose.create_from_pq(p=pose.p + torch.tensor(CAMERA_OFFSET_M).float())
                rotated = Pose.create_from_pq(q=torch.tensor(CAMERA_ROTATION_QUAT).float())
                new_q = Pose.create_from_pq(q=pose.q)
                cfg = dataclasses.replace(cfg, pose=moved * new_q * rotated)
            out.append(cfg)
        return out


class _RecolouredCube(_OodBase):
    _cube_rgba: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    def _load_scene(self, options: dict) -> None:
        super()._load_scene(options)
        for obj in self.ood_cube._objs:  # build_cube gives each cube a material of its own
            body = obj.find_component_by_type(sapien.render.RenderBodyComponent)
            if body is None:  # built without a renderer
                continue
            for shape in body.render_shapes:
                shape.material.base_color = list(self._cube_rgba)


class _ScaledCube(_OodBase):
    """``cube_half_size`` is SIZE_SCALE times what the base task sets (PickCube sets it in its
    __init__, PushCube has it as a class attribute); every use of it in the task follows."""

    _base_half_size: float | None = None

    @property
    def cube_half_size(self) -> float:
        base = self.__dict__.get("_ood_base_half_size", self._base_half_size)
        if base is None:
            raise AttributeError(f"{type(self).__name__} has no cube_half_size set yet")
        return SIZE_SCALE * base

    @cube_half_size.setter
    def cube_half_size(self, value: float) -> None:
        self.__dict__["_ood_base_half_size"] = value


class _Paraphrase(_OodBase):
    """The base scene; only the registered instruction differs."""


class _OutOfRegionStart(_OodBase):
    def _initialize_episode(self, env_idx: torch.Tensor, options: dict) -> None:
        super()._initialize_episode(env_idx, options)  # the base task's seeded sample
        with torch.device(self.device):
            pose = self.ood_cube.pose
            p, q = pose.p[env_idx].clone(), pose.q[env_idx].clone()
            y = p[:, 1]
            frac = (y.abs() / TRAIN_XY_HALF_RANGE).clamp(0.0, 1.0)
            lo, hi = REGION_Y_BAND
            new_y = torch.where(y >= 0, 1.0, -1.0) * (lo + frac * (hi - lo))
            dy = new_y - y
            p[:, 1] = new_y
            self.ood_cube.set_pose(Pose.create_from_pq(p, q))
            if self._goal_follows_cube is not None:
                goal = getattr(self, self._goal_follows_cube)
                gp, gq = goal.pose.p[env_idx].clone(), goal.pose.q[env_idx].clone()
                gp[:, 1] += dy
                goal.set_pose(Pose.create_from_pq(gp, gq))


class _CubeMovedMidEpisode(_OodBase):
    def step(self, action):
        due = self.elapsed_steps == MOVE_AT_STEP - 1  # steps done so far, per env
        if bool(due.any()):
            self._ood_move_cube(torch.nonzero(due).reshape(-1))
        return super().step(action)

    def _ood_move_cube(self, env_idx: torch.Tensor) -> None:
        cube = self.ood_cube
        state = cube.get_state()[env_idx].clone()  # [n, 13]: p, q, linear and angular velocity
        seeds = (
            self._episode_seed
            if self._episode_seed is not None
            else np.zeros(self.num_envs, dtype=np.int64)
        )
        for row, i in enumerate(env_idx.tolist()):
            offset = torch.as_tensor(move_offset(int(seeds[i])), dtype=state.dtype)
            state[row, :2] += offset.to(state.device)
        state[:, 2] = self.cube_half_size  # put down on the table
        state[:, 7:] = 0.0
        cube.set_state(state, env_idx)
        if self.gpu_sim_enabled:
            self.scene._gpu_apply_all()
            self.scene._gpu_fetch_all()


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

_BASES: dict[str, dict[str, Any]] = {
    "PickCube-v1": dict(
        cls=PickCubeEnv,
        cube_attr="cube",
        goal_follows_cube=None,
        colour="pick up the yellow cube and move it to the goal position",
        paraphrase="grab the red block and bring it to the goal location",
    ),
    "PushCube-v1": dict(
        cls=PushCubeEnv,
        cube_attr="obj",
        goal_follows_cube="goal_region",
        colour="push the purple cube forward onto the red and white target",
        paraphrase="slide the blue block ahead until it rests on the red and white target",
    ),
}

VARIANTS: dict[str, type] = {
    "vision-light": _DimWarmLight,
    "vision-table": _GreenTable,
    "vision-camera": _MovedCamera,
    "semantic-colour": _RecolouredCube,
    "semantic-size": _ScaledCube,
    "semantic-paraphrase": _Paraphrase,
    "execution-region": _OutOfRegionStart,
    "execution-moved": _CubeMovedMidEpisode,
}

VARIANT_IDS: list[str] = []
"""Every registered variant id, ``<base id>-<category>-<variant>``."""
INSTRUCTIONS: dict[str, str] = {}
"""Variant id -> its registered instruction."""


def _instruction(base_id: str, variant: str) -> str:
    """The colour and paraphrase variants have their own words; every other variant asks for
    exactly what the base task asks (its registered instruction)."""
    if variant == "semantic-colour":
        return _BASES[base_id]["colour"]
    if variant == "semantic-paraphrase":
        return _BASES[base_id]["paraphrase"]
    return registered_tasks()[base_id]


def _class_name(base_cls: type, variant: str) -> str:
    stem = base_cls.__name__.removesuffix("Env")
    return stem + "".join(w.capitalize() for w in variant.split("-")) + "Env"


def _register_all() -> None:
    for base_id, info in _BASES.items():
        base_cls = info["cls"]
        max_steps = REGISTERED_ENVS[base_id].max_episode_steps
        for variant, mixin in VARIANTS.items():
            task_id = f"{base_id}-{variant}"
            attrs: dict[str, Any] = dict(
                __module__=__name__,
                __doc__=f"{base_id} with the OOD change {variant!r} (see {__name__}).",
                _cube_attr=info["cube_attr"],
                _goal_follows_cube=info["goal_follows_cube"],
            )
            if mixin is _RecolouredCube:
                attrs["_cube_rgba"] = CUBE_COLOURS[base_id][1]
            if mixin is _ScaledCube:
                attrs["_base_half_size"] = getattr(base_cls, "cube_half_size", None)
            name = _class_name(base_cls, variant)
            cls = type(name, (mixin, base_cls), attrs)
            globals()[name] = cls  # importable by name (pickling)
            register_env(task_id, max_episode_steps=max_steps)(cls)
            instruction = _instruction(base_id, variant)
            register_task(task_id, instruction)
            VARIANT_IDS.append(task_id)
            INSTRUCTIONS[task_id] = instruction


_register_all()
