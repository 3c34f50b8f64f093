"""Entry point: `python -m services.rollout_server.main --checkpoint DIR --engine torch|vllm`."""

from __future__ import annotations

import argparse
import logging
import sys

from vla_rl.config.schema import ENGINES, PRECISIONS, WEIGHT_SYNCS, RolloutConfig
from vla_rl.models import ActionNormalizer, read_config
from vla_rl.rpc import ROLLOUT_SERVICE
from vla_rl.rpc.gen.v1 import rollout_pb2_grpc
from vla_rl.rpc.server import add_health_and_reflection, bind, make_server, serve_until_signal
from vla_rl.telemetry import safely, serve_metrics

from . import metrics
from .batcher import DynamicBatcher
from .servicer import RolloutServicer

log = logging.getLogger("vla_rl.rollout_server")

_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# The flags' defaults are the config's (vla-rl train passes every one of them explicitly).
_DEFAULTS = RolloutConfig()


def engine_options(args: argparse.Namespace) -> dict:
    """Constructor arguments of the chosen engine, from the server's flags."""
    if args.engine == "torch":
        return {"device": args.device, "precision": args.precision}
    if args.engine == "vllm":
        return {
            "device": args.device,
            "dtype": _VLLM_DTYPES[args.precision],
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_batch_size": args.max_batch_size,
            "weight_sync": args.weight_sync,
        }
    raise ValueError(f"unknown engine {args.engine!r} (torch or vllm)")


def build_engine(args: argparse.Namespace):
    options = engine_options(args)
    if args.engine == "torch":
        from .engines.torch_engine import TorchEngine

        return TorchEngine(args.checkpoint, **options)
    from .engines.vllm_engine import VLLMEngine

    return VLLMEngine(args.checkpoint, **options)


def from_run_config(argv: list[str]) -> list[str]:
    """`--config FILE` stands for the flags `vla-rl train` would derive from that run config
    (checkpoint, engine, precision, batching: launch.rollout_server_args); flags given beside it
    win. A Kubernetes pod passes the run's config instead of a second copy of its values."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    from vla_rl.config import load_config
    from vla_rl.launch import rollout_server_args

    cfg = load_config(argv[i + 1], [])
    derived = rollout_server_args(cfg, cfg.actor.model.model_path or "", 50052, "cpu")[2:]
    return derived + argv[:i] + argv[i + 2 :]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = from_run_config(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(description="The rollout server: serves OpenVLA actions.")
    p.add_argument("--config", default=None,
                   help="a run config: the flags vla-rl train derives from it (checkpoint, "
                        "engine, precision, batching); flags given beside it win")  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="OpenVLA checkpoint directory")
    p.add_argument("--engine", default=_DEFAULTS.engine, choices=list(ENGINES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--max-batch-size", type=int, default=_DEFAULTS.max_batch_size)
    p.add_argument("--max-wait-ms", type=float, default=_DEFAULTS.max_wait_ms)
    p.add_argument("--gpu-memory-utilization", type=float, default=_DEFAULTS.gpu_memory_utilization)
    p.add_argument("--weight-sync", default="merge", choices=list(WEIGHT_SYNCS),
                   help="vllm: merge the LLM LoRA into vLLM's weights, or serve it as a vLLM LoRA")  # fmt: skip
    p.add_argument("--unnorm-key", default=None)
    p.add_argument("--base-model-id", default=None, help="reported by GetPolicy")
    p.add_argument("--grace-s", type=float, default=5.0)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free one; unset: off)")  # fmt: skip
    p.add_argument("--min-policy-version", type=int, default=0,
                   help="answer Act with UNAVAILABLE until a pushed adapter reaches this version "
                        "(a replica restarted mid-run waits for the current policy)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rollout %(levelname)s %(message)s")
    args = parse_args(argv)
    server = make_server()
    address = f"{args.host}:{args.port}"
    bind(server, address, "rollout server")  # before the model loads
    if args.metrics_port is not None:
        serve_metrics(args.metrics_port, args.host, "rollout server")
    config = read_config(args.checkpoint)
    normalizer = ActionNormalizer.from_norm_stats(config.norm_stats, args.unnorm_key)
    engine = build_engine(args)
    batcher = DynamicBatcher(engine, args.max_batch_size, args.max_wait_ms)
    servicer = RolloutServicer(
        engine,
        batcher,
        normalizer,
        image_size=int(config.image_sizes[0]),
        base_model_id=args.base_model_id or str(args.checkpoint),
        action_dim=int(config.action_dim),
        min_policy_version=args.min_policy_version,
    )
    metrics.QUEUE_DEPTH.set_function(batcher.queue_depth)
    metrics.POLICY_VERSION.set_function(safely(lambda: engine.policy_version))
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    add_health_and_reflection(server, [ROLLOUT_SERVICE])
    server.start()
    log.info("serving %s engine on %s (policy version %d)", engine.name, address, 0)

    def on_stop() -> None:
        batcher.close()
        engine.close()

    serve_until_signal(server, args.grace_s, on_stop)


if __name__ == "__main__":
    main()
