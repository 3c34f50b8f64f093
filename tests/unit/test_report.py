"""Success rates with Wilson intervals, paired before/after tests (McNemar), `vla-rl compare`,
and the learning-curve PNG from a real TensorBoard log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vla_rl.report import (
    SMOOTHING_WINDOW,
    mcnemar_exact_p,
    paired_outcomes,
    plot_learning_curve,
    success_summary,
    trailing_mean,
    wilson_interval,
)


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


def test_mcnemar_exact_p_known_values():
    # Binomial(76, 1/2) two-sided at 28: the +10-point PPO run of benchmarks/README.md.
    assert mcnemar_exact_p(48, 28) == pytest.approx(0.02863, abs=1e-5)
    assert mcnemar_exact_p(28, 48) == mcnemar_exact_p(48, 28)
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)  # all five flips one way
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0


def _episodes(outcomes: list[bool], task: str = "T", first_seed: int = 1000) -> list[dict]:
    return [
        {"task_id": task, "seed": first_seed + i, "success_once": ok}
        for i, ok in enumerate(outcomes)
    ]


def test_paired_outcomes_counts_flips_by_start():
    before = _episodes([True, True, False, False, False])
    after = list(reversed(_episodes([True, True, True, False, True])))  # order does not matter
    result = paired_outcomes(before, after)
    assert result["pairs"] == 5
    # before: 1000 T, 1001 T, 1002 F, 1003 F, 1004 F; after: 1000 T, 1001 T, 1002 T, 1003 F, 1004 T
    assert (result["gained"], result["lost"]) == (2, 0)
    assert result["p_value"] == pytest.approx(0.5)


def test_paired_outcomes_refuses_different_starts():
    with pytest.raises(ValueError, match="different starts"):
        paired_outcomes(_episodes([True] * 3), _episodes([True] * 3, first_seed=2000))
    with pytest.raises(ValueError, match="twice"):
        paired_outcomes(_episodes([True]) * 2, _episodes([True]) * 2)


def _table(label: str, outcomes: list[bool]) -> dict:
    episodes = _episodes(outcomes)
    return {"label": label, "rows": {"train": success_summary(episodes)["all"]},
            "episodes": {"train": episodes}}  # fmt: skip


def test_comparison_is_paired_where_intervals_overlap():
    """16 starts gained and 2 lost of 200 (30% -> 37%): the Wilson intervals overlap, the
    paired test sees the gain. 16 gained and 9 lost is not significant either way."""
    from vla_rl.experiment import comparison

    base = [i < 60 for i in range(200)]  # 30%
    better = [ok or 100 <= i < 116 for i, ok in enumerate(base)]
    better = [False if i < 2 else ok for i, ok in enumerate(better)]  # 16 gained, 2 lost: 37%
    rows, markdown = comparison(_table("base", base), _table("rl", better), "rl")
    b, a = rows["train"]["base"]["ci95"], rows["train"]["after"]["ci95"]
    assert a[0] < b[1]  # the intervals overlap...
    assert rows["train"]["paired"] == {"pairs": 200, "gained": 16, "lost": 2,
                                       "p_value": pytest.approx(mcnemar_exact_p(16, 2))}  # fmt: skip
    assert rows["train"]["verdict"] == "better"  # ...and the paired test still sees the gain
    assert "16 / 2 (p = 0.00131)" in markdown and "| better |" in markdown

    mixed = [ok if i >= 60 else i >= 9 for i, ok in enumerate(better)]  # 16 gained, 9 lost
    rows, _ = comparison(_table("base", base), _table("rl", mixed), "rl")
    assert (rows["train"]["paired"]["gained"], rows["train"]["paired"]["lost"]) == (16, 9)
    assert rows["train"]["verdict"] == "no significant change"

    # Without episodes (an older table) the verdict falls back to the intervals.
    no_episodes = {k: v for k, v in _table("rl", better).items() if k != "episodes"}
    rows, markdown = comparison(_table("base", base), no_episodes, "rl")
    assert "paired" not in rows["train"] and rows["train"]["verdict"] == "no significant change"


def test_vla_rl_compare_cli(tmp_path, capsys):
    from vla_rl.cli import main

    base, after = tmp_path / "base", tmp_path / "after.json"
    base.mkdir()
    (base / "eval_table.json").write_text(json.dumps(_table("base", [i < 4 for i in range(20)])))
    after.write_text(json.dumps(_table("adapter v3", [i < 12 for i in range(20)])))
    assert main(["compare", str(base), str(after), "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert "| split | base | adapter v3 |" in out and "8 / 0 (p = 0.00781)" in out
    assert json.loads((tmp_path / "rows.json").read_text())["rows"]["train"]["verdict"] == "better"

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_table("x", [True] * 20),
                                 "episodes": {"train": _episodes([True] * 20, first_seed=7)}}))  # fmt: skip
    assert main(["compare", str(base), str(other)]) == 2
    assert "different starts" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing"), str(after)]) == 2


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


def test_trailing_mean():
    assert trailing_mean([1.0, 0.0, 1.0, 0.0, 1.0], 2) == [1.0, 0.5, 0.5, 0.5, 0.5]
    assert trailing_mean([0.2, 0.4, 0.9], 10) == pytest.approx([0.2, 0.3, 0.5])
    assert trailing_mean([0.3, 0.7], 1) == [0.3, 0.7]
    assert trailing_mean([], 3) == []
    with pytest.raises(ValueError):
        trailing_mean([1.0], 0)


def test_a_curve_of_a_window_or_more_draws_its_trailing_mean(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    axes = []
    subplots = plt.subplots

    def keep_axes(*args, **kwargs):  # the figure plot_learning_curve draws, to read it back
        fig, ax = subplots(*args, **kwargs)
        axes.append(ax)
        return fig, ax

    monkeypatch.setattr(plt, "subplots", keep_axes)
    rates = [0.3, 0.6] * SMOOTHING_WINDOW
    for name, n in (("short", SMOOTHING_WINDOW - 1), ("long", len(rates))):
        with SummaryWriter(str(tmp_path / name / "tensorboard")) as writer:
            for step, value in enumerate(rates[:n], 1):
                writer.add_scalar("env/success_once", value, step)
        plot_learning_curve(tmp_path / name, env_steps_per_iteration=16, title=name)
    short, long = axes
    assert len(short.get_lines()) == 1  # too short to smooth: the raw rates alone
    raw, mean = long.get_lines()
    assert list(mean.get_ydata()) == pytest.approx(trailing_mean(rates, SMOOTHING_WINDOW))
    assert mean.get_ydata()[-1] == pytest.approx(0.45)
    assert "mean of the last" in long.get_legend().get_texts()[1].get_text()


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


def test_rl_gain_tests_each_table_against_the_base(tmp_path, capsys):
    """benchmarks/rl_gain.py rl compares its greedy and sampled tables with the base's of the same
    kind that phase base left in --out, and skips a kind the base lacks."""
    from benchmarks.rl_gain import against_base

    (tmp_path / "base_table").mkdir()
    (tmp_path / "base_table" / "eval_table.json").write_text(
        json.dumps(_table("base", [i < 5 for i in range(20)]))
    )
    greedy, sampled = _table("v10", [i < 11 for i in range(20)]), _table("v10", [True] * 20)
    found = against_base(tmp_path, greedy, sampled, "ppo")
    assert set(found) == {"greedy"}  # no base_sampled_table here
    assert found["greedy"]["train"]["paired"]["gained"] == 6
    assert "| split | base | ppo (greedy) |" in capsys.readouterr().out

    # Tables of other starts than the base's: the comparison is an error entry, not a crash
    # that would lose the run's result file.
    other = {**greedy, "episodes": {"train": _episodes([True] * 20, first_seed=7)}}
    found = against_base(tmp_path, other, None, "ppo")
    assert "different starts" in found["greedy"]["error"]


@pytest.mark.parametrize("select_by, chosen", [("greedy", 1600), ("sampled", 800)])
def test_rl_gain_picks_the_base_by_the_success_asked_for(tmp_path, monkeypatch, select_by, chosen):
    """--select-by sampled scores each BC candidate with actions sampled at --temperature and
    picks the one nearest --target-base by that score (a broad early candidate: good greedy,
    poor sampled); greedy, the default, by its argmax actions. vla-rl itself is not run here:
    its commands and tables are stood in for."""
    import benchmarks.rl_gain as rl_gain

    def fake_cli(*cmd, log=None, deadline_s=None):
        if cmd[0] == "bc":
            Path(cmd[cmd.index("--out") + 1]).mkdir(parents=True)
        return 0

    # (bc steps, temperature) -> success on the 8 selection episodes
    success = {(800, 0.0): 6, (800, 1.0): 3, (1600, 0.0): 3, (1600, 1.0): 6}
    asked = []

    def fake_table(args, ckpt, out, adapter, splits=None, episodes=None, temperature=0.0):
        steps = int(Path(ckpt).name.split("_")[-1]) if "bc_" in ckpt else 0
        asked.append((steps, temperature))
        ok = success.get((steps, temperature), 4)
        return _table("t", [i < ok for i in range(8)])

    monkeypatch.setattr(rl_gain, "run_cli", fake_cli)
    monkeypatch.setattr(rl_gain, "eval_table", fake_table)
    (tmp_path / "work" / "demos" / "PushCube-v1_noise0").mkdir(parents=True)
    (tmp_path / "work" / "demos" / "PushCube-v1_noise0" / "meta.json").write_text("{}")
    args = rl_gain.parse_args(
        ["base", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
         "--bc-steps", "800", "1600", "--target-base", "0.35", "--select-episodes", "8",
         "--select-by", select_by, "--sampled-splits", ""]
    )  # fmt: skip
    rl_gain.phase_base(args)
    temperature = 1.0 if select_by == "sampled" else 0.0
    assert asked[:2] == [(800, temperature), (1600, temperature)]
    result = json.loads((tmp_path / "out" / "rl_gain_base.json").read_text())
    assert result["chosen"]["bc_steps"] == chosen
