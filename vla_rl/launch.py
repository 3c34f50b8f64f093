"""`vla-rl train`: start the buffer, the rollout server(s), the env server(s) and the learner as
separate processes on this machine, placed per `cluster.component_placement`, and stop them all
on Ctrl-C. The services are started by module name; nothing here imports them.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vla_rl import security
from vla_rl.config import ConfigError, TrainConfig, dump_yaml, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


_HANDED_OUT: set[int] = set()
_PORT_TRIES = 500


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports (Linux; the usual default
    elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that is free now and that this process has not handed out before.

    It is taken below the kernel's ephemeral range: ports are picked when a run is planned and
    bound later, when each child has loaded its model, and in between every outgoing connection
    (clients of the services started first) takes a source port from the ephemeral range. A
    port picked there was taken that way on a lent GPU machine with 16 env servers: the child
    then failed with "address in use" (two of three launches). Ports below the range are only
    ever taken by a bind, which the check here sees.
    """
    low, _ = ephemeral_port_range()
    rng = random.SystemRandom()
    if low > 2048:
        for _ in range(_PORT_TRIES):
            port = rng.randrange(max(1024, low - 16384), low)
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    for _ in range(_PORT_TRIES):  # no room below the range: let the kernel choose
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path | None
    target: str = ""
    cmd: list[str] = field(default_factory=list)
    gpus: list[int] | str = "cpu"
    to_console: bool = False

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""


