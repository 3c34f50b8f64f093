"""benchmarks/critic_features.py on a tiny OFT checkpoint and hand-made demonstrations whose
rewards depend on the image (bright: 1 per step, dark: 0): the returns-to-go are the discounted
sums, every input is fitted, and standardised inputs let the head fit the training returns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_rl.models import tiny_config
from vla_rl.models.tiny import write_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
critic_features = pytest.importorskip("critic_features")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bc import write_demos  # noqa: E402


def _rewarded_by_brightness(directory: Path) -> None:
    """test_bc's demonstrations (even episodes bright, odd dark), rewards 1 per bright step."""
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as f:
            arrays = dict(f)
        arrays["rewards"] = np.full(len(arrays["images"]), float(arrays["images"][0, 0, 0, 0] > 128),
                                    np.float32)  # fmt: skip
        np.savez_compressed(path, **arrays)


def test_returns_to_go_are_discounted_per_decision(tmp_path):
    write_demos(tmp_path / "d", episodes=2, length=5)
    _rewarded_by_brightness(tmp_path / "d")
    bright, dark = critic_features.decisions(str(tmp_path / "d"), chunk=2, gamma=0.5)
    # Steps 0, 2, 4 of rewards [1, 1, 1, 1, 1]: 1 + .5 + .25 + .125 + .0625, then 1.75, then 1.
    assert bright["returns"] == pytest.approx([1.9375, 1.75, 1.0])
    assert dark["returns"] == pytest.approx([0.0, 0.0, 0.0])
    assert len(bright["images"]) == 3


def test_every_input_is_fitted_and_scored_on_held_out_episodes(tmp_path):
    write_demos(tmp_path / "d", episodes=8, length=6)
    _rewarded_by_brightness(tmp_path / "d")
    ckpt = write_tiny_checkpoint(
        tmp_path / "oft", tiny_config(decoding="parallel", action_chunk=2), seed=0
    )
    out = tmp_path / "result.json"
    result = critic_features.main(
        ["--demos", str(tmp_path / "d"), "--checkpoint", str(ckpt), "--train-episodes", "6",
         "--steps", "200", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["fits"] == result["fits"]
    assert result["decisions"] == 8 * 3 and result["train_decisions"] == 6 * 3
    names = ("last_prompt_token", "action_slots_mean", "random_model_last_prompt")
    assert set(result["fits"]) == {n + s for n in names for s in ("", " (standardized)")}
    # Bright and dark images give different states, so standardised they separate the returns.
    # An episode's images are all alike, so the time left (a quarter of the returns' variance
    # here) cannot be read: brightness alone explains 0.756 of it.
    fitted = result["fits"]["last_prompt_token (standardized)"]
    assert fitted["ev_train"] == pytest.approx(0.756, abs=0.01)
    assert fitted["ev_test"] == pytest.approx(0.756, abs=0.01)
