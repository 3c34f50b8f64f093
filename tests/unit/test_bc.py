"""Behaviour cloning (`vla-rl bc`) fits demonstrations written in the collector's format and
writes a checkpoint that loads back with the same behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vla_rl.cli import BC_SIZES, main
from vla_rl.demos import FORMAT, VERSION, episode_file, load_demos
from vla_rl.models import PromptTokenizer, load_policy, load_tokenizer
from vla_rl.training.bc import load_steps, token_accuracy

INSTRUCTION = "push the blue cube forward onto the red and white target"


def write_demos(directory, episodes: int = 4, length: int = 5) -> None:
    """Episodes whose action depends on the image: a bright image -> high bins, dark -> low."""
    directory.mkdir(parents=True)
    meta = {"format": FORMAT, "version": VERSION, "task_id": "PushCube-v1", "episodes": []}
    for i in range(episodes):
        bright = i % 2 == 0
        images = np.full((length, 224, 224, 3), 220 if bright else 30, np.uint8)
        bins = np.full((length, 7), 200 if bright else 40)
        bins[:, 6] = 255  # the gripper token is the same for both
        tokens = (32000 - bins - 1).astype(np.int64)
        arrays = {
            "images": images,
            "actions": np.zeros((length, 7), np.float32),
            "action_tokens": tokens,
            "expert_actions": np.zeros((length, 7), np.float32),
            "rewards": np.zeros(length, np.float32),
            "success": np.zeros(length, bool),
            "terminated": np.zeros(length, bool),
            "truncated": np.zeros(length, bool),
        }
        np.savez_compressed(
            directory / episode_file(i), **arrays, episode_success=np.bool_(True),
            seed=np.int64(i), task_id=np.str_("PushCube-v1"), instruction=np.str_(INSTRUCTION),
        )  # fmt: skip
        meta["episodes"].append({"index": i, "file": episode_file(i)})
    (directory / "meta.json").write_text(json.dumps(meta))


def test_bc_fits_image_dependent_actions_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    demos = tmp_path / "demos"
    write_demos(demos)
    assert len(load_demos(demos)[1]) == 4
    out = tmp_path / "base"
    argv = ["bc", "--demos", str(demos), "--out", str(out), "--steps", "150", "--batch-size", "8",
            "--lr", "1e-3"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bc step   150/150" in printed and f"wrote {out}" in printed
    before = float(printed.split("token accuracy ")[1].split()[0])
    assert before < 0.2  # the random start reproduces almost none of the demonstrations
    policy = load_policy(out)
    prompts_of = PromptTokenizer(load_tokenizer(out))
    steps = load_steps([demos])
    assert len(steps) == 20 and steps.action_tokens.shape == (20, 7)
    assert token_accuracy(policy, prompts_of, steps) >= 0.95
    # Greedy decoding reproduces the image-dependent first token.
    out_tokens = policy.generate(
        policy.pixel_values(torch.from_numpy(steps.images[:2])),
        prompts_of(steps.instructions[:2]),
        greedy=True,
    ).action_tokens
    assert out_tokens[:, 0].tolist() == steps.action_tokens[:2, 0].tolist()


@pytest.mark.parametrize("chunk", [2, 3])
def test_oft_decisions_group_consecutive_steps(tmp_path, chunk):
    write_demos(tmp_path / "d", episodes=1, length=5)
    steps = load_steps([tmp_path / "d"], chunk=chunk)
    assert steps.action_tokens.shape == (-(-5 // chunk), 7 * chunk)
    last = steps.action_tokens[-1].reshape(chunk, 7)
    assert (last == last[0]).all()  # padded by repeating the final action


def test_bc_sizes_its_random_start(tmp_path, capsys):
    """`vla-rl bc --size small` clones into the one-GPU size (same class, towers and action
    tokens, wider and deeper); the CLI's choices are the model package's sizes; --size next to
    --init (which brings its own model) is refused rather than ignored."""
    from vla_rl.models import MODEL_SIZES

    demos = tmp_path / "demos"
    write_demos(demos, episodes=1, length=2)
    out = tmp_path / "small"
    argv = ["bc", "--demos", str(demos), "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--size", "small", "--model", "openvlaoft", "--chunk", "2"]  # fmt: skip
    assert main(argv) == 0
    policy = load_policy(out)
    params = sum(p.numel() for p in policy.parameters())
    assert 24e6 < params < 27e6, params
    assert policy.config.text_config["num_hidden_layers"] == 4
    assert policy.config.timm_overrides[0]["embed_dim"] == 192
    assert policy.config.action_chunk == 2
    assert set(BC_SIZES) == set(MODEL_SIZES)
    capsys.readouterr()
    again = ["bc", "--demos", str(demos), "--out", str(tmp_path / "x"), "--init", str(out),
             "--size", "small"]  # fmt: skip
    assert main(again) == 2
    assert "--size sizes the random start" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
