"""Learning sanity on the CPU: the tiny VLA learns the colour-bandit task, whose success needs
both the image (which side the block is on) and the instruction (close or open the gripper), with
PPO and GRPO (OFT decoding) and with PPO and OpenVLA's autoregressive decoding. Seeded; measured
numbers are in the README."""

from __future__ import annotations

import pytest

from vla_rl.training.demo import DemoConfig, evaluate_greedy, run_demo

pytestmark = pytest.mark.slow


def _best_window(history: list[dict[str, float]], width: int = 10) -> float:
    """Best mean sampled success over `width` consecutive iterations."""
    s = [h["env/success_once"] for h in history]
    return max(sum(s[i : i + width]) / width for i in range(len(s) - width + 1))


def test_ppo_learns_the_image_and_text_task():
    result = run_demo(
        DemoConfig(algorithm="ppo", decoding="parallel", iterations=60, update_epochs=6),
        log=print,
    )
    first = sum(h["env/success_once"] for h in result.history[:10]) / 10
    assert first < 0.4  # chance is 25%: nothing is solved before training
    assert _best_window(result.history) >= 0.9
    greedy = evaluate_greedy(result.policy, result.prompts_of)
    print(f"PPO greedy success {greedy:.2f}")
    assert greedy >= 0.9


def test_grpo_learns_the_image_and_text_task():
    result = run_demo(
        DemoConfig(algorithm="grpo", decoding="parallel", iterations=60, group_size=4),
        log=print,
    )
    assert _best_window(result.history) >= 0.9
    greedy = evaluate_greedy(result.policy, result.prompts_of)
    print(f"GRPO greedy success {greedy:.2f}")
    assert greedy >= 0.9


def test_ppo_learns_the_task_with_autoregressive_decoding():
    """OpenVLA's decoding (the 7 action tokens one after another) with the demo's defaults for it:
    a tiny checkpoint whose action tokens start centred and whose action-id input embeddings are
    ordered, and 4 mini-batches per epoch. With the checkpoint before (every token tilted the
    same way for every input, 256 unrelated action-id embeddings) and 2 mini-batches, seed 0 was
    at 0.42 after 100 iterations (best 10-iteration mean 0.48): the x token stayed at
    P(x < 0) ~ 0.95 for both sides of the image."""
    result = run_demo(
        DemoConfig(
            algorithm="ppo",
            decoding="autoregressive",
            iterations=100,
            target_success=0.9,
            target_window=10,
        ),
        log=print,
    )
    first = sum(h["env/success_once"] for h in result.history[:10]) / 10
    assert first < 0.4  # chance is 25%
    best = _best_window(result.history)
    greedy = evaluate_greedy(result.policy, result.prompts_of)
    print(
        f"autoregressive PPO: best 10-iteration sampled success {best:.2f} within "
        f"{len(result.history)} iterations; greedy success {greedy:.2f}"
    )
    assert best >= 0.9
    assert greedy >= 0.9
