"""Scripted experts for the training tasks, acting in the policy's action space.

Each expert is a pure function ``state -> action``: ``state`` is the dict of privileged simulator
state that ``read_state`` takes from a ManiSkill env, ``action`` a float64 [7] ``pd_ee_delta_pose``
action normalised to [-1, 1] (xyz delta, rotation delta, gripper), the space the VLA acts in.
The experts keep no memory between steps: the phase (approach, descend, grasp, carry, push,
release) follows from the state, so an expert recovers by itself from a missed grasp or a cube
that was knocked away.

Frames and scales (ManiSkill 3.0.1, Panda, ``pd_ee_delta_pose``; see
``mani_skill/agents/robots/panda/panda.py`` and ``agents/controllers/pd_ee_pose.py``):

- positions and orientations in ``state`` are in the robot's root frame, the frame the controller
  takes its deltas in (the Panda's root sits at (-0.615, 0, 0) in the world, unrotated);
- an xyz action of 1 asks for a 0.1 m move of the TCP from where it is now (``pos_upper``); the
  PD arm covers about 40 % of the asked move within the control step (20 Hz; a first-order lag
  of 0.1 s), so the position gain below (> 1) is tuned for that lag, and the TCP moves at most
  ~4 cm and turns at most ~0.04 rad per step;
- the rotation action is clipped to norm 1 and multiplied by ``rot_lower`` = -0.1 rad: an action
  of +1 about z turns the TCP by -0.1 rad (``ROT_SCALE``); it is applied in the root frame
  (``root_aligned_body_rotation``) as XYZ Euler angles, which for such small angles is a rotation
  vector;
- the gripper action is an absolute finger target: -1 closed (-0.01 m), +1 open (0.04 m).

``ActionQuantizer`` maps an action through the policy's action tokenizer (256 bins over [-1, 1],
decoded to bin centres, un-normalised with the checkpoint's norm_stats) so that the expert is
measured on exactly the actions a VLA could emit; ``run_expert_episode`` steps a gym env that way
(without rendering: for measuring the experts; ``collect_demos`` records demonstrations).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

POS_SCALE = 0.1
"""Metres of TCP translation asked for by an xyz action of 1 (the Panda's pos_upper)."""
ROT_SCALE = -0.1
"""Radians of TCP rotation produced by a rotation action of +1 (ManiSkill scales by rot_lower)."""
GRIPPER_OPEN = 1.0
GRIPPER_CLOSED = -1.0
CUBE_HALF_SIZE = 0.02
"""Half edge of the cubes of PickCube, PushCube and StackCube (Panda configuration), metres."""

# Controller gains and tolerances, tuned on seeds 1000-1049 (see the tests for held-out seeds).
POS_GAIN = 1.5
"""xyz action = POS_GAIN * (target - tcp) / POS_SCALE, its norm clipped to MAX_POS_ACTION."""
MAX_POS_ACTION = 1.0
"""Largest norm of the xyz action (1: a 0.1 m move asked for)."""
MAX_REACH = 0.79
"""Horizontal distance (m) from the robot's root beyond which no TCP target is asked for:
ManiSkill's IK finds no downward-pointing pose much past 0.8 m (StackCube's cubes can lie up to
0.815 m away; such seeds fail)."""
ROT_GAIN = 1.0
"""rotation asked for per step = ROT_GAIN * the rotation error (a rotation vector)."""
HOVER_HEIGHT = 0.06
"""Height above the grasp point (m) at which the TCP waits until it is aligned over the cube."""
GRASP_XY_TOL = 0.008
GRASP_Z_TOL = 0.008
OPEN_FINGER_REACH = 0.045
"""Distance (m) from the TCP to the middle of an open finger, along the finger axis."""
FINGER_CLEARANCE = 0.045
"""Least distance (m) from an open finger to another cube's centre (its half diagonal, 0.028 m,
plus half a finger and a margin)."""
YAW_TOL = 0.06
"""Yaw error (rad) under which the fingers count as aligned with the cube's faces."""

# The TCP looks straight down: x along the root's x, y and z flipped (the Panda's home pose).
_R_DOWN = np.diag([1.0, -1.0, -1.0])


# --------------------------------------------------------------------------------------------
# Rotations (quaternions are ManiSkill's w, x, y, z)
# --------------------------------------------------------------------------------------------


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """[4] unit quaternion (w, x, y, z) -> [3, 3] rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _rotvec(r: np.ndarray) -> np.ndarray:
    """[3, 3] rotation matrix -> rotation vector (axis * angle)."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    skew = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if angle < 1e-6:
        return skew / 2.0
    if np.pi - angle < 1e-3:  # near a half turn the skew part vanishes; use the diagonal
        axis = np.sqrt(np.clip((np.diag(r) + 1.0) / 2.0, 0.0, None))
        axis *= np.where(skew >= 0, 1.0, -1.0)
        return axis / np.linalg.norm(axis) * angle
    return skew / (2.0 * np.sin(angle)) * angle


def _rz(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_of(q: np.ndarray) -> float:
    """Heading (rad) of a frame's x axis projected on the root's xy plane."""
    r = quat_to_matrix(q)
    return float(np.arctan2(r[1, 0], r[0, 0]))


def _wrap(angle: float, period: float) -> float:
    """angle wrapped into [-period / 2, period / 2)."""
    return float((angle + period / 2) % period - period / 2)


def _finger_axis(yaw: float) -> np.ndarray:
    """The direction (root xy) the fingers open along, for a downward TCP with this heading."""
    return np.array([np.sin(yaw), -np.cos(yaw)])  # the TCP's y axis, Rz(yaw) @ _R_DOWN


def grasp_yaw(
    tcp_quat: np.ndarray,
    cube_quat: np.ndarray,
    cube_pos: np.ndarray | None = None,
    avoid_pos: np.ndarray | None = None,
) -> float:
    """The TCP heading that puts the fingers on two opposite faces of the cube.

    A cube has two such finger axes (four headings, 90 degrees apart); the heading nearest the
    current one is taken, unless an open finger would then come down within FINGER_CLEARANCE of
    ``avoid_pos`` (another cube's centre) and the other axis keeps it farther away. (The TCP turns
    at most ~0.04 rad per step, so a 90-degree turn costs ~40 steps: it is avoided when possible.)
    """
    tcp_yaw = yaw_of(tcp_quat)
    first = tcp_yaw + _wrap(yaw_of(cube_quat) - tcp_yaw, np.pi / 2)
    if cube_pos is None or avoid_pos is None:
        return first
    cube_xy = np.asarray(cube_pos, dtype=np.float64)[:2]
    avoid_xy = np.asarray(avoid_pos, dtype=np.float64)[:2]

    def clearance(yaw: float) -> float:  # from avoid_pos to the nearer open fingertip
        tip = OPEN_FINGER_REACH * _finger_axis(yaw)
        return min(
            np.linalg.norm(cube_xy + tip - avoid_xy), np.linalg.norm(cube_xy - tip - avoid_xy)
        )

    if clearance(first) >= FINGER_CLEARANCE:
        return first
    second = first + (np.pi / 2 if first < tcp_yaw else -np.pi / 2)
    return second if clearance(second) > clearance(first) else first


# --------------------------------------------------------------------------------------------
# The controller shared by the experts
# --------------------------------------------------------------------------------------------


def move_action(
    state: Mapping[str, Any], target_pos: np.ndarray, target_yaw: float, gripper: float
) -> np.ndarray:
    """Proportional step of the TCP towards target_pos, pointing down with heading target_yaw.

    Returns a float64 [7] action in [-1, 1] (the rotation part with norm <= 1)."""
    target = np.array(target_pos, dtype=np.float64)
    reach = float(np.linalg.norm(target[:2]))
    if reach > MAX_REACH:  # beyond it the IK fails and the arm would not move at all
        target[:2] *= MAX_REACH / reach
    err = target - np.asarray(state["tcp_pos"], dtype=np.float64)
    pos = POS_GAIN * err / POS_SCALE
    # Bound the asked move's length, not each axis: ManiSkill's CPU IK (100 iterations) fails on
    # a long diagonal move near the edge of the workspace, and a failed IK leaves the arm where it
    # is, step after step.
    norm = float(np.linalg.norm(pos))
    if norm > MAX_POS_ACTION:
        pos *= MAX_POS_ACTION / norm
    r_des = _rz(target_yaw) @ _R_DOWN
    r_err = r_des @ quat_to_matrix(state["tcp_quat"]).T  # root-frame rotation still to go
    rot = ROT_GAIN * _rotvec(r_err) / ROT_SCALE
    norm = float(np.linalg.norm(rot))
    if norm > 1.0:
        rot /= norm
    return np.concatenate([pos, rot, [gripper]])


def _aligned(state: Mapping[str, Any], target: np.ndarray, yaw: float, xy: float, z: float) -> bool:
    d = np.asarray(target) - np.asarray(state["tcp_pos"])
    yaw_err = abs(_wrap(yaw - yaw_of(state["tcp_quat"]), 2 * np.pi))
    return bool(np.linalg.norm(d[:2]) < xy and abs(d[2]) < z and yaw_err < YAW_TOL)


def _reach_and_grasp(state: Mapping[str, Any], avoid_pos: np.ndarray | None = None) -> np.ndarray:
    """Open, hover over the object aligned with its faces, descend, close on it."""
    obj = np.asarray(state["obj_pos"], dtype=np.float64)
    yaw = grasp_yaw(state["tcp_quat"], state["obj_quat"], obj, avoid_pos)
    grasp = obj.copy()
    if _aligned(state, grasp, yaw, GRASP_XY_TOL, GRASP_Z_TOL):
        return move_action(state, grasp, yaw, GRIPPER_CLOSED)
    tcp = np.asarray(state["tcp_pos"], dtype=np.float64)
    xy_err = float(np.linalg.norm(obj[:2] - tcp[:2]))
    yaw_err = abs(_wrap(yaw - yaw_of(state["tcp_quat"]), 2 * np.pi))
    # A funnel: the TCP may come down only as close as its xy and yaw errors allow, so the open
    # fingers never land on the cube.
    clearance = min(HOVER_HEIGHT, 3.0 * max(0.0, xy_err - 0.004) + 0.2 * max(0.0, yaw_err - 0.03))
    target = grasp + np.array([0.0, 0.0, clearance])
    # Open on the way (this also reopens the fingers after a missed grasp).
    return move_action(state, target, yaw, GRIPPER_OPEN)


# --------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------


def pick_cube_expert(state: Mapping[str, Any]) -> np.ndarray:
    """PickCube-v1: grasp the cube, carry it to the goal and hold still there (success needs the
    cube within 2.5 cm of the goal and the arm static)."""
    if not state["is_grasped"]:
        return _reach_and_grasp(state)
    tcp = np.asarray(state["tcp_pos"], dtype=np.float64)
    offset = tcp - np.asarray(state["obj_pos"], dtype=np.float64)  # the cube hangs where it is
    target = np.asarray(state["goal_pos"], dtype=np.float64) + offset
    return move_action(state, target, yaw_of(state["tcp_quat"]), GRIPPER_CLOSED)


PUSH_HEIGHT = 0.015
"""TCP height while pushing (m): the closed fingertips below the cube's centre, above the table."""
PUSH_BEHIND = 0.045
"""Distance (m) behind the cube's centre where the TCP comes down before pushing (the closed
fingers reach about 1 cm ahead of the TCP, the cube's back face is 2 cm behind its centre)."""
PUSH_TRAVEL = 0.06
"""How far (m) ahead of the cube the push aims at each step (the target is 0.12 m ahead; success
needs the cube within 0.1 m of it, so >= 0.02 m of travel)."""
SAFE_HEIGHT = 0.06
"""Height (m) above PUSH_HEIGHT at which the TCP passes over the cube."""


def push_cube_expert(state: Mapping[str, Any]) -> np.ndarray:
    """PushCube-v1: close the gripper, come down behind the cube (on the far side from the
    target), push it towards the target until it is inside the target circle."""
    obj = np.asarray(state["obj_pos"], dtype=np.float64)
    goal = np.asarray(state["goal_pos"], dtype=np.float64)
    tcp = np.asarray(state["tcp_pos"], dtype=np.float64)
    yaw = 0.0  # fingers side by side across the push direction (+x)
    direction = goal[:2] - obj[:2]
    dist = float(np.linalg.norm(direction))
    direction = direction / dist if dist > 1e-6 else np.array([1.0, 0.0])
    # Where the TCP is along and across the push line, relative to the cube's centre.
    rel = tcp[:2] - obj[:2]
    along = float(rel @ direction)
    across = float(abs(rel[0] * direction[1] - rel[1] * direction[0]))
    if along < -(CUBE_HALF_SIZE + 0.008) and across < 0.012 and tcp[2] < PUSH_HEIGHT + 0.015:
        # Behind the cube and low: push, aiming PUSH_TRAVEL ahead of where the cube is now.
        target_xy = obj[:2] + (min(dist, PUSH_TRAVEL) - PUSH_BEHIND) * direction
        return move_action(state, np.array([*target_xy, PUSH_HEIGHT]), yaw, GRIPPER_CLOSED)
    # Go to the point behind the cube. Stay high while over or in front of the cube (a height
    # that ramps down as the TCP gets behind it, so there is no switching back and forth) and
    # come down as the TCP closes in on the push point.
    behind = obj[:2] - PUSH_BEHIND * direction
    xy_err = float(np.linalg.norm(behind - tcp[:2]))
    over = SAFE_HEIGHT * float(np.clip((along + 0.035) / 0.015, 0.0, 1.0))
    funnel = min(SAFE_HEIGHT, 2.0 * max(0.0, xy_err - 0.005))
    target = np.array([*behind, PUSH_HEIGHT + max(over, funnel)])
    return move_action(state, target, yaw, GRIPPER_CLOSED)


STACK_RELEASE_TOL = 0.006
"""Height error (m) of cube A over its place on B under which the gripper lets go (success
allows 0.005 m once A rests on B)."""


def stack_cube_expert(state: Mapping[str, Any]) -> np.ndarray:
    """StackCube-v1: grasp the red cube (A), carry it over the green cube (B), lower it onto B,
    open the gripper and back off upwards (success needs A on B, static, and released)."""
    obj = np.asarray(state["obj_pos"], dtype=np.float64)
    base = np.asarray(state["goal_pos"], dtype=np.float64)
    tcp = np.asarray(state["tcp_pos"], dtype=np.float64)
    place = base + np.array([0.0, 0.0, 2 * CUBE_HALF_SIZE])
    on_b = np.linalg.norm(obj[:2] - base[:2]) < 0.02 and abs(obj[2] - place[2]) < STACK_RELEASE_TOL
    if on_b and (not state["is_grasped"] or state["gripper_width"] > 0.045):
        # Released: open fully and rise straight up, away from the stack.
        up = obj + np.array([0.0, 0.0, 0.08])
        return move_action(state, up, yaw_of(state["tcp_quat"]), GRIPPER_OPEN)
    if not state["is_grasped"]:
        return _reach_and_grasp(state, avoid_pos=base)
    offset = tcp - obj
    xy_err = float(np.linalg.norm(place[:2] - obj[:2]))
    if xy_err < 0.005 and abs(obj[2] - place[2]) < STACK_RELEASE_TOL:
        return move_action(state, tcp, yaw_of(state["tcp_quat"]), GRIPPER_OPEN)
    # Carry A high over B, then lower it when aligned. A may move sideways only as far as its
    # height allows (it starts next to B on the table and would knock B away).
    lift = min(0.05, 4.0 * max(0.0, xy_err - 0.003))
    above = float(np.clip((obj[2] - place[2] + 0.01) / 0.03, 0.0, 1.0))
    target = place + offset + np.array([0.0, 0.0, lift])
    target[:2] = tcp[:2] + above * (target[:2] - tcp[:2])
    return move_action(state, target, yaw_of(state["tcp_quat"]), GRIPPER_CLOSED)


EXPERTS: dict[str, Callable[[Mapping[str, Any]], np.ndarray]] = {
    "PickCube-v1": pick_cube_expert,
    "PushCube-v1": push_cube_expert,
    "StackCube-v1": stack_cube_expert,
}
"""Task id -> expert."""

# Task id -> (attribute of the object to move, attribute of the goal actor) on the ManiSkill env.
_TASK_ACTORS: dict[str, tuple[str, str]] = {
    "PickCube-v1": ("cube", "goal_site"),
    "PushCube-v1": ("obj", "goal_region"),
    "StackCube-v1": ("cubeA", "cubeB"),
}


def expert_for(task_id: str) -> Callable[[Mapping[str, Any]], np.ndarray]:
    """The expert of a task; ValueError naming the tasks that have one."""
    try:
        return EXPERTS[task_id]
    except KeyError:
        raise ValueError(
            f"no scripted expert for task {task_id!r}; experts exist for {sorted(EXPERTS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Privileged state from a ManiSkill env
# --------------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    return np.asarray(x.cpu() if hasattr(x, "cpu") else x, dtype=np.float64)


def read_state(env: Any, task_id: str | None = None) -> dict[str, Any]:
    """The privileged state the experts act on, from a single-scene ManiSkill env.

    Keys (positions in m and quaternions (w, x, y, z), all in the robot's root frame):
    ``tcp_pos`` [3], ``tcp_quat`` [4], ``gripper_width`` (m, both fingers), ``obj_pos`` [3],
    ``obj_quat`` [4] (the cube to move: PickCube's and PushCube's cube, StackCube's cube A),
    ``goal_pos`` [3] (PickCube's goal, PushCube's target centre, StackCube's cube B),
    ``goal_quat`` [4] and ``is_grasped`` (bool, ManiSkill's contact-based test on the object).
    """
    base = env.unwrapped
    task_id = task_id or (base.spec.id if base.spec is not None else type(base).__name__)
    if task_id not in _TASK_ACTORS:
        raise ValueError(
            f"no privileged-state reader for {task_id!r}; known: {sorted(_TASK_ACTORS)}"
        )
    if base.num_envs != 1:
        raise ValueError(f"read_state reads one scene, the env has {base.num_envs}")
    obj_name, goal_name = _TASK_ACTORS[task_id]
    agent = base.agent
    obj, goal = getattr(base, obj_name), getattr(base, goal_name)
    to_root = agent.robot.pose.inv()
    tcp = to_root * agent.tcp.pose
    obj_pose = to_root * obj.pose
    goal_pose = to_root * goal.pose
    qpos = _np(agent.robot.get_qpos())[0]
    return {
        "tcp_pos": _np(tcp.p)[0],
        "tcp_quat": _np(tcp.q)[0],
        "gripper_width": float(qpos[-2:].sum()),
        "obj_pos": _np(obj_pose.p)[0],
        "obj_quat": _np(obj_pose.q)[0],
        "goal_pos": _np(goal_pose.p)[0],
        "goal_quat": _np(goal_pose.q)[0],
        "is_grasped": bool(_np(agent.is_grasping(obj)).reshape(-1)[0]),
    }


# --------------------------------------------------------------------------------------------
# The policy's quantisation
# --------------------------------------------------------------------------------------------


@dataclass
class ActionQuantizer:
    """Expert actions -> the action tokens a VLA would emit for them -> the actions those decode to.

    ``normalize`` (q01/q99 of norm_stats) -> ``ActionTokenizer.encode`` (256 bins over [-1, 1]) ->
    ``decode`` (bin centres) -> ``unnormalize``: the rollout server's decoding of the same tokens.
    """

    norm_stats: dict[str, Any] | None = None
    """A checkpoint's norm_stats; None: ``default_norm_stats()`` (the tiny checkpoints')."""
    unnorm_key: str | None = None
    tokenizer: Any = field(default=None, repr=False)
    normalizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from vla_rl.models.action_tokenizer import ActionNormalizer, ActionTokenizer
        from vla_rl.models.config import default_norm_stats

        if self.norm_stats is None:
            self.norm_stats = default_norm_stats()
        if self.tokenizer is None:
            self.tokenizer = ActionTokenizer()
        if self.normalizer is None:
            self.normalizer = ActionNormalizer.from_norm_stats(self.norm_stats, self.unnorm_key)

    def __call__(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[..., 7] robot action -> (executed float32 [..., 7], token ids int64 [..., 7])."""
        tokens = self.tokenizer.encode(self.normalizer.normalize(action))
        executed = self.normalizer.unnormalize(self.tokenizer.decode(tokens))
        return executed.astype(np.float32), tokens


def run_expert_episode(
    env: Any,
    seed: int,
    quantizer: ActionQuantizer | None,
    task_id: str | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Reset a single-scene gym env with ``seed`` and step its expert until success, termination
    or truncation (or max_steps). No images: for measuring and tuning the experts. Returns
    {"success": bool (success at the last step), "success_once", "steps", "actions" [T, 7]}."""
    base = env.unwrapped
    task_id = task_id or base.spec.id
    expert = expert_for(task_id)
    env.reset(seed=int(seed))
    actions, success, success_once, steps = [], False, False, 0
    while max_steps is None or steps < max_steps:
        action = expert(read_state(env, task_id))
        if quantizer is not None:
            action, _ = quantizer(action)
        _, _, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32)[None])
        actions.append(action)
        steps += 1
        success = bool(_np(info["success"]).reshape(-1)[0])
        success_once |= success
        if bool(_np(terminated).reshape(-1)[0]) or bool(_np(truncated).reshape(-1)[0]):
            break
    return {
        "success": success,
        "success_once": success_once,
        "steps": steps,
        "actions": np.asarray(actions, dtype=np.float32).reshape(-1, 7),
    }
