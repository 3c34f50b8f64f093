"""EnvService: start/stop a collection run (one at a time), report status, and serve single-env
Reset/Step sessions to evaluation clients."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Iterable

import grpc
import numpy as np

from vla_rl.buffer import from_url
from vla_rl.rpc import MAX_TEMPERATURE, MIN_TEMPERATURE, temperature_in_range
from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc
from vla_rl.rpc.rollout_client import RolloutClient
from vla_rl.rpc.server import map_errors
from vla_rl.rpc.tensors import from_tensor, to_tensor

from .collector import CollectionConfig, Collector, record_steps
from .env_pool import EnvPool, EnvPoolConfig, check_action_space, probe_controllers
from .tasks import check_task_modules, import_task_modules, resolve_task

log = logging.getLogger("vla_rl.env_server")

MAX_SESSIONS = 8
MAX_COLLECTION_ENVS = 4096
"""Envs one StartCollection may ask of a server (ManiSkill's GPU simulation runs thousands)."""
MAX_SESSIONS_PER_CLIENT = 4
"""Of MAX_SESSIONS, what one client (one connection, or one certificate under mutual TLS) may
hold, so that a single client cannot lock every other evaluator out."""
# Envs one eval session keeps, one per task/configuration it was reset with (least recently used
# closed first). An OOD split alternates its variants episode by episode; rebuilding the env at
# every switch made SAPIEN fail to create a Vulkan instance after a few dozen builds on a GPU
# machine ("vk::createInstanceUnique: ErrorIncompatibleDriver"), and it is slow anyway.
MAX_ENVS_PER_SESSION = 4
SESSION_IDLE_S = 600.0
ENV_TYPES = ("maniskill",)
"""Simulators this env server runs ("" in a request means "maniskill", for older clients)."""
POLICY_ACTION_DIM = 7
"""Action size (xyz, rpy deltas, gripper) of a ResetRequest without action_dim and of a rollout
service whose PolicyInfo gives none; a collection otherwise takes PolicyInfo.action_dim."""
RESET_CONTROL_MODE = "pd_ee_delta_pose"
"""The controller of a ResetRequest that leaves control_mode unset (older clients)."""
# The controller check runs inside StartCollection, so it must end well within the client's
# deadline; on a loaded machine it gives up (the collection's own pool checks again when built).
PROBE_TIMEOUT_S = 8.0
"""How long StartCollection waits for its controller check (StartCollection's deadline is 30 s)."""
DEFAULT_IMAGE_SIZE = 224
DEFAULT_REWARD_MODE = "normalized_dense"


def check_env_type(env_type: str) -> str:
    """The request's env_type ("" = "maniskill"); ValueError naming it when this server has none."""
    env_type = env_type or "maniskill"
    if env_type not in ENV_TYPES:
        raise ValueError(
            f"env_type {env_type!r} is not supported; this env server runs {ENV_TYPES}"
        )
    return env_type


def collection_config(
    req: env_pb2.StartCollectionRequest, server_id: str, allowed_modules: Iterable[str] = ()
) -> CollectionConfig:
    """Proto -> CollectionConfig; every check raises ValueError naming the field (a task module
    the server was not started with: PermissionDenied). The pool's action_dim is left None:
    StartCollection sets it from the rollout service's PolicyInfo."""
    check_env_type(req.env_type)
    if not req.task_ids:
        raise ValueError("task_ids is empty")
    check_task_modules(req.task_modules, allowed_modules)
    import_task_modules(req.task_modules)
    for task_id in req.task_ids:
        resolve_task(task_id)  # ValueError naming the task and the known ones
    if not 1 <= req.num_envs <= MAX_COLLECTION_ENVS:
        raise ValueError(f"num_envs must be in [1, {MAX_COLLECTION_ENVS}], got {req.num_envs}")
    if req.temperature != 0 and not temperature_in_range(req.temperature):  # 0: unset, 1.0
        raise ValueError(
            f"temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {req.temperature}"
        )
    if req.max_episode_steps < 1:
        raise ValueError("max_episode_steps must be >= 1")
    if not req.rollout_target or not req.buffer_url:
        raise ValueError("rollout_target and buffer_url are required")
    pool = EnvPoolConfig(
        task_ids=list(req.task_ids),
        num_envs=req.num_envs,
        sim_backend=req.sim_backend or "cpu",
        # "": the task's default controller (ManiSkill picks it; nothing is passed to gym.make).
        control_mode=req.control_mode or None,
        image_size=req.image_size or DEFAULT_IMAGE_SIZE,
        max_episode_steps=req.max_episode_steps,
        reward_mode=req.reward_mode or DEFAULT_REWARD_MODE,
        seed=req.seed,
        task_modules=list(req.task_modules),
        ignore_terminations=req.ignore_terminations,
    )
    return CollectionConfig(
        run_id=req.run_id or "run",
        server_id=server_id,
        pool=pool,
        pipeline_stage_num=req.pipeline_stage_num or 1,
        group_size=req.group_size or 1,
        iterations=req.iterations,
        start_version=req.start_version,
        max_staleness=req.max_staleness,
        temperature=req.temperature or 1.0,
        steps_per_segment=req.steps_per_segment or None,
        video_dir=req.video_dir or None,
        info_on_video=req.info_on_video,
    )


def probe_pool_controllers(
    pool: EnvPoolConfig, task_ids: list[str], timeout_s: float = PROBE_TIMEOUT_S
) -> list[dict] | None:
    """The controller and action space each of task_ids gets with the pool's control_mode
    (probe_controllers), before any env of the collection is built; ValueError for an unknown
    controller or task module. None when the probe fails otherwise (e.g. a task that only builds
    on GPU physics, or a slow start): logged and left to the collection's own pool, which checks
    the action size when it is built."""
    try:
        return probe_controllers(task_ids, pool.control_mode, pool.task_modules, timeout_s)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - the collection's pool checks again
        log.warning("controller check of %s skipped: %s", task_ids, err)
        return None


def reset_pool_config(
    req: env_pb2.ResetRequest, allowed_modules: Iterable[str] = ()
) -> EnvPoolConfig:
    """ResetRequest -> the config of its session's one-env pool; ValueError naming the field."""
    check_env_type(req.env_type)
    check_task_modules(req.task_modules, allowed_modules)
    import_task_modules(req.task_modules)
    resolve_task(req.task_id)
    if req.HasField("control_mode"):
        control_mode = req.control_mode or None  # "": the task's default controller
    else:
        control_mode = RESET_CONTROL_MODE
    return EnvPoolConfig(
        task_ids=[req.task_id],
        num_envs=1,
        sim_backend=req.sim_backend or "cpu",
        control_mode=control_mode,
        image_size=req.image_size or DEFAULT_IMAGE_SIZE,
        # 0: the task's registered time limit.
        max_episode_steps=req.max_episode_steps or None,
        reward_mode=req.reward_mode or DEFAULT_REWARD_MODE,
        seed=req.seed,
        task_modules=list(req.task_modules),
        action_dim=req.action_dim or POLICY_ACTION_DIM,
        ignore_terminations=req.ignore_terminations,
    )


def _session_key(env_type: str, config: EnvPoolConfig) -> tuple:
    """What a session's env is built from: a Reset asking for another one gets (or builds) the
    session's env of that key."""
    return (
        env_type,
        tuple(config.task_ids),
        config.control_mode,
        config.image_size,
        config.reward_mode,
        config.camera,
        config.max_episode_steps,
        config.sim_backend,
        tuple(config.task_modules),
        config.action_dim,
        config.ignore_terminations,
    )


def client_identity(context: grpc.ServicerContext) -> str:
    """Who is asking: the certificate's names under mutual TLS, else the connection's peer
    address (host and port: one channel)."""
    names = context.auth_context().get("x509_common_name") or context.auth_context().get(
        "x509_subject_alternative_name"
    )
    if names:
        return "cert:" + ",".join(n.decode(errors="replace") for n in names)
    return context.peer()


def session_limit_refusal(owners: list[str], client: str) -> str:
    """Why `client` may not open another eval session while sessions of `owners` are open ("" if
    it may)."""
    if len(owners) >= MAX_SESSIONS:
        return f"all {MAX_SESSIONS} eval sessions of this server are in use; retry later"
    held = owners.count(client)
    if held >= MAX_SESSIONS_PER_CLIENT:
        return (f"this client holds {held} eval sessions, the most one client may: close one "
                f"(CloseSession) or let it expire ({SESSION_IDLE_S:.0f} s idle)")  # fmt: skip
    return ""


class _Session:
    """An eval session: its envs by (task, configuration) key, and the one the last Reset chose."""

    def __init__(self, owner: str = "") -> None:
        self.owner = owner
        self.pools: dict[tuple, EnvPool] = {}  # least recently used first
        self.key: tuple | None = None
        self.lock = threading.Lock()
        self.last_used = time.monotonic()

    @property
    def pool(self) -> EnvPool:
        assert self.key is not None
        return self.pools[self.key]

    def use(self, key: tuple, pool: EnvPool | None = None) -> None:
        """Make `key`'s env current (adding `pool` for it), closing the least recently used
        beyond MAX_ENVS_PER_SESSION."""
        pool = pool if pool is not None else self.pools.pop(key)
        self.pools[key] = pool
        self.key = key
        while len(self.pools) > MAX_ENVS_PER_SESSION:
            self.pools.pop(next(iter(self.pools))).close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


class EnvServicer(env_pb2_grpc.EnvServiceServicer):
    def __init__(self, server_id: str, task_modules: Iterable[str] = ()) -> None:
        self.server_id = server_id
        self.task_modules = tuple(task_modules)
        """User task modules requests may name (server-side configuration, --task-modules)."""
        self._lock = threading.Lock()
        self._collector: Collector | None = None
        self._thread: threading.Thread | None = None
        self._run_id = ""
        self._sessions: dict[str, _Session] = {}
        # (task_id, control_mode, task_modules) -> the controller and action space it gets.
        self._controllers: dict[tuple, dict] = {}

    # -- collection ---------------------------------------------------------------------------
    def _status(self) -> env_pb2.CollectionStatus:
        c = self._collector
        if c is None:
            return env_pb2.CollectionStatus(state="idle")
        s = c.stats
        running = self._thread is not None and self._thread.is_alive()
        state = ("stopping" if c.stop_event.is_set() else "running") if running else s.state
        return env_pb2.CollectionStatus(
            state=state,
            run_id=self._run_id,
            segments_written=s.segments_written,
            env_steps=s.env_steps,
            episodes=s.episodes,
            policy_version=s.policy_version,
            error=s.error,
            act_wait_seconds=s.act_wait_s,
            env_step_seconds=s.env_step_s,
            policy_wait_seconds=s.policy_wait_s,
        )

    @map_errors
    def StartCollection(self, request, context):
        config = collection_config(request, self.server_id, self.task_modules)
        controllers = self._probe_controllers(config.pool)
        if not context.is_active():  # the client gave up while the envs were built
            context.abort(grpc.StatusCode.CANCELLED, "client left before the collection started")
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"collection {self._run_id!r} is running; stop it first",
                )
            rollout = RolloutClient(request.rollout_target)
            try:
                info = rollout.policy()
                config.action_chunk = int(info.action_chunk)
                # Every env's controller must take the served policy's actions.
                config.pool = dataclasses.replace(
                    config.pool, action_dim=int(info.action_dim) or POLICY_ACTION_DIM
                )
                config.__post_init__()
                if controllers is not None:
                    check_action_space(
                        config.pool.action_dim,
                        config.pool.control_mode,
                        list(controllers),
                        list(controllers.values()),
                    )
                buffer = from_url(
                    request.buffer_url,
                    stream=request.stream or "vla_rl:segments",
                    maxlen=request.buffer_maxlen or None,
                )
            except BaseException:
                rollout.close()
                raise
            collector = Collector(
                config,
                act=lambda images, texts, temperature: rollout.act_async(
                    images, texts, temperature
                ),
                current_version=lambda: int(rollout.policy().policy_version),
                buffer=buffer,
            )

            def run() -> None:
                try:
                    collector.run()
                finally:
                    buffer.close()
                    rollout.close()

            self._collector, self._run_id = collector, config.run_id
            self._thread = threading.Thread(target=run, name="collector", daemon=True)
            self._thread.start()
            log.info(
                "collecting run %s: %d envs of %s, %d stages",
                config.run_id,
                config.pool.num_envs,
                config.pool.task_ids,
                config.pipeline_stage_num,
            )
            return self._status()

    def _probe_controllers(self, pool: EnvPoolConfig) -> dict[str, dict] | None:
        """task_id -> controller and action space for the pool's tasks (probe_pool_controllers,
        only for those not probed before with this controller); None when a probe failed."""
        keys = {t: (t, pool.control_mode, tuple(pool.task_modules)) for t in pool.task_ids}
        todo = [t for t, key in keys.items() if key not in self._controllers]
        if todo:
            infos = probe_pool_controllers(pool, todo)
            if infos is None:
                return None
            self._controllers.update({keys[t]: i for t, i in zip(todo, infos, strict=True)})
        return {t: self._controllers[key] for t, key in keys.items()}

    @map_errors
    def StopCollection(self, request, context):
        with self._lock:
            c = self._collector
            if c is not None and (not request.run_id or request.run_id == self._run_id):
                c.stop_event.set()
            return self._status()

    @map_errors
    def GetStatus(self, request, context):
        return self._status()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop collecting (SIGTERM): in-flight episodes are dropped, written segments stay."""
        if self._collector is not None:
            self._collector.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        for session in list(self._sessions.values()):
            session.close()
        self._sessions.clear()

    # -- evaluation sessions ------------------------------------------------------------------
    def open_sessions(self) -> int:
        return len(self._sessions)

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for sid, session in list(self._sessions.items()):
            if now - session.last_used > SESSION_IDLE_S:
                self._sessions.pop(sid).close()

    @map_errors
    def Reset(self, request, context):
        config = reset_pool_config(request, self.task_modules)
        key = _session_key(check_env_type(request.env_type), config)
        with self._lock:
            self._expire_sessions()
            session = self._sessions.get(request.session_id) if request.session_id else None
            new = session is None
            if new:
                owner = client_identity(context)
                refusal = session_limit_refusal([x.owner for x in self._sessions.values()], owner)
                if refusal:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                # Held from now on, so concurrent Resets cannot overshoot the limits.
                session, sid = _Session(owner), uuid.uuid4().hex
                self._sessions[sid] = session
            else:
                sid = request.session_id
        try:
            with session.lock:
                if key in session.pools:
                    session.use(key)
                else:  # a failed build leaves the session's other envs as they were
                    session.use(key, self._build_pool(config, context))
                session.last_used = time.monotonic()
                obs = session.pool.reset([int(request.seed)])
        except BaseException:
            if new:  # a session whose first env failed is not kept
                with self._lock:
                    self._sessions.pop(sid, None)
                session.close()
            raise
        return env_pb2.ResetReply(
            session_id=sid, image=to_tensor(obs.images[0]), instruction=obs.instructions[0]
        )

    @staticmethod
    def _build_pool(config: EnvPoolConfig, context) -> EnvPool:
        try:
            return EnvPool(config)
        except RuntimeError as err:
            if config.sim_backend != "gpu":
                raise
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"sim_backend 'gpu': this env server cannot run ManiSkill's GPU physics: {err}",
            )

    @map_errors
    def CloseSession(self, request, context):
        with self._lock:
            session = self._sessions.pop(request.session_id, None)
        if session is not None:
            with session.lock:  # after a Step in flight
                session.close()
        return env_pb2.CloseSessionReply(closed=session is not None)

    @map_errors
    def Step(self, request, context):
        session = self._sessions.get(request.session_id)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session_id!r}")
        action = from_tensor(request.action, expect_dtype="float32", expect_ndim={1, 2})
        chunk = action.reshape(-1, action.shape[-1])
        dim = session.pool.action_dim
        if chunk.shape[0] == 0 or chunk.shape[-1] != dim or not np.isfinite(chunk).all():
            raise ValueError(
                f"action must be finite float32 [{dim}] or [C, {dim}], got {list(action.shape)}"
            )
        reward, done, success = 0.0, (False, False), False
        steps, finished = 0, []
        with session.lock:
            session.last_used = time.monotonic()
            for a in chunk:
                res = session.pool.step(a[None])
                steps += 1
                finished += [stats for _, stats in res.episodes]
                reward += float(res.rewards[0])
                success |= bool(res.success[0])
                done = (bool(res.terminated[0]), bool(res.truncated[0]))
                if any(done):
                    break
        record_steps("eval", steps, finished)
        return env_pb2.StepReply(
            image=to_tensor(res.final_images[0]),
            instruction=res.obs.instructions[0],
            reward=reward,
            terminated=done[0],
            truncated=done[1],
            success=success,
        )
