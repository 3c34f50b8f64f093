"""Entry point: `python -m services.learner.main --config RUN_DIR/config.yaml --port N`, or
under `torchrun --nproc_per_node W` for FSDP over W processes (gloo on the CPU, NCCL on GPUs).

Reads the run's resolved config (written by `vla-rl train`), trains until runner.max_epochs,
serves LearnerService status, and stops cleanly on SIGTERM/SIGINT after the current phase.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from vla_rl.buffer import from_url
from vla_rl.config import TrainConfig, load_config, to_dict
from vla_rl.models import PromptTokenizer, load_policy, load_tokenizer
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.rpc import LEARNER_SERVICE
from vla_rl.rpc.gen.v1 import learner_pb2, learner_pb2_grpc
from vla_rl.rpc.rollout_client import RolloutClient
from vla_rl.rpc.server import add_health_and_reflection, bind, make_server, map_errors
from vla_rl.telemetry import serve_metrics
from vla_rl.training.distributed import cleanup, init_distributed, shard_policy
from vla_rl.training.update import PPOUpdateConfig, make_optimizer

from . import metrics
from .batch import AdvantageConfig
from .trainer import Learner, LoopSettings, Publish, SegmentTimeout

log = logging.getLogger("vla_rl.learner")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def update_config(cfg: TrainConfig) -> PPOUpdateConfig:
    """RLinf's algorithm/actor keys -> the update's knobs."""
    alg, actor = cfg.algorithm, cfg.actor
    decisions = cfg.decisions_per_iteration
    return PPOUpdateConfig(
        update_epochs=alg.update_epoch,
        num_mini_batches=max(1, math.ceil(decisions / actor.global_batch_size)),
        micro_batch_size=actor.micro_batch_size,
        clip_ratio_low=alg.clip_ratio_low,
        clip_ratio_high=alg.clip_ratio_high,
        dual_clip_c=alg.clip_ratio_c,
        value_clip=alg.value_clip,
        huber_delta=alg.huber_delta,
        value_coef=alg.value_coef if alg.loss_type == "actor_critic" else 0.0,
        entropy_coef=alg.entropy_bonus,
        max_grad_norm=actor.optim.clip_grad,
        logprob_level=alg.logprob_type.removesuffix("_level"),
        temperature=cfg.rollout.sampling_params.temperature_train,
        normalize_advantages=bool(alg.normalize_advantages),
        entropy_level=alg.entropy_type.removesuffix("_level"),
        decoupled=alg.max_staleness > 0,
        behaviour_weight_cap=alg.behaviour_weight_cap,
        kl_estimator=alg.kl_estimator,
    )


@dataclass
class LearnerPlan:
    """Everything the learner builds from the run's config, in one place (and comparable, so a
    test can prove that every config key changes something)."""

    model_path: str | None
    precision: str
    model_type: str
    action_dim: int
    num_action_chunks: int
    gradient_checkpointing: bool
    sharding_strategy: str
    dist_backend: str
    lora: LoRASettings
    optimizer: dict
    update: PPOUpdateConfig
    advantage: AdvantageConfig
    loop: LoopSettings
    buffer: dict
    rollout_targets: list[str]
    rollout_discovery: str
    """Kubernetes Service whose EndpointSlices name the replicas ("": rollout_targets)."""
    logger: dict
    seed: int


def learner_plan(cfg: TrainConfig) -> LearnerPlan:
    """The run's config -> what the learner process builds."""
    alg, actor, optim, lora = cfg.algorithm, cfg.actor, cfg.actor.optim, cfg.actor.lora
    return LearnerPlan(
        model_path=actor.model.model_path,
        precision=actor.model.precision,
        model_type=actor.model.model_type,
        action_dim=actor.model.action_dim,
        num_action_chunks=actor.model.num_action_chunks,
        gradient_checkpointing=actor.fsdp_config.gradient_checkpointing,
        sharding_strategy=actor.fsdp_config.sharding_strategy,
        dist_backend=actor.fsdp_config.backend,
        lora=LoRASettings(lora.rank, lora.alpha, lora.dropout, list(lora.targets)),
        optimizer={
            "lr": optim.lr,
            "value_lr": optim.value_lr,
            "betas": (optim.adam_beta1, optim.adam_beta2),
            "weight_decay": optim.weight_decay,
            "eps": optim.adam_eps,
        },
        update=update_config(cfg),
        advantage=AdvantageConfig(
            adv_type=alg.adv_type,
            gamma=alg.gamma,
            gae_lambda=alg.gae_lambda,
            reward_scale=alg.reward_scale,
            filter_rewards=alg.filter_rewards,
            rewards_lower_bound=alg.rewards_lower_bound,
            rewards_upper_bound=alg.rewards_upper_bound,
            loss_agg_func=alg.loss_agg_func,
        ),
        loop=LoopSettings(
            segments_per_iteration=cfg.env.train.total_num_envs,
            max_iterations=cfg.runner.max_epochs,
            checkpoint_dir=Path(actor.checkpoint_dir),
            save_interval=cfg.runner.save_interval
            if cfg.runner.save_interval > 0
            else cfg.runner.max_epochs,
            resume_dir=cfg.runner.resume_dir,
            temperature=cfg.rollout.sampling_params.temperature_train,
            micro_batch_size=actor.micro_batch_size,
            recompute_logprobs=alg.recompute_logprobs,
            critic_warmup_steps=optim.critic_warmup_steps,
            max_staleness=alg.max_staleness,
            segment_timeout_s=cfg.runner.segment_timeout_s,
        ),
        buffer={
            "url": cfg.buffer.url,
            "stream": cfg.buffer.stream,
            "group": cfg.buffer.group,
            "maxlen": cfg.buffer.maxlen,
        },
        rollout_targets=list(cfg.rollout.addresses),
        rollout_discovery=cfg.rollout.discovery_service,
        logger={
            "backends": list(cfg.runner.logger.logger_backends),
            "dir": cfg.run_dir,
            "project": cfg.runner.logger.project_name,
            "name": cfg.runner.logger.experiment_name,
        },
        seed=cfg.runner.seed,
    )


