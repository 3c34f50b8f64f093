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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vla_rl.buffer import from_url
from vla_rl.config import TrainConfig, load_config
from vla_rl.models import PromptTokenizer, load_policy, load_tokenizer
from vla_rl.models.lora import LoRASettings, apply_lora
from vla_rl.rpc import LEARNER_SERVICE
from vla_rl.rpc.gen.v1 import learner_pb2, learner_pb2_grpc
from vla_rl.rpc.rollout_client import RolloutClient
from vla_rl.rpc.server import add_health_and_reflection, make_server, map_errors
from vla_rl.training.distributed import cleanup, init_distributed, shard_policy
from vla_rl.training.update import PPOUpdateConfig, make_optimizer

from .batch import AdvantageConfig
from .trainer import Learner, LoopSettings

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
        normalize_advantages=alg.normalize_advantages,
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


def make_publisher(targets: list[str]):
    clients = [RolloutClient(t) for t in targets]
    pool = ThreadPoolExecutor(max(1, len(clients)))

    def publish(blob: bytes, version: int) -> None:
        replies = list(pool.map(lambda c: c.push_adapter(blob, version), clients))
        bad = [
            c.target for c, r in zip(clients, replies, strict=True) if r.policy_version != version
        ]
        if bad:
            raise RuntimeError(f"replicas {bad} did not switch to version {version}")

    return publish, clients


def make_metric_logger(cfg: TrainConfig):
    """TensorBoard and/or W&B, per runner.logger.logger_backends. W&B follows its own settings
    (WANDB_MODE=offline writes the run under <run_dir>/wandb without a network)."""
    writers = []
    runs = []
    backends = cfg.runner.logger.logger_backends
    if "tensorboard" in backends:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(os.path.join(cfg.run_dir, "tensorboard")))
    if "wandb" in backends:
        import wandb

        from vla_rl.config import to_dict

        runs.append(
            wandb.init(
                project=cfg.runner.logger.project_name,
                name=cfg.runner.logger.experiment_name,
                dir=cfg.run_dir,
                config=to_dict(cfg),
            )
        )

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        for w in writers:
            for key, value in metrics.items():
                w.add_scalar(key, value, step)
            w.flush()
        for run in runs:
            run.log(dict(metrics), step=step)

    def close() -> None:
        for w in writers:
            w.close()
        for run in runs:
            run.finish()

    return log_metrics, close


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s learner %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description="The learner: PPO / GRPO updates, adapter push.")
    p.add_argument("--config", required=True, help="the run's resolved config.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50053)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    cfg = load_config(args.config, [])
    info = init_distributed(cfg.actor.fsdp_config.backend)
    device = info.device if info.world_size > 1 else torch.device(args.device)
    torch.manual_seed(cfg.runner.seed)
    model_path = cfg.actor.model.model_path
    if not model_path:
        raise SystemExit("learner: actor.model.model_path must name a checkpoint directory")
    policy = load_policy(model_path, dtype=_DTYPES[cfg.actor.model.precision], device=device)
    lora = cfg.actor.lora
    apply_lora(policy, LoRASettings(lora.rank, lora.alpha, lora.dropout, list(lora.targets)))
    policy.to(device)
    shard_policy(policy)  # FSDP2 units per block; nothing in a single process
    optim = cfg.actor.optim
    optimizer = make_optimizer(
        policy, optim.lr, optim.value_lr, (optim.adam_beta1, optim.adam_beta2), optim.weight_decay
    )
    # Only rank 0 talks to the buffer, the rollout replicas, TensorBoard and status clients.
    buffer = publish = server = None
    clients = []
    log_metrics = lambda m, step: None  # noqa: E731
    close_loggers = lambda: None  # noqa: E731
    if info.is_main:
        buffer = from_url(
            cfg.buffer.url,
            stream=cfg.buffer.stream,
            group=cfg.buffer.group,
            consumer="learner-0",
            maxlen=cfg.buffer.maxlen,
        )
        publish, clients = make_publisher(list(cfg.rollout.addresses))
        log_metrics, close_loggers = make_metric_logger(cfg)
    alg = cfg.algorithm
    learner = Learner(
        policy,
        PromptTokenizer(load_tokenizer(model_path)),
        optimizer,
        buffer,
        publish,
        update_config(cfg),
        AdvantageConfig(alg.adv_type, alg.gamma, alg.gae_lambda, alg.filter_rewards),
        LoopSettings(
            segments_per_iteration=cfg.env.train.total_num_envs,
            max_iterations=cfg.runner.max_epochs,
            checkpoint_dir=Path(cfg.actor.checkpoint_dir),
            save_interval=cfg.runner.save_interval
            if cfg.runner.save_interval > 0
            else cfg.runner.max_epochs,
            temperature=cfg.rollout.sampling_params.temperature_train,
            micro_batch_size=cfg.actor.micro_batch_size,
        ),
        log_metrics=log_metrics,
        seed=cfg.runner.seed,
    )
    if learner.resume():
        learner.publish_current()

    if info.is_main:
        server = make_server(max_workers=4)
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(LearnerServicer(learner), server)
        add_health_and_reflection(server, [LEARNER_SERVICE])
        if server.add_insecure_port(f"{args.host}:{args.port}") == 0:
            raise SystemExit(f"learner: cannot bind {args.host}:{args.port}")
        server.start()

    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("%s: stopping after the current phase", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        learner.run(stop.is_set, print_line=lambda line: print(line, flush=True))
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
        for c in clients:
            c.close()
        close_loggers()
        cleanup()


if __name__ == "__main__":
    main()
