"""A pool of ManiSkill3 envs that the env server steps: images + instructions in, rewards out.

Pure simulation (no gRPC, no Redis). Two backends behind one API:
- ``cpu``: one ManiSkill env per subprocess (each env may be a different task), or in this process
  when there is one env; stepped in parallel across the subprocesses.
- ``gpu``: ManiSkill's batched GPU simulation (``physx_cuda``), one task for all envs, partial
  resets by ``env_idx``. Written to ManiSkill's documented API but NOT tested here (the project's
  machines have no GPU physics): treat it as a starting point to check on a GPU host.

Finished envs are reset inside ``step`` (same-step auto-reset); ``final_images`` keeps the
observation the episode ended on, as PPO bootstraps from it on truncation.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import signal
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tasks import import_task_modules, resolve_task

log = logging.getLogger("vla_rl.env_server")

SIM_BACKENDS = ("cpu", "gpu")
REWARD_MODES = ("normalized_dense", "dense", "sparse")
WORKER_MODES = ("auto", "subprocess", "in_process")
_MAX_SEED = 2**31  # ManiSkill draws per-env seeds below 2**31


class EnvWorkerDied(RuntimeError):
    """An env worker process ended (killed, out of memory, a crash in the simulator or its
    renderer). The pool can replace it (EnvPool.restart_dead_workers); the episodes in flight
    on it are lost."""


@dataclass
class EnvPoolConfig:
    """How many envs of which tasks, and how they are simulated and observed."""

    task_ids: list[str] = field(default_factory=lambda: ["PickCube-v1"])
    """ManiSkill env ids; env i runs task_ids[i % len(task_ids)] (several tasks in one pool)."""
    num_envs: int = 1
    """Number of envs in the pool (at least len(task_ids))."""
    sim_backend: str = "cpu"
    """"cpu": one env per subprocess; "gpu": ManiSkill's batched physx_cuda sim, one task."""
    control_mode: str | None = "pd_ee_delta_pose"
    """ManiSkill controller; pd_ee_delta_pose takes 7-d actions (xyz, rpy deltas, gripper).
    None: the task's default controller (no control_mode is passed to gym.make)."""
    image_size: int = 224
    """Height and width of the rendered camera images, in pixels."""
    camera: str = "base_camera"
    """Sensor camera whose RGB image is the policy's observation (base_camera: third-person)."""
    max_episode_steps: int | None = None
    """Time limit in env steps; None keeps the task's registered default."""
    reward_mode: str = "normalized_dense"
    """ManiSkill reward mode: "normalized_dense", "dense" or "sparse"."""
    ignore_terminations: bool = False
    """True: success/failure does not end an episode, only the time limit does (every env of a
    GRPO group then runs the same number of steps); success is still reported."""
    seed: int = 0
    """Base seed: resets without explicit seeds draw from (seed, env index, episode counter)."""
    task_modules: list[str] = field(default_factory=list)
    """Import paths of modules that register extra tasks (ManiSkill @register_env + register_task);
    imported in this process and in every env subprocess."""
    worker_mode: str = "auto"
    """cpu backend only: "subprocess" (one process per env), "in_process" (envs stepped one after
    another in this process) or "auto" (in process for one env, subprocesses otherwise)."""
    worker_start_timeout_s: float = 300.0
    """How long to wait for an env subprocess to import ManiSkill and build its env."""
    action_dim: int | None = None
    """Action size every env must take (the policy's, 7); the pool then fails to build with a
    ValueError naming control_mode and the action space. None: whatever the controller takes."""

    def __post_init__(self) -> None:
        if isinstance(self.task_ids, str) or not isinstance(self.task_ids, (list, tuple)):
            raise ValueError(f"task_ids must be a list of task ids, got {self.task_ids!r}")
        if not self.task_ids or not all(isinstance(t, str) and t for t in self.task_ids):
            raise ValueError(
                f"task_ids must be a non-empty list of non-empty strings, got {self.task_ids!r}"
            )
        self.task_ids = list(self.task_ids)
        if not _is_int(self.num_envs) or self.num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {self.num_envs!r}")
        if self.num_envs < len(self.task_ids):
            raise ValueError(
                f"num_envs ({self.num_envs}) must be at least len(task_ids) "
                f"({len(self.task_ids)}) so that every task gets an env"
            )
        if self.sim_backend not in SIM_BACKENDS:
            raise ValueError(f"sim_backend must be one of {SIM_BACKENDS}, got {self.sim_backend!r}")
        if self.sim_backend == "gpu" and len(set(self.task_ids)) != 1:
            raise ValueError(
                f"task_ids: sim_backend 'gpu' runs one task for all envs, got {self.task_ids!r}"
            )
        if self.control_mode is not None and (
            not isinstance(self.control_mode, str) or not self.control_mode
        ):
            raise ValueError(
                f"control_mode must be a non-empty string or None (the task's default), "
                f"got {self.control_mode!r}"
            )
        if not _is_int(self.image_size) or not 16 <= self.image_size <= 2048:
            raise ValueError(
                f"image_size must be an integer in [16, 2048], got {self.image_size!r}"
            )
        if not isinstance(self.camera, str) or not self.camera:
            raise ValueError(f"camera must be a non-empty string, got {self.camera!r}")
        if self.max_episode_steps is not None and (
            not _is_int(self.max_episode_steps) or self.max_episode_steps < 1
        ):
            raise ValueError(
                f"max_episode_steps must be None or an integer >= 1, got {self.max_episode_steps!r}"
            )
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {self.reward_mode!r}")
        if not isinstance(self.ignore_terminations, bool):
            raise ValueError(
                f"ignore_terminations must be a bool, got {self.ignore_terminations!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")
        if isinstance(self.task_modules, str) or not all(
            isinstance(m, str) and m for m in self.task_modules
        ):
            raise ValueError(
                f"task_modules must be a list of import paths, got {self.task_modules!r}"
            )
        self.task_modules = list(self.task_modules)
        if self.worker_mode not in WORKER_MODES:
            raise ValueError(f"worker_mode must be one of {WORKER_MODES}, got {self.worker_mode!r}")
        if (
            not isinstance(self.worker_start_timeout_s, (int, float))
            or self.worker_start_timeout_s <= 0
        ):
            raise ValueError(
                f"worker_start_timeout_s must be > 0, got {self.worker_start_timeout_s!r}"
            )
        if self.action_dim is not None and (not _is_int(self.action_dim) or self.action_dim < 1):
            raise ValueError(f"action_dim must be None or an integer >= 1, got {self.action_dim!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EnvPoolConfig:
        """Build from a plain mapping (YAML); an unknown key is an error that names it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"EnvPoolConfig has no field(s) {unknown}; known: {sorted(names)}")
        return cls(**values)

    def task_of(self, env_index: int) -> str:
        return self.task_ids[env_index % len(self.task_ids)]


@dataclass
class Observation:
    """What the policy sees, one row per env."""

    images: np.ndarray
    """uint8 [N, H, W, 3] RGB from config.camera."""
    instructions: list[str]
    """Language instruction of each env's current episode (length N)."""
    task_ids: list[str]
    """ManiSkill env id of each env (length N)."""


@dataclass
class StepResult:
    """The outcome of one ``EnvPool.step``."""

    obs: Observation
    """Observation after the step; envs whose episode ended show their next episode's first frame."""
    rewards: np.ndarray
    """float32 [N] reward of this step."""
    terminated: np.ndarray
    """bool [N]: the task ended the episode (success or failure); False with ignore_terminations."""
    truncated: np.ndarray
    """bool [N]: the time limit ended the episode."""
    success: np.ndarray
    """bool [N]: ManiSkill's info["success"] at this step."""
    final_images: np.ndarray
    """uint8 [N, H, W, 3]: the frame this step reached, before any auto-reset (bootstrap obs)."""
    episodes: list[tuple[int, dict[str, Any]]]
    """(env index, {"success_once", "episode_len", "return"}) for each episode that ended here."""

    @property
    def done(self) -> np.ndarray:
        """bool [N]: terminated | truncated."""
        return self.terminated | self.truncated


class EnvPool:
    """N ManiSkill envs behind reset/step on numpy arrays.

    Seeding: ``reset(seeds)`` resets env i with seeds[i]; envs of the same task given the same
    seed start from identical states (GRPO groups). Every other reset (``reset()`` without seeds,
    and auto-resets) uses a seed derived from (config.seed, env index, that env's reset count),
    so a run is reproducible from config.seed.
    """

    def __init__(self, config: EnvPoolConfig) -> None:
        self.config = config
        import_task_modules(config.task_modules)
        self.task_ids = [config.task_of(i) for i in range(config.num_envs)]
        specs = {t: resolve_task(t) for t in dict.fromkeys(self.task_ids)}
        self._instructions = {t: spec[0] for t, spec in specs.items()}
        self.max_episode_steps = {
            t: config.max_episode_steps if config.max_episode_steps is not None else spec[1]
            for t, spec in specs.items()
        }
        self._reset_counts = [0] * config.num_envs
        if config.sim_backend == "gpu":
            self._backend: _Backend = _GpuBatchedEnvs(config, self._instructions[self.task_ids[0]])
        elif config.worker_mode == "in_process" or (
            config.worker_mode == "auto" and config.num_envs == 1
        ):
            self._backend = _InProcessEnvs(config, self.task_ids, self._instructions)
        else:
            self._backend = _SubprocessEnvs(config, self.task_ids, self._instructions)
        try:
            self.action_dim = _pool_action_dim(config, self.task_ids, self._backend.env_infos)
        except BaseException:
            self._backend.close()
            raise
        # The controller each task's envs run (the task's default when control_mode is None).
        self.controllers: dict[str, str] = {
            t: info["control_mode"]
            for t, info in zip(self.task_ids, self._backend.env_infos, strict=True)
        }
        self._closed = False

    @property
    def num_envs(self) -> int:
        return self.config.num_envs

    def _next_seeds(self, env_indices: list[int] | range) -> list[int]:
        seeds = []
        for i in env_indices:
            seq = np.random.SeedSequence([self.config.seed, i, self._reset_counts[i]])
            seeds.append(int(seq.generate_state(1)[0]) % _MAX_SEED)
        return seeds

    def reset(self, seeds: list[int] | None = None) -> Observation:
        """Reset every env; seeds[i] (if given) seeds env i. Returns the first observations."""
        self._check_open()
        n = self.num_envs
        if seeds is None:
            seeds = self._next_seeds(range(n))
        else:
            seeds = list(seeds)
            if len(seeds) != n:
                raise ValueError(f"seeds must have one entry per env ({n}), got {len(seeds)}")
            bad = [s for s in seeds if not _is_int(s) or not 0 <= s < _MAX_SEED]
            if bad:
                raise ValueError(f"seeds must be integers in [0, 2**31), got {bad}")
            seeds = [int(s) for s in seeds]
        for i in range(n):
            self._reset_counts[i] += 1
        images, instructions = self._backend.reset(seeds)
        return Observation(images, instructions, list(self.task_ids))

    def step(self, actions: np.ndarray) -> StepResult:
        """Apply actions [N, action_dim] (float32), auto-reset finished envs, report the step."""
        self._check_open()
        actions = self._check_actions(actions)
        # One candidate seed per env; only envs whose episode ends use theirs.
        reset_seeds = self._next_seeds(range(self.num_envs))
        out = self._backend.step(actions, reset_seeds)
        done = out["terminated"] | out["truncated"]
        for i in np.flatnonzero(done):
            self._reset_counts[i] += 1
        episodes = [(i, out["episode_stats"][i]) for i in np.flatnonzero(done).tolist()]
        return StepResult(
            obs=Observation(out["images"], out["instructions"], list(self.task_ids)),
            rewards=out["rewards"],
            terminated=out["terminated"],
            truncated=out["truncated"],
            success=out["success"],
            final_images=out["final_images"],
            episodes=episodes,
        )

    def restart_dead_workers(self) -> list[int]:
        """Replace every env worker process that has ended (after an EnvWorkerDied); returns
        their env indices. Every env should then be reset: the others' episodes continue from
        where the failed step left them."""
        self._check_open()
        return self._backend.restart_dead_workers()

    def _check_actions(self, actions: Any) -> np.ndarray:
        try:
            arr = np.asarray(actions, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"actions must be a float array, got {type(actions).__name__}"
            ) from err
        expected = (self.num_envs, self.action_dim)
        if arr.shape != expected:
            raise ValueError(f"actions must have shape {expected}, got {arr.shape}")
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            raise ValueError(
                f"actions must be finite; envs {np.flatnonzero(~finite).tolist()} got NaN or inf"
            )
        return arr

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EnvPool is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is False:
            try:
                self.close()
            except Exception:
                pass


# --------------------------------------------------------------------------------------------
# One env (used in this process and inside each subprocess)
# --------------------------------------------------------------------------------------------


def _make_kwargs(config: EnvPoolConfig, num_envs: int, sim_backend: str) -> dict[str, Any]:
    kwargs = dict(
        num_envs=num_envs,
        obs_mode="rgb",
        reward_mode=config.reward_mode,
        sim_backend=sim_backend,
        sensor_configs=dict(width=config.image_size, height=config.image_size),
        max_episode_steps=config.max_episode_steps,
    )
    if config.control_mode is not None:  # None: the task's (or its robot's) default controller
        kwargs["control_mode"] = config.control_mode
    return kwargs


def _make_env(task_id: str, kwargs: dict[str, Any]) -> Any:
    """gym.make; an unknown controller becomes a ValueError naming control_mode."""
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401

    try:
        return gym.make(task_id, **kwargs)
    except AssertionError as err:  # ManiSkill asserts "<mode> not in supported modes: [...]"
        if "supported modes" in str(err):
            raise ValueError(
                f"control_mode {kwargs.get('control_mode')!r} is not a controller of "
                f"{task_id}'s robot: {err}"
            ) from err
        raise


def _env_info(env: Any) -> dict[str, Any]:
    """What the pool checks and reports about a built env: its controller and action space."""
    base = env.unwrapped
    space = base.single_action_space
    return {
        "action_dim": int(np.prod(space.shape)),
        "control_mode": str(base.control_mode),
        "action_space": f"{type(space).__name__}{tuple(space.shape)}",
    }


def check_action_space(
    action_dim: int, control_mode: str | None, task_ids: list[str], infos: list[dict[str, Any]]
) -> None:
    """ValueError naming control_mode and the action space unless every env (infos[i] describes
    task_ids[i], as _env_info or probe_controllers give) takes action_dim-d actions."""
    bad = {t: i for t, i in zip(task_ids, infos, strict=True) if i["action_dim"] != action_dim}
    if bad:
        asked = (
            f"control_mode {control_mode!r}"
            if control_mode is not None
            else "control_mode unset (the task's default controller)"
        )
        found = "; ".join(
            f"{t} runs controller {i['control_mode']!r} with action space "
            f"{i['action_space']} ({i['action_dim']}-d)"
            for t, i in bad.items()
        )
        raise ValueError(
            f"{asked}: {found}, but the policy's actions are {action_dim}-d; set control_mode "
            f"to a controller that takes {action_dim}-d actions (e.g. pd_ee_delta_pose: xyz "
            "and rpy deltas and the gripper)"
        )


def _pool_action_dim(config: EnvPoolConfig, task_ids: list[str], infos: list[dict]) -> int:
    """The pool's action size: every env's must equal config.action_dim (when set) and each other."""
    if config.action_dim is not None:
        check_action_space(config.action_dim, config.control_mode, task_ids, infos)
    return _common_action_dim([i["action_dim"] for i in infos], task_ids)


def _probe_main(
    conn: Any, task_ids: list[str], control_mode: str | None, task_modules: list[str]
) -> None:
    """probe_controllers' subprocess: build each task's env without rendering, report it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import_task_modules(task_modules)
        infos = []
        for task_id in task_ids:
            kwargs: dict[str, Any] = dict(
                num_envs=1, obs_mode="none", sim_backend="physx_cpu", render_backend="none"
            )
            if control_mode is not None:
                kwargs["control_mode"] = control_mode
            env = _make_env(task_id, kwargs)
            try:
                infos.append(_env_info(env))
            finally:
                env.close()
        conn.send(("ok", infos))
    except BaseException as err:
        conn.send(("error", type(err).__name__, str(err), traceback.format_exc()))
    finally:
        conn.close()


def probe_controllers(
    task_ids: list[str],
    control_mode: str | None,
    task_modules: list[str] | tuple[str, ...] = (),
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """The controller and action space that each task's env gets with control_mode (None: the
    task's default), as _env_info describes them: one env per task built with CPU physics and no
    rendering (no scene is rendered, so it takes about a second after the imports) in a spawned
    subprocess, which leaves no simulator state in this process. ValueError for an unknown
    controller or task module, RuntimeError when the subprocess fails or exceeds timeout_s."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_probe_main,
        args=(child, list(task_ids), control_mode, list(task_modules)),
        name="env-controller-probe",
        daemon=True,
    )
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            raise RuntimeError(f"controller probe of {task_ids} gave no reply in {timeout_s:.0f} s")
        try:
            reply = parent.recv()
        except EOFError as err:
            raise RuntimeError(
                f"controller probe of {task_ids} exited with code {proc.exitcode}"
            ) from err
    finally:
        parent.close()
        proc.join(timeout=1)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=2)
    if reply[0] == "ok":
        return reply[1]
    _, kind, message, trace = reply
    if kind == "ValueError":
        raise ValueError(message)
    raise RuntimeError(f"controller probe of {task_ids} failed: {kind}: {message}\n{trace}")