def check_model(policy, plan: LearnerPlan) -> None:
    """The checkpoint must be the model the config describes (action_dim, chunks, decoding)."""
    model = policy.config
    decoding = "parallel" if plan.model_type == "openvla_oft" else "autoregressive"
    for key, want, got in (
        ("actor.model.action_dim", plan.action_dim, model.action_dim),
        ("actor.model.num_action_chunks", plan.num_action_chunks, model.action_chunk),
        ("actor.model.model_type", decoding, model.decoding),
    ):
        if want != got:
            raise SystemExit(
                f"learner: {key} says {want!r} but the checkpoint {plan.model_path} has {got!r}"
            )


def build_learner(
    plan: LearnerPlan,
    device: torch.device,
    buffer,
    publish: Publish | None,
    log_metrics: Callable[[dict[str, float], int], None] = lambda m, step: None,
    while_waiting: Callable[[], None] = lambda: None,
) -> Learner:
    """The policy (LoRA, gradient checkpointing, sharding as planned), its optimizer and the
    Learner around them; `buffer` and `publish` are rank 0's (None on the other ranks). Seeded
    with the run's seed first: every rank starts from the same LoRA initialisation."""
    torch.manual_seed(plan.seed)
    policy = load_policy(plan.model_path, dtype=_DTYPES[plan.precision], device=device)
    check_model(policy, plan)
    apply_lora(policy, plan.lora)
    if plan.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.to(device)
    shard_policy(policy, plan.sharding_strategy)
    return Learner(
        policy,
        PromptTokenizer(load_tokenizer(plan.model_path)),
        make_optimizer(policy, **plan.optimizer),
        buffer,
        publish,
        plan.update,
        plan.advantage,
        plan.loop,
        log_metrics=log_metrics,
        seed=plan.seed,
        while_waiting=while_waiting,
    )


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, learner: Learner) -> None:
        self.learner = learner

    @map_errors
    def GetStatus(self, request, context):
        lr = self.learner
        return learner_pb2.LearnerStatus(
            iteration=lr.iteration,
            policy_version=lr.policy_version,
            phase=lr.phase,
            last_metrics={k: float(v) for k, v in lr.last_metrics.items()},
        )


