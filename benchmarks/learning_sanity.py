"""Learning-sanity experiments (issue 2): PPO / GRPO on the colour-bandit task with the tiny VLA,
a line per 10 iterations (sampled success, and its two parts), then greedy success on 256 fresh
observations. Seeded: a rerun on the same machine prints the same numbers. Every flag left out
takes the demo's default for the chosen decoding (`DemoConfig.for_decoding`).

    python benchmarks/learning_sanity.py --decoding parallel --lr 1e-3 --epochs 4 --iterations 80
    python benchmarks/learning_sanity.py --decoding autoregressive --iterations 100 --seed 1
    python benchmarks/learning_sanity.py --decoding autoregressive --iterations 100 \
        --no-centred-action-head --no-ordinal-action-embeddings     # the checkpoint before the fix
"""

from __future__ import annotations

import argparse
import time

from vla_rl.training.demo import DemoConfig, evaluate_greedy, run_demo

# flag -> DemoConfig field
FIELDS = {
    "algorithm": "algorithm",
    "decoding": "decoding",
    "lr": "lr",
    "value_lr": "value_lr",
    "epochs": "update_epochs",
    "mini_batches": "num_mini_batches",
    "batch": "batch_size",
    "group": "group_size",
    "rank": "lora_rank",
    "lora_targets": "lora_targets",
    "logprob_level": "logprob_level",
    "entropy_coef": "entropy_coef",
    "entropy_level": "entropy_level",
    "temperature": "temperature",
    "value_coef": "value_coef",
    "hidden_size": "hidden_size",
    "llm_layers": "llm_layers",
    "centred_action_head": "centred_action_head",
    "ordinal_action_embeddings": "ordinal_action_embeddings",
    "iterations": "iterations",
    "seed": "seed",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithm", choices=["ppo", "grpo"], default="ppo")
    p.add_argument("--decoding", choices=["autoregressive", "parallel"], default="parallel")
    p.add_argument("--lr", type=float)
    p.add_argument("--value-lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--mini-batches", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--rank", type=int)
    p.add_argument("--lora-targets", nargs="+", choices=["llm", "projector", "vision"])
    p.add_argument("--logprob-level", choices=["token", "action"])
    p.add_argument("--entropy-coef", type=float)
    p.add_argument("--entropy-level", choices=["token", "action"])
    p.add_argument("--temperature", type=float)
    p.add_argument("--value-coef", type=float)
    p.add_argument("--hidden-size", type=int, help="width of the tiny LLM")
    p.add_argument("--llm-layers", type=int, help="layers of the tiny LLM")
    p.add_argument(
        "--centred-action-head",
        action=argparse.BooleanOptionalAction,
        help="tiny checkpoint: centre the action tokens' initial distributions "
        "(default: on for autoregressive decoding)",
    )
    p.add_argument(
        "--ordinal-action-embeddings",
        action=argparse.BooleanOptionalAction,
        help="tiny checkpoint: ordered input embeddings of the action ids "
        "(default: on for autoregressive decoding)",
    )
    p.add_argument("--iterations", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> DemoConfig:
    given = {
        field: tuple(v) if isinstance(v, list) else v
        for flag, field in FIELDS.items()
        if (v := getattr(a, flag)) is not None
    }
    return DemoConfig.for_decoding(given.pop("decoding"), **given)


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_args(parse_args(argv))
    print(cfg, flush=True)
    t0, window, done = time.monotonic(), [], [0]

    def on_iteration(h: dict[str, float]) -> None:
        done[0] += 1
        window.append((h["env/success_once"], h["env/reach_ok"], h["env/gripper_ok"]))
        if done[0] % 10 == 0:
            s, r, g = (sum(x[i] for x in window) / len(window) for i in range(3))
            print(
                f"iter {done[0]:3d}  success {s:.2f}  reach {r:.2f}  gripper {g:.2f}  "
                f"approx_kl {h['actor/approx_kl']:.3f}  {time.monotonic() - t0:.0f}s",
                flush=True,
            )
            window.clear()

    result = run_demo(cfg, log=lambda _line: None, on_iteration=on_iteration)
    succ = [h["env/success_once"] for h in result.history]
    at = {n: sum(succ[n - 10 : n]) / 10 for n in (25, 50, 100) if n <= len(succ)}
    summary = "  ".join(f"@{n} {v:.2f}" for n, v in at.items())
    greedy = evaluate_greedy(result.policy, result.prompts_of)
    print(
        f"sampled success (mean of the 10 iterations up to) {summary}; "
        f"greedy success {greedy:.2f} on 256 fresh observations; {time.monotonic() - t0:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
