"""Success rates with Wilson intervals, and the learning-curve PNG from a real TensorBoard log."""

from __future__ import annotations

import json

import pytest

from vla_rl.report import plot_learning_curve, success_summary, wilson_interval


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0

    # The yardstick for evaluation sets: +-7 points at 95% takes about 200 episodes at p = 0.5.
    def half_width(k: int, n: int) -> float:
        low, high = wilson_interval(k, n)
        return (high - low) / 2

    assert half_width(100, 200) < 0.07 < half_width(90, 180)


def test_success_summary_per_task():
    episodes = [{"task_id": "A", "success_once": s} for s in (True, False, True, True)] + [
        {"task_id": "B", "success_once": False}
    ]
    summary = success_summary(episodes)
    assert summary["all"]["successes"] == 3 and summary["all"]["episodes"] == 5
    assert summary["tasks"]["A"]["success_rate"] == 0.75
    assert summary["tasks"]["B"]["ci95"] == list(wilson_interval(0, 1))


def test_learning_curve_png(tmp_path):
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tensorboard")) as writer:
        for step, value in ((1, 0.1), (2, 0.3), (3, 0.6)):
            writer.add_scalar("env/success_once", value, step)
    (tmp_path / "eval").mkdir()
    for step, wins in ((1, 1), (3, 3)):
        episodes = [{"task_id": "A", "success_once": i < wins} for i in range(4)]
        (tmp_path / "eval" / f"step_{step:05d}.json").write_text(json.dumps(episodes))
    out = plot_learning_curve(tmp_path, env_steps_per_iteration=16, title="test")
    image = Image.open(out)
    assert image.size == (840, 480) and out.name == "learning_curve.png"
    # Not a blank canvas: the plot draws lines and markers in colour.
    colours = image.convert("RGB").getcolors(maxcolors=100_000)
    assert len(colours) > 50


def test_a_resumed_run_keeps_one_value_per_step(tmp_path):
    """A run stopped after iteration 3 but checkpointed at 2 logs 3 again when it resumes: the
    curve keeps the resumed run's value, one point per step (was a vertical jump)."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from vla_rl.report import read_scalars

    with SummaryWriter(str(tmp_path)) as first:
        for step, value in ((1, 0.1), (2, 0.2), (3, 0.9)):
            first.add_scalar("env/success_once", value, step)
    time.sleep(1.1)  # a new event file name (it carries the time in seconds)
    with SummaryWriter(str(tmp_path)) as resumed:
        for step, value in ((3, 0.3), (4, 0.4)):
            resumed.add_scalar("env/success_once", value, step)
    points = read_scalars(tmp_path)["env/success_once"]
    assert [step for step, _ in points] == [1, 2, 3, 4]
    assert [value for _, value in points] == pytest.approx([0.1, 0.2, 0.3, 0.4])