class Replicas:
    """The rollout replicas the learner publishes to. A replica that is down (restarting) does
    not stop training: it is skipped with a warning and, once it answers again, `resync` pushes
    it the latest adapter (a restarted replica waits for that before it serves)."""

    def __init__(self, targets: list[str]) -> None:
        self.clients = [RolloutClient(t) for t in targets]
        self.pool = ThreadPoolExecutor(8)
        self.latest: tuple[bytes, int] | None = None
        self.resynced = 0
        self._lock = threading.Lock()  # set_targets comes from the discovery thread
        # One replica check-and-push at a time: a new replica's catch-up (on the pool) and the
        # learner's resync would otherwise push it the same version twice, and the second push
        # is refused.
        self._syncing = threading.Lock()

    def set_targets(self, targets: list[str]) -> None:
        """The replicas now (Kubernetes discovery): gone ones are closed; new ones get the latest
        adapter at once, on the pool, so that the discovery thread goes on watching and the
        replica does not serve a stale policy until the learner next waits for segments."""
        with self._lock:
            gone = [c for c in self.clients if c.target not in targets]
            known = {c.target for c in self.clients}
            new = [RolloutClient(t) for t in targets if t not in known]
            self.clients = [c for c in self.clients if c.target in targets] + new
        for client in gone:
            client.close()
        for client in new:
            self.pool.submit(self._catch_up, client)
        log.info("rollout replicas: %s", targets)

    def _catch_up(self, client: RolloutClient) -> None:
        """_resync for a replica that just appeared. A failure is logged here (the pool would
        keep it unseen in a future nobody reads) and left to the learner's resync to retry."""
        try:
            self._resync(client)
        except Exception as e:  # noqa: BLE001 - e.g. a newer publish got there first
            log.warning("new replica %s not brought up to date (%s); resync retries",
                        client.target, e)  # fmt: skip

    def _current(self) -> list[RolloutClient]:
        with self._lock:
            return list(self.clients)

    def _push(self, client: RolloutClient, blob: bytes, version: int) -> bool:
        """False when the replica is unavailable; any other refusal is an error."""
        try:
            reply = client.push_adapter(blob, version)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            log.warning("replica %s unavailable; it gets version %d when it is back",
                        client.target, version)  # fmt: skip
            return False
        if reply.policy_version != version:
            raise RuntimeError(f"replica {client.target} did not switch to version {version}")
        return True

    def _push_or_has(self, client: RolloutClient, blob: bytes, version: int) -> bool:
        """_push, except that a replica already serving `version` (a learner restarted from the
        checkpoint of the version it had pushed) is left as it is."""
        try:
            return self._push(client, blob, version)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            if client.policy().policy_version != version:
                raise
            return True

    def publish(self, blob: bytes, version: int) -> None:
        self.latest = (blob, version)
        list(self.pool.map(lambda c: self._publish_to(c, blob, version), self._current()))

    def _publish_to(self, client: RolloutClient, blob: bytes, version: int) -> None:
        """_push_or_has, except that a replica discovery removed meanwhile (its pod went away
        and its client was closed mid-push) is no reason to stop training."""
        try:
            self._push_or_has(client, blob, version)
        except (grpc.RpcError, ValueError):  # ValueError: grpc's "closed channel"
            if client in self._current():
                raise
            log.info("replica %s left during the push of version %d", client.target, version)

    def resync(self) -> None:
        """Push the latest adapter to every replica that serves an older version."""
        for client in self._current():
            self._resync(client)

    def _resync(self, client: RolloutClient) -> None:
        with self._syncing:
            if self.latest is None:
                return
            blob, version = self.latest
            try:
                served = client.policy().policy_version
            except grpc.RpcError:
                return  # still down
            if served < version and self._push(client, blob, version):
                self.resynced += 1
                metrics.REPLICA_RESYNCS.inc()
                log.info("replica %s was at version %d: pushed version %d",
                         client.target, served, version)  # fmt: skip

    def close(self) -> None:
        for client in self._current():
            client.close()
        self.pool.shutdown()


