"""`vla-rl`: the project's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from vla_rl.training.demo import DemoConfig, evaluate_greedy, run_demo

    cfg = DemoConfig(
        algorithm=args.algorithm,
        decoding="parallel" if args.model == "openvlaoft" else "autoregressive",
        iterations=args.iterations,
        seed=args.seed,
        target_success=args.target_success,
    )
    print(
        f"vla-rl demo: {cfg.algorithm.upper()} on the colour-bandit task, tiny "
        f"{args.model} (random weights, CPU), {cfg.iterations} iterations x {cfg.batch_size}",
        flush=True,
    )
    result = run_demo(cfg, log=lambda line: print(line, flush=True))
    first = result.history[0]["env/success_once"]
    greedy = evaluate_greedy(result.policy, result.prompts_of)
    print(
        f"sampled success {first:.2f} at the start; greedy success {greedy:.2f} on 256 fresh "
        f"observations after {len(result.history)} iterations"
    )
    return 0


def _tiny_checkpoint(args: argparse.Namespace) -> int:
    from vla_rl.models import tiny_config
    from vla_rl.models.tiny import write_tiny_checkpoint

    decoding = "parallel" if args.model == "openvlaoft" else "autoregressive"
    cfg = tiny_config(decoding=decoding, action_chunk=args.chunk if decoding == "parallel" else 1)
    path = write_tiny_checkpoint(args.path, cfg, seed=args.seed)
    print(f"wrote a tiny random {args.model} checkpoint to {path}")
    return 0


SERVICES = {
    "env": "services.env_server.main",
    "rollout": "services.rollout_server.main",
    "learner": "services.learner.main",
}


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    """Replace this process with one service (the container image's command): its flags follow."""
    import os

    module = SERVICES[args.service]
    os.execv(sys.executable, [sys.executable, "-m", module, *rest])
    return 1  # not reached


def _health(args: argparse.Namespace) -> int:
    """0 when the gRPC server at the target reports SERVING (grpc.health.v1), else 1 with why:
    the image's HEALTHCHECK and compose's healthchecks."""
    import os

    from vla_rl.rpc.client import wait_for_health

    target = args.target or os.environ.get("VLA_RL_HEALTH_TARGET", "127.0.0.1:50051")
    try:
        wait_for_health(target, timeout_s=args.timeout)
    except TimeoutError as e:
        print(f"vla-rl health: {e}", file=sys.stderr)
        return 1
    return 0


def _attach(args: argparse.Namespace) -> int:
    from vla_rl.attach import attach
    from vla_rl.config import ConfigError

    try:
        return attach(args.config, args.overrides, args.env, args.learner, args.wait_s,
                      log=lambda line: print(line, flush=True))  # fmt: skip
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _compose(args: argparse.Namespace) -> int:
    from vla_rl.compose import write_or_check
    from vla_rl.launch import REPO_ROOT

    stale = write_or_check(REPO_ROOT, check=args.check)
    if args.check and stale:
        print("out of date (run `vla-rl compose`): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    print("up to date" if args.check else "wrote docker-compose.yml and deploy/compose/")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from vla_rl.experiment import run_experiment

    run_experiment(args)
    return 0


def _train(args: argparse.Namespace) -> int:
    from vla_rl.config import ConfigError, dump_yaml, load_config

    try:
        if args.print_config:
            print(dump_yaml(load_config(args.config, args.overrides)), end="")
            return 0
        from vla_rl.launch import train

        return train(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _config_help() -> str:
    from vla_rl.config import describe_config

    return "config keys (in the YAML file, or as key=value overrides):\n\n" + describe_config()


def _compare(args: argparse.Namespace) -> int:
    import json

    from vla_rl.experiment import comparison

    tables = []
    for path in (args.before, args.after):
        path = Path(path)
        if path.is_dir():
            path = path / "eval_table.json"
        try:
            tables.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            print(f"compare: cannot read {path}: {e}", file=sys.stderr)
            return 2
    label = args.label or tables[1].get("label") or "after"
    try:
        rows, table = comparison(tables[0], tables[1], label)
    except ValueError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vla_rl.config import ConfigError
    from vla_rl.eval_run import SPLITS, run

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        print(f"unknown split(s) {unknown}; known: {list(SPLITS)}", file=sys.stderr)
        return 2
    from vla_rl.launch import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # a `kill` stops its services as Ctrl-C does
            run(args.config, args.overrides, args.adapter, splits, args.episodes, args.out)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: every service stopped", file=sys.stderr)
        return 130
    return 0


def _collect_demos(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the env server's demo collector as its own process (services are started by module
    name; the library imports none of them)."""
    import subprocess

    from vla_rl.launch import REPO_ROOT

    cmd = [sys.executable, "-m", "services.env_server.collect_demos", *rest]
    return subprocess.call(cmd, cwd=REPO_ROOT)


# vla_rl.models.MODEL_SIZES, not imported here (it pulls in torch); a test keeps the two equal.
BC_SIZES = ("small", "tiny")


def _bc(args: argparse.Namespace) -> int:
    import tempfile

    from vla_rl.training.bc import BCConfig, run

    cfg = BCConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_episodes=args.max_episodes,
        seed=args.seed,
        device=args.device,
    )
    if args.init and args.size:
        print("vla-rl bc: --size sizes the random start; --init gives the model", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        init = args.init
        if init is None:  # a random OpenVLA-architecture model of --size
            from vla_rl.models import sized_config
            from vla_rl.models.tiny import write_tiny_checkpoint

            parallel = args.model == "openvlaoft"
            config = sized_config(
                args.size or "tiny",
                decoding="parallel" if parallel else "autoregressive",
                action_chunk=args.chunk if parallel else 1,
            )
            init = str(write_tiny_checkpoint(Path(tmp) / "init", config, seed=args.seed))
        run(args.demos, init, args.out, cfg, log=lambda line: print(line, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="PPO/GRPO on a built-in visual task with a tiny VLA (CPU)")
    demo.add_argument("--algorithm", choices=["ppo", "grpo"], default="ppo")
    demo.add_argument("--model", choices=["openvla", "openvlaoft"], default="openvlaoft")
    demo.add_argument("--iterations", type=int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--target-success", type=float, default=0.95,
                      help="stop once 3 iterations in a row reach this success rate")  # fmt: skip
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train",
        help="train through the real services (env servers, rollout, Redis, learner)",
        description="Train through the real services (env servers, rollout, Redis, learner).\n"
        "The config is a YAML file (default: the tiny CPU run) with dotted key=value overrides\n"
        "on top; a value may refer to another key as ${section.key}.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", default=None, help="YAML config (default: the tiny CPU run)")
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit without starting anything",
    )
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. runner.max_epochs=4")
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (and adapter) on the training and out-of-distribution splits",
        description="Start a rollout server and env servers, play env.eval's episodes on each "
        "split (train: env.eval.task_ids; vision / semantic / execution: their variants from "
        "services.env_server.ood_tasks) and write eval_table.md / .json with 95%% intervals.",
    )
    ev.add_argument("--config", default=None, help="YAML config (default: the tiny CPU run)")
    ev.add_argument("--adapter", default=None,
                    help="adapter.safetensors or a checkpoint directory (default: the base)")  # fmt: skip
    ev.add_argument("--splits", default="train,vision,semantic,execution")
    ev.add_argument("--episodes", type=int, default=None,
                    help="episodes per split (default env.eval.total_num_envs; about 200 "
                    "give a 95%% interval of +-7 points)")  # fmt: skip
    ev.add_argument("--out", default=None, help="output directory (default <run_dir>/eval_table)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. env.eval.seed=7")
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser(
        "compare",
        help="is the change between two evaluations significant? (paired by start, McNemar)",
        description="Compare two `vla-rl eval` tables of the same splits, seeds and episode "
        "count (e.g. the base and an RL adapter): per split the rates, how many starts flipped "
        "each way and McNemar's exact p-value (better / worse at the 5%% level).",
    )
    cmp.add_argument("before", help="eval_table.json (or its directory) of the base")
    cmp.add_argument("after", help="eval_table.json (or its directory) to compare with it")
    cmp.add_argument("--label", default=None, help="column name of the second (default its label)")
    cmp.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    cmp.set_defaults(func=_compare)

    bc = sub.add_parser(
        "bc", help="behaviour-clone demonstrations into an OpenVLA-layout checkpoint (warm start)"
    )
    bc.add_argument("--demos", nargs="+", required=True, help="collect-demos output directories")
    bc.add_argument("--out", required=True, help="checkpoint directory to write")
    bc.add_argument("--init", default=None,
                    help="checkpoint to start from (default: a tiny random one, see --model)")  # fmt: skip
    bc.add_argument("--model", choices=["openvla", "openvlaoft"], default="openvla")
    bc.add_argument("--chunk", type=int, default=8, help="OFT action chunk length")
    bc.add_argument("--size", choices=BC_SIZES, default=None,
                    help="the random start's size (default tiny; not with --init): tiny 4.4M "
                         "parameters for a CPU, small 25M for one GPU")  # fmt: skip
    bc.add_argument("--steps", type=int, default=300)
    bc.add_argument("--batch-size", type=int, default=16)
    bc.add_argument("--lr", type=float, default=3e-4)
    bc.add_argument("--max-episodes", type=int, default=None,
                    help="first N episodes of each directory (limit data for a moderate base)")  # fmt: skip
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: the first GPU when torch sees one")  # fmt: skip
    bc.set_defaults(func=_bc)

    demos = sub.add_parser(
        "collect-demos",
        add_help=False,
        help="scripted-expert demonstrations (npz episodes + meta.json); --help for its flags",
    )
    demos.set_defaults(func=_collect_demos, passthrough=True)

    exp = sub.add_parser(
        "experiment",
        help="does RL improve a warm-started VLA? base (cached) -> eval -> RL -> eval -> table",
        description=(
            "Scripted-expert demonstrations cloned into a base checkpoint (built once, cached), "
            "the base evaluated greedily, PPO or GRPO from it through the services, the trained "
            "adapter evaluated on the same seeds, a before/after table with 95%% intervals and "
            "the learning curve. The defaults are the laptop-scale run of `bash scripts/run.sh`."
        ),
    )
    from vla_rl.experiment import add_arguments

    add_arguments(exp)
    exp.set_defaults(func=_experiment)

    serve = sub.add_parser(
        "serve",
        add_help=False,  # --help goes to the service
        help="run one service in the foreground (env, rollout or learner); its flags follow",
        description="Runs `python -m services.<service>_server.main` (or services.learner.main) "
        "with the remaining arguments: `vla-rl serve rollout --checkpoint /models/openvla-7b`.",
    )
    serve.add_argument("service", choices=sorted(SERVICES))
    serve.set_defaults(func=_serve, passthrough=True)

    att = sub.add_parser(
        "attach",
        help="drive a run on services started elsewhere (compose, Kubernetes, by hand)",
        description="Starts collection on the given env servers at the learner's iteration, "
        "starts it again on an env server that comes back after a restart, and writes "
        "summary.json when the rollout (rollout.addresses) serves the final policy.",
    )
    att.add_argument("--config", default=None, help="the run's config (the learner's)")
    att.add_argument("--env", action="append", required=True, metavar="HOST:PORT",
                     help="an env server (repeat for each, in env.train order)")  # fmt: skip
    att.add_argument("--learner", required=True, metavar="HOST:PORT")
    att.add_argument("--wait-s", type=float, default=600.0,
                     help="how long a service may be unreachable before the run fails")  # fmt: skip
    att.add_argument("overrides", nargs="*")
    att.set_defaults(func=_attach)

    comp = sub.add_parser(
        "compose",
        help="write docker-compose.yml (profiles cpu and gpu) from the run configs",
        description="Generates docker-compose.yml and deploy/compose/<profile>/ (the resolved "
        "config and the Prometheus scrape config) with the service flags vla-rl train uses.",
    )
    comp.add_argument("--check", action="store_true",
                      help="only compare; exit 1 if the files are out of date")  # fmt: skip
    comp.set_defaults(func=_compose)

    health = sub.add_parser("health", help="exit 0 if a gRPC service reports SERVING")
    health.add_argument("target", nargs="?", default=None,
                        help="host:port (default: $VLA_RL_HEALTH_TARGET or 127.0.0.1:50051)")  # fmt: skip
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(func=_health)

    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random OpenVLA checkpoint")
    tiny.add_argument("path")
    tiny.add_argument("--model", choices=["openvla", "openvlaoft"], default="openvla")
    tiny.add_argument("--chunk", type=int, default=8, help="OFT action chunk length")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if getattr(args, "passthrough", False):
        return args.func(args, rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