def _camera_rgb(obs: dict, camera: str) -> Any:
    sensors = obs["sensor_data"]
    if camera not in sensors:
        raise ValueError(f"camera {camera!r} not in this task's sensors {sorted(sensors)}")
    return sensors[camera]["rgb"]


def _env_instructions(env: Any, fallback: str | None, n: int) -> list[str]:
    """Per-episode instruction from the env when it has one, else the registry's."""
    get = getattr(env.unwrapped, "get_language_instruction", None)
    if callable(get):
        got = get()
        texts = [got] * n if isinstance(got, str) else [str(t) for t in got]
        if len(texts) == n:
            return texts
    if fallback is None:
        raise ValueError(
            f"{env.unwrapped.spec.id if env.unwrapped.spec else env} gave no instruction"
        )
    return [fallback] * n


def _as_bool(x: Any) -> bool:
    return bool(np.asarray(x.cpu() if hasattr(x, "cpu") else x).reshape(-1)[0])


class _SingleEnv:
    """One ManiSkill env (CPU physics) with same-step auto-reset and episode statistics."""

    def __init__(self, config: EnvPoolConfig, task_id: str, instruction: str | None) -> None:
        self.task_id = task_id
        self.camera = config.camera
        self.ignore_terminations = config.ignore_terminations
        self._fallback_instruction = instruction
        self.env = _make_env(task_id, _make_kwargs(config, 1, "physx_cpu"))
        self.info = _env_info(self.env)
        self.action_dim = self.info["action_dim"]
        sensors = getattr(self.env.unwrapped, "_sensors", None)
        if sensors is not None and config.camera not in sensors:
            self.env.close()
            raise ValueError(
                f"camera {config.camera!r} not in {task_id}'s sensors {sorted(sensors)}"
            )
        self.instruction = instruction or ""
        self._return = 0.0
        self._success_once = False

    def _image(self, obs: dict) -> np.ndarray:
        return _camera_rgb(obs, self.camera)[0].cpu().numpy()

    def reset(self, seed: int) -> tuple[np.ndarray, str]:
        obs, _ = self.env.reset(seed=int(seed))
        self.instruction = _env_instructions(self.env, self._fallback_instruction, 1)[0]
        self._return = 0.0
        self._success_once = False
        return self._image(obs), self.instruction

    def step(self, action: np.ndarray, reset_seed: int) -> dict[str, Any]:
        obs, reward, terminated, truncated, info = self.env.step(action[None])
        reward = float(
            np.asarray(reward.cpu() if hasattr(reward, "cpu") else reward).reshape(-1)[0]
        )
        success = _as_bool(info["success"]) if "success" in info else False
        terminated = False if self.ignore_terminations else _as_bool(terminated)
        truncated = _as_bool(truncated)
        self._return += reward
        self._success_once |= success
        out = dict(
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            success=success,
            final_image=self._image(obs),
            episode=None,
        )
        if terminated or truncated:
            out["episode"] = {
                "success_once": self._success_once,
                "episode_len": int(self.env.unwrapped.elapsed_steps[0]),
                "return": self._return,
            }
            out["image"], out["instruction"] = self.reset(reset_seed)
        else:
            out["image"], out["instruction"] = out["final_image"], self.instruction
        return out

    def close(self) -> None:
        self.env.close()