def make_metric_logger(settings: dict, config: dict):
    """TensorBoard and/or W&B, per runner.logger.logger_backends. W&B follows its own settings
    (WANDB_MODE=offline writes the run under <run_dir>/wandb without a network)."""
    writers = []
    runs = []
    if "tensorboard" in settings["backends"]:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(os.path.join(settings["dir"], "tensorboard")))
    if "wandb" in settings["backends"]:
        import wandb

        runs.append(
            wandb.init(
                project=settings["project"],
                name=settings["name"],
                dir=settings["dir"],
                config=config,
            )
        )

    def log_metrics(values: dict[str, float], step: int) -> None:
        for w in writers:
            for key, value in values.items():
                w.add_scalar(key, value, step)
            w.flush()
        for run in runs:
            run.log(dict(values), step=step)

    def close() -> None:
        for w in writers:
            w.close()
        for run in runs:
            run.finish()

    return log_metrics, close


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The learner: PPO / GRPO updates, adapter push.")
    p.add_argument("--config", required=True, help="the run's resolved config.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50053)
    p.add_argument("--device", default="cpu")
    p.add_argument("--run-id", default="",
                   help="train only on segments of this run id (this launch); others are "
                        "acknowledged and counted as from an earlier launch")  # fmt: skip
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free one; unset: off)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(levelname)s %(message)s")
    args = parse_args(argv)
    cfg = load_config(args.config, [])
    plan = learner_plan(cfg)
    plan.loop.run_id = args.run_id
    info = init_distributed(plan.dist_backend)
    device = info.device if info.world_size > 1 else torch.device(args.device)
    if not plan.model_path:
        raise SystemExit("learner: actor.model.model_path must name a checkpoint directory")
    server = None
    exporter = None
    if info.is_main:  # listen before the model loads: a taken port costs seconds
        server = make_server(max_workers=4)
        bind(server, f"{args.host}:{args.port}", "learner")
        if args.metrics_port is not None:
            serve_metrics(args.metrics_port, args.host, "learner")
            exporter = metrics.Exporter()
    elif info.local_rank == 0:
        # The first process of every other node (a learner pod of a multi-node job) answers
        # grpc.health on the same port, so that an orchestrator's probes see that pod alive;
        # only global rank 0 serves the LearnerService.
        server = make_server(max_workers=1)
        bind(server, f"{args.host}:{args.port}", "learner node")
    # Only rank 0 talks to the buffer, the rollout replicas, TensorBoard and status clients.
    buffer = replicas = None
    log_metrics = lambda m, step: None  # noqa: E731
    close_loggers = lambda: None  # noqa: E731
    if info.is_main:
        buffer = from_url(**plan.buffer, consumer="learner-0")
        replicas = Replicas([] if plan.rollout_discovery else plan.rollout_targets)
        if plan.rollout_discovery:
            from vla_rl.discovery import in_cluster_watcher

            in_cluster_watcher(plan.rollout_discovery, replicas.set_targets)
        log_metrics, close_loggers = make_metric_logger(plan.logger, to_dict(cfg))
        if exporter is not None:
            exporter.watch_buffer(buffer)
            to_loggers = log_metrics

            def log_metrics(values: dict[str, float], step: int) -> None:
                to_loggers(values, step)
                exporter.log(values, step)

    # Everything opened above is closed below, also when the model fails to load or check.
    try:
        learner = build_learner(
            plan,
            device,
            buffer,
            replicas.publish if replicas else None,
            log_metrics=log_metrics,
            while_waiting=replicas.resync if replicas else lambda: None,
        )
        if learner.resume():
            learner.publish_current()

        if server is not None:
            if info.is_main:
                learner_pb2_grpc.add_LearnerServiceServicer_to_server(
                    LearnerServicer(learner), server
                )
            add_health_and_reflection(server, [LEARNER_SERVICE] if info.is_main else [])
            server.start()

        stop = threading.Event()

        def on_signal(signum, _frame) -> None:
            log.info("%s: stopping after the current phase", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            learner.run(stop.is_set, print_line=lambda line: print(line, flush=True))
        except SegmentTimeout as e:
            log.error("%s", e)
            raise SystemExit(1) from None
        if info.is_main:
            log.info(
                "done: iteration %d, policy version %d (%d learner process%s)",
                learner.iteration,
                learner.policy_version,
                info.world_size,
                "" if info.world_size == 1 else "es",
            )
    finally:
        if server is not None:
            server.stop(2.0).wait()
        if buffer is not None:
            buffer.close()
        if replicas is not None:
            replicas.close()
        close_loggers()
        cleanup()


if __name__ == "__main__":
    main()