def child_visible_devices(gpus: list[int] | str, ours: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a child given its placement's GPU indices. The indices count the
    GPUs this process sees (torch.cuda.device_count() sized the placement), so under
    `CUDA_VISIBLE_DEVICES=2,3 vla-rl train` index 0 is GPU 2, as in torch and Ray; passing the
    index on unchanged would put the child on GPU 0, outside what the user gave the run."""
    if gpus == "cpu":
        return ""
    if ours is None:
        return ",".join(map(str, gpus))
    visible = [d.strip() for d in ours.split(",") if d.strip()]
    missing = [i for i in gpus if i >= len(visible)]
    if missing:
        raise ValueError(
            f"GPU index {missing[0]} is not among the {len(visible)} GPU(s) of "
            f"CUDA_VISIBLE_DEVICES={ours}"
        )
    return ",".join(visible[i] for i in gpus)


@dataclass
class Launch:
    """The processes of one run, stopped in reverse start order."""

    run_dir: Path
    children: list[Child] = field(default_factory=list)
    memory_server: object | None = None
    child_env: dict[str, str] = field(default_factory=dict)
    """Set in every child's environment (secrets such as the memory buffer's key: never on a
    command line, where `ps` shows them)."""

    def credentials(self, *, local_redis: bool = False) -> security.Credentials:
        """This run's credentials (security.for_run): the environment's, with a fresh token and
        Redis password where none is set, handed to every child started after this call. A
        malformed credential variable exits with one line naming it."""
        try:
            creds, child_env = security.for_run(os.environ, local_redis=local_redis)
        except security.CredentialsError as e:
            raise SystemExit(f"credentials: {e}") from None
        self.child_env.update(child_env)
        return creds

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        gpus: list[int] | str = "cpu",
        to_console: bool = False,
        target: str = "",
    ) -> Child:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.child_env)
        env["CUDA_VISIBLE_DEVICES"] = child_visible_devices(
            gpus, os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        log_path = None if to_console else self.run_dir / "logs" / f"{name}.log"
        out = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")  # noqa: SIM115 - owned by the child process from here
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None
        )
        child = Child(name, proc, log_path, target, list(cmd), gpus, to_console)
        self.children.append(child)
        return child

    def restart(self, child: Child, extra_args: list[str] = ()) -> Child:
        """Start `child`'s command again (plus `extra_args`) in its place in the stop order; its
        log file is appended to."""
        index = self.children.index(child)
        new = self.start(child.name, [*child.cmd, *extra_args], gpus=child.gpus,
                         to_console=child.to_console, target=child.target)  # fmt: skip
        new.cmd = child.cmd  # a later restart starts from the original command
        self.children.pop()
        self.children[index] = new
        return new

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the learner, then to every other child (last started first), each group
        SIGKILLed after `grace_s`. Signals to this process are ignored meanwhile: a second Ctrl-C
        must not leave children behind."""
        with signals_ignored():
            self._stop(grace_s)

    def stop_learner(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the learner alone, SIGKILL after `grace_s` (the other services go on)."""
        self._stop_group([c for c in self.children if c.name == "learner"], grace_s)

    def _stop_group(self, group: list[Child], grace_s: float) -> None:
        for child in group:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in group:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def _stop(self, grace_s: float) -> None:
        # The learner alone first, while the buffer it reads and the replicas it pushes to are
        # still up: it ends its phase and checkpoints the last iteration it trained. Stopped
        # together, it waited on a Redis that was gone until the grace ran out and was killed.
        self.stop_learner(grace_s)
        self._stop_group([c for c in reversed(self.children) if c.name != "learner"], grace_s)
        if self.memory_server is not None:
            self.memory_server.shutdown()

    def check_alive(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None and child.name != "learner":
                raise RuntimeError(f"{exit_reason(child.name, code)}:\n{child.log_tail()}")


@contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside (main thread only: elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """The first SIGTERM or SIGINT raises KeyboardInterrupt in the main thread, so `kill` (or a
    pod's termination) stops every service the way Ctrl-C does (SIGTERM used to leave them all
    running); every later one is only acknowledged, so an impatient second Ctrl-C cannot
    interrupt the shutdown (it used to raise inside the `except KeyboardInterrupt` path)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def already_stopping(_signum: int, _frame: object) -> None:
        print("vla-rl: already stopping every service, please wait", file=sys.stderr, flush=True)

    def interrupt(_signum: int, _frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, already_stopping)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_reason(name: str, code: int) -> str:
    """'<name> exited with code N' or '<name> was killed by SIGKILL' (Popen's negative codes)."""
    if code < 0:
        try:
            return f"{name} was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"{name} was killed by signal {-code}"
    return f"{name} exited with code {code}"


def _device_of(spec: list[int] | str) -> str:
    return "cpu" if spec == "cpu" else "cuda"


def tiny_model_spec(cfg: TrainConfig) -> dict | None:
    """What the tiny random checkpoint is built from when actor.model.model_path is null (None
    when a real checkpoint is configured)."""
    model = cfg.actor.model
    if model.model_path:
        return None
    parallel = model.model_type == "openvla_oft"
    return {
        "decoding": "parallel" if parallel else "autoregressive",
        "action_chunk": model.num_action_chunks if parallel else 1,
        "action_dim": model.action_dim,
        "seed": cfg.runner.seed,
    }


def check_checkpoint_dir(model_path: str) -> None:
    """ConfigError naming actor.model.model_path unless it is a directory with a readable
    config.json: one clear line before any service starts (a bad path used to surface as a
    rollout server's traceback after the health wait)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        raise ConfigError(
            "actor.model.model_path",
            f"{model_path} is not a checkpoint directory (no config.json there)",
        )
    try:
        json.loads(config.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError("actor.model.model_path", f"{config} cannot be read: {e}") from None


def prepare_model(cfg: TrainConfig, run_dir: Path) -> str:
    """The checkpoint every service loads: the configured one, or a tiny random one written once
    per run directory (rollout and learner must start from identical base weights)."""
    spec = tiny_model_spec(cfg)
    if spec is None:
        check_checkpoint_dir(cfg.actor.model.model_path)
        return cfg.actor.model.model_path
    path = run_dir / "tiny_model"
    if not (path / "config.json").exists():
        from vla_rl.models import tiny_config
        from vla_rl.models.tiny import write_tiny_checkpoint

        seed = spec.pop("seed")
        write_tiny_checkpoint(path, tiny_config(**spec), seed=seed)
    return str(path)


def buffer_kind(cfg: TrainConfig, redis_installed: bool) -> str:
    """'url' (buffer.url names one), 'redis' (start a local redis-server) or 'memory' (serve the
    in-memory store)."""
    if cfg.buffer.url:
        return "url"
    if cfg.buffer.backend == "redis" or (cfg.buffer.backend == "auto" and redis_installed):
        return "redis"
    return "memory"


def start_buffer(cfg: TrainConfig, launch: Launch) -> str:
    """A buffer URL: the configured one, a local redis-server, or a served in-memory store."""
    redis_bin = shutil.which("redis-server")
    kind = buffer_kind(cfg, redis_bin is not None)
    if kind == "url":
        return cfg.buffer.url
    if kind == "redis":
        if redis_bin is None:
            raise SystemExit("buffer.backend is redis but no redis-server is installed")
        port = free_port()
        data = launch.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        launch.start(
            "redis",
            [redis_bin, str(write_redis_acl(data)), "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(data), "--appendonly", "yes", "--save", "",
             "--maxmemory-policy", "noeviction"],
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        _wait_redis(url)
        return url
    from vla_rl.buffer.memory import AUTHKEY_ENV, serve_memory_buffer

    # A key of this run only: the store unpickles what clients send, so whoever holds the key
    # can run code in it. The children get it through their environment.
    launch.memory_server = serve_memory_buffer()
    launch.child_env[AUTHKEY_ENV] = launch.memory_server.authkey
    return launch.memory_server.url


def write_redis_acl(directory: Path) -> Path:
    """A redis.conf (readable by this user only) that gives the default user this run's password
    (security.current(), set by Launch.credentials): other processes on the machine can no
    longer read or write the trajectories. A file, not flags: `ps` shows a command line to
    everyone. The default user keeps every permission: Redis 7.0 replays MULTI/EXEC blocks of
    its append-only file as the default user, and with that user switched off it refused every
    acknowledgement on restart (found by tests/e2e/test_crash_recovery.py)."""
    creds = security.current()
    if creds.redis_password is None:
        raise RuntimeError("no Redis password for this run (Launch.credentials sets one)")
    conf = directory / "redis.conf"
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text(f"user default on >{creds.redis_password} ~* &* +@all\n")
    return conf


def _wait_redis(url: str, timeout_s: float = 20.0) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from vla_rl.buffer.redis_streams import redis_client

    # One attempt per ping: this loop has its own deadline.
    client = redis_client(url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            time.sleep(0.1)
    raise SystemExit(f"redis-server at {url} did not answer")


@dataclass
class ProcessPlan:
    """One service process: its arguments after the Python executable, its GPUs, its address."""

    name: str
    args: list[str]
    gpus: list[int] | str = "cpu"
    target: str = ""
    metrics_target: str = ""
    """host:port of its Prometheus /metrics."""


@dataclass
class LaunchPlan:
    """Everything `vla-rl train` starts and asks, derived from the config by `launch_plan` alone
    (the one place that maps config keys to service flags and requests)."""

    config: TrainConfig
    """The resolved config the learner reads (model path, buffer URL, rollout addresses filled)."""
    rollout: list[ProcessPlan]
    env: list[ProcessPlan]
    learner: ProcessPlan
    collection: list[dict]
    """StartCollectionRequest fields, one per env server."""
    evaluation: dict | None
    """`evaluate` arguments for the final policy; None: no evaluation."""
    evaluation_servers: list[str]
    """The env servers evaluation plays on: the first env.eval.num_servers."""


def rollout_server_args(cfg: TrainConfig, model_path: str, port: int, device: str) -> list[str]:
    """Flags of one rollout server (services/rollout_server/main.py)."""
    rollout = cfg.rollout
    args = ["-m", "services.rollout_server.main", "--checkpoint", model_path,
            "--engine", rollout.engine, "--port", str(port), "--device", device,
            "--precision", rollout.precision, "--max-batch-size", str(rollout.max_batch_size),
            "--max-wait-ms", str(rollout.max_wait_ms),
            "--gpu-memory-utilization", str(rollout.gpu_memory_utilization)]  # fmt: skip
    if rollout.engine == "vllm":
        args += ["--weight-sync", rollout.weight_sync or "merge"]
    if cfg.actor.model.unnorm_key:
        args += ["--unnorm-key", cfg.actor.model.unnorm_key]
    return args


def collection_request(
    cfg: TrainConfig,
    server_index: int,
    rollout_target: str,
    start_iteration: int,
    attempt: str = "",
) -> dict:
    """StartCollectionRequest fields for env server `server_index` (env.train). `attempt` makes
    segment ids unique per launch of the same experiment: a rerun that starts again at an
    iteration the stream has already seen (no checkpoint) used to produce ids Redis had acked,
    which were dropped as duplicates while the learner waited for them forever."""
    train = cfg.env.train
    name = cfg.runner.logger.experiment_name
    return dict(
        run_id=f"{name}.{attempt}" if attempt else name,
        task_ids=list(train.task_ids),
        num_envs=train.total_num_envs // train.num_servers,
        sim_backend=train.sim_backend,
        pipeline_stage_num=cfg.rollout.pipeline_stage_num,
        group_size=cfg.algorithm.group_size,
        max_episode_steps=train.max_episode_steps,
        steps_per_segment=train.max_steps_per_rollout_epoch,
        rollout_target=rollout_target,
        buffer_url=cfg.buffer.url,
        stream=cfg.buffer.stream,
        buffer_maxlen=cfg.buffer.maxlen or 0,
        seed=train.seed + 100_000 * server_index,
        max_staleness=cfg.algorithm.max_staleness,
        start_version=start_iteration,
        iterations=cfg.runner.max_epochs - start_iteration,
        temperature=cfg.rollout.sampling_params.temperature_train,
        reward_mode=train.reward_mode,
        control_mode=train.control_mode or "",
        task_modules=list(train.task_modules),
        image_size=train.image_size,
        env_type=train.env_type,
        video_dir=train.video_cfg.video_base_dir if train.video_cfg.save_video else "",
        info_on_video=train.video_cfg.info_on_video,
        ignore_terminations=train.ignore_terminations,
    )


def evaluation_args(cfg: TrainConfig, force: bool = False) -> dict | None:
    """`vla_rl.evaluation.evaluate` arguments for env.eval, or None when no evaluation runs
    (runner.val_check_interval -1 and no eval videos) unless `force`."""
    ev = cfg.env.eval
    if not (force or cfg.runner.val_check_interval > 0 or ev.video_cfg.save_video):
        return None
    temperature = cfg.rollout.sampling_params.temperature_eval
    return dict(
        task_ids=list(ev.task_ids),
        episodes=ev.total_num_envs,
        max_steps=ev.max_steps_per_rollout_epoch,
        max_episode_steps=ev.max_episode_steps,
        seed=ev.seed,
        video_dir=ev.video_cfg.video_base_dir if ev.video_cfg.save_video else None,
        info_on_video=ev.video_cfg.info_on_video,
        temperature=temperature if temperature > 0 else None,
        env_type=ev.env_type,
        image_size=ev.image_size,
        control_mode=ev.control_mode,
        reward_mode=ev.reward_mode,
        task_modules=list(ev.task_modules),
        sim_backend=ev.sim_backend,
        ignore_terminations=ev.ignore_terminations,
    )


def _nth_gpu(ranks: list[int] | str, i: int) -> list[int] | str:
    """The GPU of the i-th process of a component placed on `ranks`, round robin: each process
    sees one GPU (an env server renders, a rollout replica serves, on its first visible GPU, so
    giving every process all of the component's GPUs would put them all on the first)."""
    return ranks if ranks == "cpu" else [ranks[i % len(ranks)]]


def idle_gpus(plan: LaunchPlan, num_gpus: int) -> list[str]:
    """One line per component whose placement names GPUs that none of its processes gets (fewer
    rollout replicas or env servers than GPUs placed for them): a likely mistake, said at start."""
    placement = plan.config.cluster.resolve(num_gpus)
    lines = []
    for component, procs, key in (
        ("rollout", plan.rollout, "rollout.replicas"),
        ("env", plan.env, "env.train.num_servers"),
    ):
        ranks = placement[component]
        if ranks == "cpu" or not procs:
            continue
        unused = sorted(set(ranks) - {g for p in procs if p.gpus != "cpu" for g in p.gpus})
        if unused:
            lines.append(
                f"{component} is placed on GPUs {ranks} but {key} is {len(procs)}: "
                f"GPU(s) {unused} get no {component} process"
            )
    return lines


def launch_plan(
    cfg: TrainConfig,
    num_gpus: int,
    *,
    model_path: str,
    buffer_url: str,
    start_iteration: int = 0,
    port: Callable[[str], int] = lambda kind: free_port(),
    attempt: str = "",
    host: Callable[[str], str] = lambda name: "127.0.0.1",
) -> LaunchPlan:
    """The services of one run, placed per cluster.component_placement: on this machine by
    default; `port(kind)` ("grpc" or "metrics") and `host(service name)` give the addresses
    elsewhere (docker compose: a fixed port in each container, the service name as host)."""
    cfg = copy.deepcopy(cfg)
    cfg.actor.model.model_path = model_path
    cfg.buffer.url = buffer_url
    placement = cfg.cluster.resolve(num_gpus)
    rollout: list[ProcessPlan] = []
    if not cfg.rollout.addresses:
        for r in range(cfg.rollout.replicas):
            gpus = _nth_gpu(placement["rollout"], r)
            p, m, name = port("grpc"), port("metrics"), f"rollout{r}"
            rollout.append(
                ProcessPlan(
                    name,
                    rollout_server_args(cfg, model_path, p, _device_of(gpus))
                    + ["--metrics-port", str(m)],
                    gpus,
                    f"{host(name)}:{p}",
                    f"{host(name)}:{m}",
                )
            )
        cfg.rollout.addresses = [r.target for r in rollout]
    env: list[ProcessPlan] = []
    # Requests may only name the task modules the env servers were started with.
    modules = sorted(set(cfg.env.train.task_modules) | set(cfg.env.eval.task_modules))
    for s in range(cfg.env.train.num_servers):
        p, m, name = port("grpc"), port("metrics"), f"env{s}"
        env.append(
            ProcessPlan(
                name,
                ["-m", "services.env_server.main", "--port", str(p), "--server-id", name,
                 "--metrics-port", str(m)]
                + (["--task-modules", *modules] if modules else []),
                _nth_gpu(placement["env"], s),
                f"{host(name)}:{p}",
                f"{host(name)}:{m}",
            )
        )  # fmt: skip
    resolved = Path(cfg.run_dir) / "config.yaml"
    learner_args = ["-m", "services.learner.main"]
    world = cfg.actor_world_size(num_gpus)
    if world > 1:  # FSDP over `world` processes: gloo on the CPU, NCCL on the actor GPUs
        learner_args = ["-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={world}", "-m", "services.learner.main"]  # fmt: skip
    learner_port, learner_metrics = port("grpc"), port("metrics")
    learner_args += ["--config", str(resolved), "--port", str(learner_port),
                     "--device", _device_of(placement["actor"]),
                     "--metrics-port", str(learner_metrics)]  # fmt: skip
    addresses = cfg.rollout.addresses
    collection = [
        collection_request(cfg, i, addresses[i % len(addresses)], start_iteration, attempt)
        for i in range(len(env))
    ]
    if attempt:  # the learner trains only on this launch's segments
        learner_args += ["--run-id", collection[0]["run_id"]]
    return LaunchPlan(
        config=cfg,
        rollout=rollout,
        env=env,
        learner=ProcessPlan(
            "learner",
            learner_args,
            placement["actor"],
            f"{host('learner')}:{learner_port}",
            f"{host('learner')}:{learner_metrics}",
        ),
        collection=collection,
        evaluation=evaluation_args(cfg),
        evaluation_servers=[p.target for p in env[: cfg.env.eval.num_servers]],
    )


PROMETHEUS_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"


def prometheus_config(
    plan: LaunchPlan, scrape_interval_s: float = 5.0, rules: str = str(PROMETHEUS_RULES)
) -> dict:
    """A Prometheus configuration that scrapes every service of the plan (jobs vla-rl-env,
    vla-rl-rollout, vla-rl-learner; label `instance_name` = the service's name) and loads the
    alert rules of deploy/prometheus/alerts.yml (at `rules`)."""
    jobs = {"env": plan.env, "rollout": plan.rollout, "learner": [plan.learner]}
    return {
        "global": {
            "scrape_interval": f"{scrape_interval_s:g}s",
            "evaluation_interval": f"{scrape_interval_s:g}s",
        },
        "rule_files": [rules],
        "scrape_configs": [
            {
                "job_name": f"vla-rl-{job}",
                "static_configs": [
                    {"targets": [p.metrics_target], "labels": {"instance_name": p.name}}
                    for p in procs
                    if p.metrics_target
                ],
            }
            for job, procs in jobs.items()
        ],
    }


def write_prometheus_config(plan: LaunchPlan, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(prometheus_config(plan), sort_keys=False))
    return path


def wait_until_healthy(launch: Launch, timeout_s: float = 300) -> None:
    """Wait for every started gRPC service to report SERVING. A child that dies meanwhile is
    reported at once with its log's last lines (it used to surface only after `timeout_s`)."""
    from vla_rl.rpc.client import wait_for_health

    deadline = time.monotonic() + timeout_s
    waiting = [c for c in launch.children if c.target]
    while waiting:
        launch.check_alive()
        remaining = deadline - time.monotonic()
        try:
            wait_for_health(waiting[0].target, timeout_s=max(0.1, min(2.0, remaining)))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{waiting[0].name} did not report SERVING within {timeout_s:.0f} s; "
                    f"see {waiting[0].log_path}"
                ) from None
            continue
        waiting.pop(0)
    launch.check_alive()


class Supervisor:
    """Brings back a crashed redis-server, rollout server or env server of a running training
    run, up to `max_restarts` times each with a growing pause, then fails the run naming it:

    - redis-server: the same port, config and directory; its append-only file restores every
      acknowledged write, and the services' clients retry meanwhile (buffer/redis_streams.py).
    - rollout server: the same port, told to answer Act with UNAVAILABLE until it holds the
      learner's current policy version; the learner re-pushes its latest adapter to a replica
      behind it, and env servers retry Act meanwhile, so no action comes from stale weights.
    - env server: the same port, then StartCollection from the learner's current iteration. The
      episodes it had in flight are lost (counted in `lost_envs`); segments it wrote before the
      crash and writes again carry the same ids, and the learner drops the repeats.
    - learner: only where its newest checkpoint holds the version the rollout serves (with
      runner.save_interval 1 it always does: a checkpoint is committed before each push); it
      resumes there, re-reads the segments it had taken and not acknowledged, and collection
      goes on. From an older checkpoint the served policy would go backwards, so the run ends
      instead, saying so (a rerun resumes from that checkpoint).
    """

    def __init__(self, launch: Launch, plan: LaunchPlan, learner_target: str,
                 max_restarts: int = 3, pause_s: float = 1.0) -> None:  # fmt: skip
        self.launch, self.plan, self.learner_target = launch, plan, learner_target
        self.max_restarts, self.pause_s = max_restarts, pause_s
        self.restarts: dict[str, int] = {}
        self.lost_envs = 0

    def poll(self) -> None:
        for child in list(self.launch.children):
            code = child.proc.poll()
            if code is not None and child.name != "learner":
                self._restart(child, code)

    def _restart(self, child: Child, code: int) -> None:
        n = self.restarts.get(child.name, 0) + 1
        reason = exit_reason(child.name, code)
        if n > self.max_restarts:
            raise RuntimeError(f"{reason} after {self.max_restarts} restarts; giving up. Its log "
                               f"ends:\n{child.log_tail()}")  # fmt: skip
        self.restarts[child.name] = n
        print(f"vla-rl train: {reason}; restarting it ({n} of {self.max_restarts}), log: "
              f"{child.log_path}", file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(self.pause_s * 2 ** (n - 1))
        status = self._learner_status()
        extra = []
        if child.name.startswith("rollout"):
            extra = ["--min-policy-version", str(status.policy_version)]
        new = self.launch.restart(child, extra)
        if child.name == "redis":
            _wait_redis(self.plan.config.buffer.url)
        else:
            wait_for_target(new, self.launch)
        if child.name.startswith("env"):
            index = [p.name for p in self.plan.env].index(child.name)
            fields = dict(self.plan.collection[index])
            start = max(int(status.iteration), int(fields["start_version"]))
            fields["iterations"] = fields["start_version"] + fields["iterations"] - start
            fields["start_version"] = start
            self.lost_envs += int(fields["num_envs"])
            _start_collection([new], [fields])
        print(f"vla-rl train: {child.name} is back", file=sys.stderr, flush=True)

    def restart_learner(self, child: Child, code: int) -> bool:
        """Restart a learner that exited with `code` != 0 if it can resume exactly where the
        rollout is; False (with the reason printed) when it cannot."""
        from vla_rl.rpc.rollout_client import RolloutClient
        from vla_rl.training.checkpoints import read_state, resume_source

        cfg = self.plan.config
        reason = exit_reason("the learner", code)
        n = self.restarts.get(child.name, 0) + 1
        if n > self.max_restarts:
            print(f"vla-rl train: {reason} after {self.max_restarts} restarts; giving up",
                  file=sys.stderr, flush=True)  # fmt: skip
            return False
        path = resume_source(cfg.actor.checkpoint_dir, cfg.runner.resume_dir)
        saved = read_state(path).policy_version if path is not None else 0
        served = 0
        for target in cfg.rollout.addresses:
            client = RolloutClient(target)
            try:
                served = max(served, int(client.policy().policy_version))
            finally:
                client.close()
        if saved < served:
            print(f"vla-rl train: {reason}. Not restarted in place: the rollout serves policy "
                  f"version {served} but the newest checkpoint holds {saved} "
                  f"(runner.save_interval={cfg.runner.save_interval}; with 1 a learner crash is "
                  "survived in place)", file=sys.stderr, flush=True)  # fmt: skip
            return False
        self.restarts[child.name] = n
        print(f"vla-rl train: {reason}; restarting it from version {saved} "
              f"({n} of {self.max_restarts})", file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(self.pause_s * 2 ** (n - 1))
        self.launch.restart(child)
        return True

    def _learner_status(self):
        from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel
        from vla_rl.rpc.gen.v1 import learner_pb2, learner_pb2_grpc

        with make_channel(self.learner_target) as channel:
            return learner_pb2_grpc.LearnerServiceStub(channel).GetStatus(
                learner_pb2.LearnerStatusRequest(), timeout=DEFAULT_DEADLINE_S["status"]
            )


def wait_for_target(child: Child, launch: Launch, timeout_s: float = 300) -> None:
    """Wait for one restarted service to report SERVING (its death meanwhile is reported)."""
    from vla_rl.rpc.client import wait_for_health

    deadline = time.monotonic() + timeout_s
    while True:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{exit_reason(child.name, child.proc.returncode)} while "
                               f"restarting:\n{child.log_tail()}")  # fmt: skip
        try:
            wait_for_health(child.target, timeout_s=2.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} did not come back within {timeout_s:.0f} s; "
                                   f"see {child.log_path}") from None  # fmt: skip


def start_task_check(cfg: TrainConfig) -> subprocess.Popen:
    """Check env.train/env.eval task ids (with their task modules) in a subprocess, beside the
    rest of the start-up: it imports ManiSkill, which takes seconds."""
    lists = {
        f"env.{name}.task_ids": {"tasks": list(env.task_ids), "modules": list(env.task_modules)}
        for name, env in (("train", cfg.env.train), ("eval", cfg.env.eval))
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.env_server.tasks", json.dumps(lists)],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish_task_check(check: subprocess.Popen) -> None:
    """ConfigError naming the task list when the check failed (an unknown task used to surface
    only when the env servers were asked to collect, after the model had loaded)."""
    _, err = check.communicate()
    if check.returncode != 0:
        key, _, reason = (
            err.strip().splitlines()[-1].partition(": ") if err.strip() else ("", "", "")
        )
        if key.startswith("env.") and reason:
            raise ConfigError(key, reason)
        raise RuntimeError(f"the task check failed (exit {check.returncode}): {err.strip()}")


def train(config_path: str | None, overrides: list[str], num_gpus: int | None = None) -> int:
    cfg = load_config(config_path, overrides)  # every config error surfaces before any start
    check = start_task_check(cfg)
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    try:
        cfg.cluster.resolve(num_gpus)  # a placement this machine cannot satisfy fails here
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        launch = Launch(run_dir)
        local_redis = buffer_kind(cfg, shutil.which("redis-server") is not None) == "redis"
        creds = launch.credentials(local_redis=local_redis)
        with sigterm_as_interrupt(), security.use(creds):
            return _train(cfg, launch, num_gpus, check)
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()


def _train(cfg: TrainConfig, launch: Launch, num_gpus: int, check: subprocess.Popen) -> int:
    from vla_rl.training.checkpoints import read_state, resume_source

    run_dir = launch.run_dir

    try:
        resume = resume_source(
            cfg.actor.checkpoint_dir,
            cfg.runner.resume_dir,
            warn=lambda message: print(f"vla-rl train: {message}", flush=True),
        )
    except ValueError as e:
        raise ConfigError("runner.resume_dir", str(e)) from None
    supervisor: Supervisor | None = None
    try:
        model_path = prepare_model(cfg, run_dir)
        finish_task_check(check)  # before the buffer or any service starts
        plan = launch_plan(
            cfg,
            num_gpus,
            model_path=model_path,
            buffer_url=start_buffer(cfg, launch),
            start_iteration=read_state(resume).iteration if resume else 0,
            attempt=time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}",
        )
        cfg = plan.config
        for line in idle_gpus(plan, num_gpus):
            print(f"vla-rl train: warning: {line}", flush=True)
        py = sys.executable
        for proc in plan.rollout + plan.env:
            launch.start(proc.name, [py, *proc.args], gpus=proc.gpus, target=proc.target)
        dump_yaml(cfg, run_dir / "config.yaml")
        scrape = write_prometheus_config(plan, run_dir / "prometheus.yml")
        wait_until_healthy(launch)
        learner = launch.start(
            "learner", [py, *plan.learner.args], gpus=plan.learner.gpus, to_console=True
        )
        _start_collection(env_children(launch), plan.collection)
        supervisor = Supervisor(launch, plan, plan.learner.target)
        evaluations = None
        if plan.evaluation is not None:
            evaluations = Evaluations(cfg, plan.evaluation, plan.evaluation_servers)
        print(
            f"vla-rl train: {cfg.runner.max_epochs} iterations of {cfg.algorithm.adv_type.upper()}"
            f" on {cfg.env.train.task_ids} ({cfg.env.train.total_num_envs} envs, "
            f"{cfg.rollout.engine} engine); logs in {run_dir}; Prometheus: "
            f"prometheus --config.file={scrape}",
            flush=True,
        )
        while True:
            while learner.proc.poll() is None:
                time.sleep(1.0)
                supervisor.poll()
                _check_collection(env_children(launch))
                if evaluations is not None:
                    evaluations.poll()
            code = learner.proc.returncode
            if code == 0 or not supervisor.restart_learner(learner, code):
                break
            learner = next(c for c in launch.children if c.name == "learner")
        if code == 0 and evaluations is not None:
            evaluations.finish()
        write_summary(cfg, launch, supervisor)
        if code == 0:
            print(f"learning curve: {write_curve(cfg)}", flush=True)
            print(f"done: TensorBoard logs in {run_dir / 'tensorboard'}, "
                  f"checkpoints in {cfg.actor.checkpoint_dir}", flush=True)  # fmt: skip
        else:
            print(f"vla-rl train: {exit_reason('the learner', code)}; every service is being "
                  f"stopped. A rerun resumes from the latest checkpoint in "
                  f"{cfg.actor.checkpoint_dir}", file=sys.stderr, flush=True)  # fmt: skip
        return code if code >= 0 else 128 - code
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every service", flush=True)
        if supervisor is not None:
            # A run stopped by hand is a run too: the learner first (it saves its last
            # iteration), then the summary and the curve while the env servers still answer.
            with signals_ignored():
                launch.stop_learner()
                _report_interrupted(cfg, launch, supervisor)
        return 130
    finally:
        launch.stop()


def write_summary(cfg: TrainConfig, launch: Launch, supervisor: Supervisor) -> None:
    """summary.json in the run directory: run_summary plus the supervisor's restarts."""
    summary = run_summary(cfg, env_children(launch), launch.child_env)
    summary["restarts"] = dict(supervisor.restarts)
    summary["lost_envs"] = supervisor.lost_envs
    (launch.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def write_curve(cfg: TrainConfig) -> Path:
    """The learning curve PNG from the run's TensorBoard scalars."""
    from vla_rl.report import plot_learning_curve

    train = cfg.env.train
    return plot_learning_curve(
        Path(cfg.run_dir),
        train.total_num_envs * train.max_steps_per_rollout_epoch,
        title=f"{cfg.runner.logger.experiment_name}: {cfg.algorithm.adv_type.upper()} "
        f"on {', '.join(train.task_ids)}",
    )


def _report_interrupted(cfg: TrainConfig, launch: Launch, supervisor: Supervisor) -> None:
    """Summary and curve of a stopped run; a failure here is reported, never raised (the
    services must still be stopped)."""
    try:
        write_summary(cfg, launch, supervisor)
        print(f"learning curve: {write_curve(cfg)}", flush=True)
        print(f"stopped: checkpoints in {cfg.actor.checkpoint_dir}; a rerun resumes from the "
              "latest", flush=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 (any failure: the stop goes on)
        print(f"vla-rl train: no summary for the stopped run: {e}", file=sys.stderr, flush=True)


def run_evaluation(
    cfg: TrainConfig, args: dict, env_targets: list[str], step: int
) -> dict[str, float]:
    """One evaluation of the policy the rollout serves: env.eval's episodes in contiguous chunks
    over `env_targets` (the plan's evaluation_servers; the same episodes one server would play),
    logged under eval/* at `step`, written to eval/step_<step>.json and eval.json (the latest),
    with videos under <video_base_dir>/step_<step>/."""
    from torch.utils.tensorboard import SummaryWriter

    from vla_rl.eval_run import play_episodes
    from vla_rl.report import success_summary

    video_dir = Path(args["video_dir"]) / f"step_{step:05d}" if args["video_dir"] else None
    result = play_episodes(args, env_targets, cfg.rollout.addresses, video_dir)
    metrics = result.metrics()
    run_dir = Path(cfg.run_dir)
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
    text = json.dumps(result.episodes, indent=2)
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / f"step_{step:05d}.json").write_text(text)
    (run_dir / "eval.json").write_text(text)
    low, high = success_summary(result.episodes)["all"]["ci95"]
    print(
        f"eval at step {step}: success {metrics['eval/success_once']:.2f} "
        f"(95% CI {low:.2f}-{high:.2f}) over {len(result.episodes)} episodes"
        + (f", videos in {video_dir}" if video_dir else ""),
        flush=True,
    )
    return metrics


class Evaluations:
    """env.eval on the served policy: every runner.val_check_interval policy versions, in a
    thread beside training (episodes report the version that served them; the step is the
    version when the evaluation started), and once on the final policy."""

    def __init__(self, cfg: TrainConfig, args: dict, env_targets: list[str]) -> None:
        from vla_rl.rpc.rollout_client import RolloutClient

        self.cfg, self.args, self.env_targets = cfg, args, env_targets
        self.interval = cfg.runner.val_check_interval
        self.rollout = RolloutClient(cfg.rollout.addresses[0])
        self.steps: list[int] = []
        self.thread: threading.Thread | None = None

    def _run(self, step: int) -> None:
        try:
            run_evaluation(self.cfg, self.args, self.env_targets, step)
        except Exception as e:  # noqa: BLE001 - an evaluation must not stop training
            print(f"eval at step {step} failed: {type(e).__name__}: {e}", flush=True)

    def poll(self) -> None:
        """Start a periodic evaluation when one is due and none is running."""
        if self.interval <= 0 or (self.thread is not None and self.thread.is_alive()):
            return
        version = self.rollout.policy().policy_version
        due = version // self.interval * self.interval
        if 0 < due < self.cfg.runner.max_epochs and due not in self.steps:
            self.steps.append(due)
            self.thread = threading.Thread(target=self._run, args=(version,), daemon=True)
            self.thread.start()

    def finish(self) -> None:
        """Wait for a running evaluation, then evaluate the final policy."""
        if self.thread is not None:
            self.thread.join()
        self.steps.append(self.cfg.runner.max_epochs)
        self._run(self.cfg.runner.max_epochs)
        self.rollout.close()


def run_summary(
    cfg: TrainConfig, env_servers: list[Child], child_env: dict[str, str] | None = None
) -> dict:
    """The services' final state, read before they stop: what each rollout replica serves, what
    the env servers wrote and what the buffer holds (for the user, and for the e2e tests).
    `child_env`: what the services were started with (the served memory buffer's key is there,
    not in this process's environment)."""
    from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel
    from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc
    from vla_rl.rpc.rollout_client import RolloutClient

    summary: dict = {"rollout": [], "env": [], "buffer": {}}
    for target in cfg.rollout.addresses:
        client = RolloutClient(target)
        try:
            info = client.policy()
            summary["rollout"].append(
                {"target": target, "policy_version": info.policy_version,
                 "engine": info.engine, "adapter_sha256": info.adapter_sha256}
            )  # fmt: skip
        finally:
            client.close()
    for child in env_servers:
        with make_channel(child.target) as channel:
            status = env_pb2_grpc.EnvServiceStub(channel).GetStatus(
                env_pb2.GetStatusRequest(), timeout=DEFAULT_DEADLINE_S["status"]
            )
        summary["env"].append(
            {"name": child.name, "state": status.state, "segments_written": status.segments_written,
             "env_steps": status.env_steps, "episodes": status.episodes,
             "seconds": {"act_wait": status.act_wait_seconds,
                         "env_step": status.env_step_seconds,
                         "policy_wait": status.policy_wait_seconds}}
        )  # fmt: skip
    from vla_rl.buffer import from_url
    from vla_rl.buffer.memory import AUTHKEY_ENV

    buffer = from_url(cfg.buffer.url, stream=cfg.buffer.stream, group=cfg.buffer.group,
                      authkey=(child_env or {}).get(AUTHKEY_ENV))  # fmt: skip
    try:
        summary["buffer"] = {
            "url": security.redact_url(cfg.buffer.url),
            "length": buffer.length(),
            "pending": buffer.pending(),
            "dead_letters": buffer.dead_letters(),
            "acked_segments": buffer.acknowledged(),
        }
    finally:
        buffer.close()
    return summary


def env_children(launch: Launch) -> list[Child]:
    """The env servers now running (a restarted one replaces its predecessor)."""
    return [c for c in launch.children if c.name.startswith("env")]


def _check_collection(servers: list[Child]) -> None:
    """A collection that failed inside an env server (e.g. a broken task) ends the run. A server
    that does not answer is left to the Supervisor (it may have just died)."""
    import grpc

    from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel
    from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc

    for child in servers:
        try:
            with make_channel(child.target) as channel:
                status = env_pb2_grpc.EnvServiceStub(channel).GetStatus(
                    env_pb2.GetStatusRequest(), timeout=DEFAULT_DEADLINE_S["status"]
                )
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                continue
            raise
        if status.state == "failed":
            raise RuntimeError(f"{child.name} collection failed: {status.error}")


def _start_collection(servers: list[Child], requests: list[dict]) -> None:
    from vla_rl.rpc.client import DEFAULT_DEADLINE_S, make_channel
    from vla_rl.rpc.gen.v1 import env_pb2, env_pb2_grpc

    def start(child: Child, fields: dict) -> None:
        with make_channel(child.target) as channel:
            env_pb2_grpc.EnvServiceStub(channel).StartCollection(
                env_pb2.StartCollectionRequest(**fields),
                timeout=DEFAULT_DEADLINE_S["collection"],
            )

    # All at once: each server checks the tasks' controllers in a subprocess and builds its envs
    # before it answers (seconds each); one after another, 16 servers took 4 minutes on an H200.
    with ThreadPoolExecutor(max(1, len(servers))) as pool:
        for done in [pool.submit(start, c, f) for c, f in zip(servers, requests, strict=True)]:
            done.result()  # the first failure, as before