def make_single_env(config: EnvPoolConfig, task_id: str | None = None) -> _SingleEnv:
    """One env of ``task_id`` (default: config.task_ids[0]) in this process, built as the ``cpu``
    backend builds each of its envs (same gym.make kwargs, camera and instruction), for tools that
    drive an env themselves (``collect_demos``). ``reset(seed)`` gives (image, instruction),
    ``step(action, reset_seed)`` a dict as in the pool, resetting with reset_seed when the episode
    ends; ``.env`` is the ManiSkill env (privileged state: ``.env.unwrapped``)."""
    task_id = config.task_of(0) if task_id is None else task_id
    import_task_modules(config.task_modules)
    instruction, _ = resolve_task(task_id)
    return _SingleEnv(config, task_id, instruction)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class _Backend:
    env_infos: list[dict[str, Any]]
    """Per env: action_dim, control_mode (the controller it runs) and action_space (_env_info)."""

    def reset(self, seeds: list[int]) -> tuple[np.ndarray, list[str]]:
        raise NotImplementedError

    def step(self, actions: np.ndarray, reset_seeds: list[int]) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def restart_dead_workers(self) -> list[int]:
        """Backends without worker processes have none to replace."""
        return []


def _collate(results: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(
        images=np.stack([r["image"] for r in results]),
        instructions=[r["instruction"] for r in results],
        rewards=np.array([r["reward"] for r in results], dtype=np.float32),
        terminated=np.array([r["terminated"] for r in results], dtype=bool),
        truncated=np.array([r["truncated"] for r in results], dtype=bool),
        success=np.array([r["success"] for r in results], dtype=bool),
        final_images=np.stack([r["final_image"] for r in results]),
        episode_stats=[r["episode"] for r in results],
    )


def _common_action_dim(dims: list[int], task_ids: list[str]) -> int:
    if len(set(dims)) != 1:
        raise ValueError(f"tasks {task_ids} have different action sizes {dims} in one pool")
    return dims[0]


class _InProcessEnvs(_Backend):
    """Envs stepped one after another in this process (one env, or where spawning is unwanted)."""

    def __init__(self, config: EnvPoolConfig, task_ids: list[str], instructions: dict) -> None:
        self.envs: list[_SingleEnv] = []
        try:
            for t in task_ids:
                self.envs.append(_SingleEnv(config, t, instructions[t]))
        except BaseException:
            self.close()
            raise
        self.env_infos = [e.info for e in self.envs]

    def reset(self, seeds: list[int]) -> tuple[np.ndarray, list[str]]:
        results = [env.reset(s) for env, s in zip(self.envs, seeds, strict=True)]
        return np.stack([r[0] for r in results]), [r[1] for r in results]

    def step(self, actions: np.ndarray, reset_seeds: list[int]) -> dict[str, Any]:
        return _collate(
            [env.step(a, s) for env, a, s in zip(self.envs, actions, reset_seeds, strict=True)]
        )

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def _worker_main(conn: Any, config: EnvPoolConfig, task_id: str, instruction: str | None) -> None:
    """Subprocess loop: build one env, then answer (method, args) requests until "close"."""
    # The parent owns shutdown; a Ctrl-C in the terminal should not kill workers mid-reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)  # N workers share the cores; torch's own threads only contend
    try:
        import_task_modules(config.task_modules)
        env = _SingleEnv(config, task_id, instruction)
        conn.send(("ok", env.info))
    except BaseException as err:
        conn.send(("error", type(err).__name__, str(err), traceback.format_exc()))
        return
    try:
        while True:
            method, args = conn.recv()
            if method == "close":
                break
            try:
                conn.send(("ok", getattr(env, method)(*args)))
            except Exception as err:
                conn.send(("error", type(err).__name__, str(err), traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        env.close()
        conn.close()


class _SubprocessEnvs(_Backend):
    """One env per spawned subprocess; requests go out to all workers before any reply is read."""

    def __init__(self, config: EnvPoolConfig, task_ids: list[str], instructions: dict) -> None:
        self.config, self.task_ids, self.instructions = config, task_ids, instructions
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        # Workers found dead or cut off (EOF, a broken pipe): a process that closed its pipe
        # may not have exited yet, so is_alive() alone would miss it.
        self.lost: set[int] = set()
        try:
            for i in range(len(task_ids)):
                conn, proc = self._spawn(i)
                self.conns.append(conn)
                self.procs.append(proc)
            self.env_infos = [
                self._recv(i, config.worker_start_timeout_s) for i in range(len(task_ids))
            ]
        except BaseException:
            self.close()
            raise

    def _spawn(self, i: int) -> tuple[Any, Any]:
        """Start env i's worker; it answers with its env's info once the env is built."""
        # spawn, not fork: the parent may hold gRPC threads, a SAPIEN renderer or CUDA state.
        ctx = mp.get_context("spawn")
        task = self.task_ids[i]
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_main,
            args=(child, self.config, task, self.instructions[task]),
            name=f"env-worker-{i}-{task}",
            daemon=True,
        )
        proc.start()
        child.close()
        return parent, proc

    def restart_dead_workers(self) -> list[int]:
        """Replace the workers that died or lost their pipe; returns those that started again.
        One that fails to start stays stopped and lost, so the pool's next call raises
        EnvWorkerDied again (and the collector counts another attempt)."""
        lost = sorted(self.lost | {i for i, proc in enumerate(self.procs) if not proc.is_alive()})
        for i in lost:
            self._stop(i)
            self.conns[i], self.procs[i] = self._spawn(i)
        started = []
        for i in lost:  # built side by side, then each one's first reply
            try:
                self.env_infos[i] = self._recv(i, self.config.worker_start_timeout_s)
            except Exception as err:  # noqa: BLE001 - reported, and raised again on next use
                log.warning("env worker %d (%s) did not start again: %s", i, self.task_ids[i], err)
                self._stop(i)
                self.lost.add(i)
                continue
            self.lost.discard(i)
            started.append(i)
        return started

    def _stop(self, i: int) -> None:
        """Close env i's pipe and end its process (killed if it does not exit)."""
        self.conns[i].close()
        proc = self.procs[i]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)

    def _died(self, i: int, what: str) -> EnvWorkerDied:
        self.lost.add(i)
        return EnvWorkerDied(f"env worker {i} ({self.task_ids[i]}) {what}")

    def _recv(self, i: int, timeout_s: float | None = None) -> Any:
        conn, proc = self.conns[i], self.procs[i]
        waited = 0.0
        while not conn.poll(1.0):
            waited += 1.0
            if not proc.is_alive():
                raise self._died(i, f"exited with code {proc.exitcode}")
            if timeout_s is not None and waited >= timeout_s:
                raise RuntimeError(
                    f"env worker {i} ({self.task_ids[i]}) gave no reply in {timeout_s:.0f} s"
                )
        try:
            reply = conn.recv()
        except (EOFError, OSError) as err:  # OSError: a reset connection, a closed pipe
            raise self._died(i, f"closed its pipe ({type(err).__name__})") from err
        if reply[0] == "ok":
            return reply[1]
        _, kind, message, trace = reply
        if kind == "ValueError":
            raise ValueError(f"env worker {i} ({self.task_ids[i]}): {message}")
        raise RuntimeError(
            f"env worker {i} ({self.task_ids[i]}) failed: {kind}: {message}\n{trace}"
        )

    def _call_all(self, method: str, per_env_args: list[tuple]) -> list[Any]:
        sent, first_error = [], None
        for i, (conn, args) in enumerate(zip(self.conns, per_env_args, strict=True)):
            try:
                conn.send((method, args))
                sent.append(i)
            except OSError as err:  # its process is gone (a broken or closed pipe)
                died = self._died(i, f"is gone: {err}")
                first_error = first_error or died
        # Read every reply that is owed (even after an error) so no stale reply is left in a pipe.
        results = []
        for i in range(len(self.conns)):
            try:
                results.append(self._recv(i) if i in sent else None)
            except Exception as err:
                first_error = first_error or err
                results.append(None)
        if first_error is not None:
            raise first_error
        return results

    def reset(self, seeds: list[int]) -> tuple[np.ndarray, list[str]]:
        results = self._call_all("reset", [(s,) for s in seeds])
        return np.stack([r[0] for r in results]), [r[1] for r in results]

    def step(self, actions: np.ndarray, reset_seeds: list[int]) -> dict[str, Any]:
        return _collate(
            self._call_all("step", [(a, s) for a, s in zip(actions, reset_seeds, strict=True)])
        )

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=False):
            if proc.is_alive():
                try:
                    conn.send(("close", ()))
                except (BrokenPipeError, OSError):
                    pass
        for conn, proc in zip(self.conns, self.procs, strict=False):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            conn.close()
        self.conns, self.procs = [], []


