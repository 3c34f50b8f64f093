"""What a run shows a user at the end: success rates with 95% confidence intervals and the
learning curve as a PNG (training `env/success_once` and evaluation success against env steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a success rate; (0, 1) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n successes,
    which small evaluation sets often give.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def success_summary(episodes: list[dict]) -> dict:
    """Success over episodes (dicts with 'success_once' and 'task_id'): overall and per task, each
    {'episodes', 'successes', 'success_rate', 'ci95': [low, high]}."""

    def summarise(group: list[dict]) -> dict:
        n = len(group)
        k = sum(bool(e["success_once"]) for e in group)
        low, high = wilson_interval(k, n)
        return {
            "episodes": n,
            "successes": k,
            "success_rate": k / n if n else 0.0,
            "ci95": [low, high],
        }

    tasks = sorted({e["task_id"] for e in episodes})
    return {
        "all": summarise(episodes),
        "tasks": {t: summarise([e for e in episodes if e["task_id"] == t]) for t in tasks},
    }


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: under "no change", each start whose outcome flipped is
    as likely to have flipped either way, so min(gained, lost) is a Binomial(gained + lost, 1/2)
    tail. 1.0 when nothing flipped."""
    flipped = gained + lost
    if flipped == 0:
        return 1.0
    tail = sum(math.comb(flipped, i) for i in range(min(gained, lost) + 1)) / 2**flipped
    return min(1.0, 2 * tail)


def paired_outcomes(before: list[dict], after: list[dict]) -> dict:
    """Episodes of two evaluations played from the same starts, paired by (task_id, seed):
    how many starts the second gained (failed before, succeeded after) and lost, and McNemar's
    exact p-value. Paired by start, the test sees a change that two overlapping Wilson intervals
    hide (each start's difficulty cancels). Raises ValueError if the starts differ."""

    def outcomes(episodes: list[dict]) -> dict[tuple[str, int], bool]:
        out = {(e["task_id"], int(e["seed"])): bool(e["success_once"]) for e in episodes}
        if len(out) != len(episodes):
            raise ValueError("an evaluation played the same (task, seed) start twice")
        return out

    b, a = outcomes(before), outcomes(after)
    if b.keys() != a.keys():
        raise ValueError(
            f"the evaluations played different starts ({len(b.keys() - a.keys())} only in the "
            f"first, {len(a.keys() - b.keys())} only in the second): run both with the same "
            "seeds and episode count"
        )
    gained = sum(a[k] and not b[k] for k in b)
    lost = sum(b[k] and not a[k] for k in b)
    return {"pairs": len(b), "gained": gained, "lost": lost,
            "p_value": mcnemar_exact_p(gained, lost)}  # fmt: skip


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard directory: tag -> [(step, value)] sorted by step, one value
    per step: the latest written (a resumed run logs again the iterations after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    latest = {
        tag: {e.step: e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)}
        for tag in acc.Tags()["scalars"]
    }
    return {tag: sorted(by_step.items()) for tag, by_step in latest.items()}


SMOOTHING_WINDOW = 10  # iterations; one iteration's success is a few dozen episodes' mean


def trailing_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the up to `window - 1` before it (a trailing moving average:
    the curve at an iteration uses nothing the run had not seen yet)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_learning_curve(run_dir: Path, env_steps_per_iteration: int, title: str = "") -> Path:
    """Write <run_dir>/learning_curve.png: training success_once per iteration and every
    evaluation's success rate with its 95% interval (from eval/step_N.json), against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir / "tensorboard")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    train = scalars.get("env/success_once", [])
    if train:
        steps = [s * env_steps_per_iteration for s, _ in train]
        rates = [v for _, v in train]
        smooth = len(train) >= SMOOTHING_WINDOW
        ax.plot(steps, rates, "-o", markersize=3, alpha=0.35 if smooth else 1.0,
                label="training episodes (env/success_once)")  # fmt: skip
        if smooth:  # the per-iteration rate swings by +-0.1 at 32 episodes; its trend is the story
            ax.plot(steps, trailing_mean(rates, SMOOTHING_WINDOW), "-", color="C0", linewidth=2.2,
                    label=f"training, mean of the last {SMOOTHING_WINDOW} iterations")  # fmt: skip
    evaluations = sorted((run_dir / "eval").glob("step_*.json"))
    if evaluations:
        xs, ys, lows, highs = [], [], [], []
        for path in evaluations:
            step = int(path.stem.split("_")[1])
            summary = success_summary(json.loads(path.read_text()))["all"]
            xs.append(step * env_steps_per_iteration)
            ys.append(summary["success_rate"])
            lows.append(summary["success_rate"] - summary["ci95"][0])
            highs.append(summary["ci95"][1] - summary["success_rate"])
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="s", capsize=4, label="evaluation (95% CI)")
    ax.set_xlabel("env steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or run_dir.name)
    if train or evaluations:
        ax.legend(loc="best")
    out = run_dir / "learning_curve.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