class _GpuBatchedEnvs(_Backend):
    """ManiSkill's batched GPU simulation: one process, one task, ``num_envs`` parallel scenes.

    UNTESTED on the project's machines (no GPU physics there); written to ManiSkill 3.0's API:
    ``gym.make(..., num_envs=N, sim_backend="physx_cuda")``, partial resets with
    ``reset(seed=..., options={"env_idx": ...})``. ``sim_backend`` is a parameter only so the
    batched code path can be exercised with ``physx_cpu`` and one env.

    ManiSkill seeds a batched reset's torch RNG with the first env's seed, so envs of one batch
    given the same seed still draw different initial states; ``reset(seeds)`` therefore copies the
    simulator state of the first env of each seed to the others (reset_to_env_states). Task state
    kept outside the simulator (e.g. per-episode asset choices) is not copied.
    """

    def __init__(
        self, config: EnvPoolConfig, instruction: str | None, sim_backend: str = "physx_cuda"
    ) -> None:
        import torch

        if sim_backend == "physx_cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "sim_backend='gpu' needs a CUDA GPU (ManiSkill's physx_cuda); none is visible "
                "here: use sim_backend='cpu'"
            )
        self.config = config
        self.n = config.num_envs
        self.instruction = instruction
        self.env = _make_env(config.task_ids[0], _make_kwargs(config, self.n, sim_backend))
        base = self.env.unwrapped
        if base.reconfiguration_freq != 0 and self.n > 1:
            self.env.close()
            raise ValueError(
                f"{config.task_ids[0]} reconfigures on reset; partial resets need "
                "reconfiguration_freq=0"
            )
        self.env_infos = [_env_info(self.env)] * self.n
        self.device = base.device
        self.instructions = [instruction or ""] * self.n
        self.returns = np.zeros(self.n, dtype=np.float64)
        self.success_once = np.zeros(self.n, dtype=bool)

    def _images(self, obs: dict) -> np.ndarray:
        return _camera_rgb(obs, self.config.camera).cpu().numpy()

    def _refresh_instructions(self, env_idx: np.ndarray) -> None:
        texts = _env_instructions(self.env, self.instruction, self.n)
        for i in env_idx:
            self.instructions[i] = texts[i]

    def reset(self, seeds: list[int]) -> tuple[np.ndarray, list[str]]:
        import torch
        from mani_skill.utils.common import index_dict_array

        obs, _ = self.env.reset(seed=list(seeds))
        first_of: dict[int, int] = {}
        src, dst = [], []
        for i, s in enumerate(seeds):
            if s in first_of:
                src.append(first_of[s])
                dst.append(i)
            else:
                first_of[s] = i
        if dst:
            state = self.env.unwrapped.get_state_dict()
            src_idx = torch.tensor(src, device=self.device)
            copied = index_dict_array(state, src_idx, inplace=False)
            obs, _ = self.env.reset(
                options=dict(
                    env_idx=torch.tensor(dst, device=self.device),
                    reset_to_env_states=dict(env_states=copied),
                )
            )
        self._refresh_instructions(np.arange(self.n))
        self.returns[:] = 0.0
        self.success_once[:] = False
        return self._images(obs), list(self.instructions)

    def step(self, actions: np.ndarray, reset_seeds: list[int]) -> dict[str, Any]:
        import torch

        action_t = torch.as_tensor(actions, device=self.device)
        obs, reward, terminated, truncated, info = self.env.step(action_t)
        rewards = reward.float().cpu().numpy().reshape(self.n)
        success = (
            info["success"].cpu().numpy().reshape(self.n).astype(bool)
            if "success" in info
            else np.zeros(self.n, dtype=bool)
        )
        terminated = terminated.cpu().numpy().reshape(self.n).astype(bool)
        if self.config.ignore_terminations:
            terminated[:] = False
        truncated = truncated.cpu().numpy().reshape(self.n).astype(bool)
        self.returns += rewards
        self.success_once |= success
        final_images = self._images(obs)
        images = final_images
        done = terminated | truncated
        stats: list[dict[str, Any] | None] = [None] * self.n
        if done.any():
            lengths = self.env.unwrapped.elapsed_steps.cpu().numpy()
            env_idx = np.flatnonzero(done)
            for i in env_idx:
                stats[i] = {
                    "success_once": bool(self.success_once[i]),
                    "episode_len": int(lengths[i]),
                    "return": float(self.returns[i]),
                }
            # A partial reset takes one int seed (a seed list would replace every env's
            # episode seed); the first finished env's derived seed stands for this reset.
            obs, _ = self.env.reset(
                seed=int(reset_seeds[env_idx[0]]),
                options=dict(env_idx=torch.as_tensor(env_idx, device=self.device)),
            )
            images = final_images.copy()
            images[env_idx] = self._images(obs)[env_idx]
            self._refresh_instructions(env_idx)
            self.returns[env_idx] = 0.0
            self.success_once[env_idx] = False
        return dict(
            images=images,
            instructions=list(self.instructions),
            rewards=rewards.astype(np.float32),
            terminated=terminated,
            truncated=truncated,
            success=success,
            final_images=final_images,
            episode_stats=stats,
        )

    def close(self) -> None:
        self.env.close()


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
