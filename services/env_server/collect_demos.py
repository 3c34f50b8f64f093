"""Collect scripted-expert demonstrations in ManiSkill, on the env server's side.

    python -m services.env_server.collect_demos --task PickCube-v1 --episodes 100 --seed 0 \\
        --out demos/pickcube [--max-episode-steps 50] [--image-size 224] [--keep-failures] \\
        [--action-noise 0.3]

The task's scripted expert (``experts.py``, acting on privileged simulator state) drives one env
built by the env pool's own ``make_single_env``: CPU physics, ``pd_ee_delta_pose``, the
``base_camera`` RGB at ``--image-size`` and the instruction the pool gives the policy, so the
recorded observations are the ones the policy sees during RL. Every expert action is quantised
as the policy's would be decoded (``ActionQuantizer``: OpenVLA's 256-bin action tokenizer, bin
centres, un-normalised with ``--checkpoint``'s norm_stats or, by default, the tiny checkpoints'
``default_norm_stats``) and the quantised action is what the env executes and what is recorded.
Episode ``i`` is reset with seed ``S + i`` (``--seed S``); ``--episodes N`` episodes are run and,
unless ``--keep-failures``, only the successful ones are written. The run's success rate, episode
lengths and speed are printed and stored in ``meta.json``.

``--action-noise SIGMA`` (DART-style noise injection): the env executes the expert's action plus
Gaussian noise of standard deviation SIGMA on the six arm dimensions (the controller's [-1, 1]
units; the gripper is not perturbed), while the label recorded for each state stays the expert's
clean action there. The demonstrations then visit states off the expert's path and show how to
come back from them, so a policy cloned from them recovers from its own mistakes instead of
failing for good on some starts (which leaves RL little to learn from: benchmarks/README.md).

Format of ``--out DIR`` (version 2; version 1 had no ``executed_actions`` and no noise)
-----------------------------------
``meta.json``: ``format`` ("vla-rl-demos"), ``version`` (1), ``task_id``, ``instruction``,
``control_mode``, ``camera``, ``image_size``, ``max_episode_steps``, ``reward_mode``,
``seed`` (S), ``keep_failures``, ``action_noise`` (SIGMA, 0 without noise), ``action_tokenizer`` ({``vocab_end``, ``n_bins``}),
``norm_stats`` and ``unnorm_key`` (the quantisation used), the counts (``episodes_run``,
``successes``, ``episodes_written``, ``success_rate``, ``mean_episode_len``,
``mean_success_len``, ``total_steps``), ``wall_s``, ``episodes_per_min``, ``env_steps_per_s``,
``maniskill_version`` and ``episodes``: one entry per episode run, in order, with ``index``,
``seed``, ``length``, ``success``, ``return`` and ``file`` (null when the episode was dropped).
It is rewritten after every episode, so an interrupted run leaves a valid index.

``episode_<index:06d>.npz`` (``numpy.load``, no pickle needed), T = the episode's length:

- ``images``         uint8 [T, H, W, 3]: the observation before each action (RGB, ``camera``)
- ``actions``        float32 [T, 7]: the quantised expert actions, the labels (xyz, rotation,
  gripper); without noise, also what was executed
- ``action_tokens``  int64 [T, 7]: their OpenVLA token ids (vocab_end - n_bins .. vocab_end - 1;
  the bin index of an id is ``vocab_end - id - 1``), as the rollout server sends them
- ``expert_actions`` float32 [T, 7]: the expert's actions before quantisation
- ``executed_actions`` float32 [T, 7]: the quantised actions the env executed (noise included)
- ``rewards``        float32 [T]: the env's reward for each step (``reward_mode``)
- ``success``        bool [T]: ManiSkill's ``info["success"]`` after each step
- ``terminated``, ``truncated`` bool [T]: how the episode ended (True only at its last step)
- ``episode_success`` bool []: success at the last step
- ``seed`` int64 [], ``task_id`` and ``instruction`` str []

Why this layout and not HDF5 or LeRobot: h5py is not a dependency of this project and LeRobot's
layout needs pyarrow (parquet) and a video codec (and stores frames lossily as MP4); one
compressed ``.npz`` per episode needs only numpy, keeps frames exact, and loads one episode
without reading the others. Converting to either is a short script over ``load_demos``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vla_rl.demos import (
    CONTROL_MODE,
    EPISODE_KEYS,
    FORMAT,
    VERSION,
    episode_file,
)

from .env_pool import EnvPoolConfig, make_single_env
from .experts import ActionQuantizer, expert_for, read_state
from .tasks import resolve_task

_MAX_STEPS_GUARD = 100_000


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def collect_demos(
    task_id: str,
    episodes: int,
    seed: int,
    out: str | Path,
    *,
    max_episode_steps: int | None = None,
    image_size: int = 224,
    camera: str = "base_camera",
    reward_mode: str = "normalized_dense",
    keep_failures: bool = False,
    norm_stats: dict[str, Any] | None = None,
    unnorm_key: str | None = None,
    overwrite: bool = False,
    action_noise: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``episodes`` expert episodes (seeds seed .. seed + episodes - 1), write them to ``out``
    as the module docstring describes, and return the contents of meta.json."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not 0.0 <= action_noise <= 1.0:
        raise ValueError(f"action_noise must be in [0, 1] (controller units), got {action_noise}")
    expert = expert_for(task_id)  # fails before any env is built for a task without an expert
    out = Path(out)
    if (out / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'meta.json'} exists; pass overwrite=True (--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in out.glob("episode_*.npz"):
            old.unlink()
    quantizer = ActionQuantizer(norm_stats=norm_stats, unnorm_key=unnorm_key)
    key = unnorm_key if unnorm_key is not None else next(iter(quantizer.norm_stats))
    config = EnvPoolConfig(
        task_ids=[task_id],
        num_envs=1,
        control_mode=CONTROL_MODE,
        image_size=image_size,
        camera=camera,
        max_episode_steps=max_episode_steps,
        reward_mode=reward_mode,
        seed=seed,
    )
    import mani_skill

    t_build = time.monotonic()
    env = make_single_env(config, task_id)
    try:
        if env.action_dim != 7 or env.info["control_mode"] != CONTROL_MODE:
            raise ValueError(f"{task_id}: expected 7-d {CONTROL_MODE} actions, got {env.info}")
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "task_id": task_id,
            "instruction": None,
            "control_mode": CONTROL_MODE,
            "camera": camera,
            "image_size": image_size,
            "max_episode_steps": (
                max_episode_steps if max_episode_steps is not None else resolve_task(task_id)[1]
            ),
            "reward_mode": reward_mode,
            "seed": seed,
            "keep_failures": keep_failures,
            "action_noise": action_noise,
            "action_tokenizer": {
                "vocab_end": quantizer.tokenizer.vocab_end,
                "n_bins": quantizer.tokenizer.n_bins,
            },
            "norm_stats": quantizer.norm_stats,
            "unnorm_key": key,
            "maniskill_version": getattr(mani_skill, "__version__", "unknown"),
            "episodes": [],
        }
        build_s = time.monotonic() - t_build
        log(f"{task_id}: env built in {build_s:.1f} s; {episodes} episodes from seed {seed}")
        t0 = time.monotonic()
        noise_rng = np.random.default_rng(seed)
        seeds = [seed + i for i in range(episodes)]
        image, instruction = env.reset(seeds[0])
        for i, ep_seed in enumerate(seeds):
            rec: dict[str, list] = {k: [] for k in EPISODE_KEYS}
            ep_instruction = instruction
            while True:
                raw = expert(read_state(env.env, task_id))
                label, tokens = quantizer(raw)
                executed = label
                if action_noise > 0:
                    executed, _ = quantizer(perturb(raw, action_noise, noise_rng))
                rec["images"].append(image)
                rec["actions"].append(label)
                rec["action_tokens"].append(tokens)
                rec["expert_actions"].append(raw)
                rec["executed_actions"].append(executed)
                # The auto-reset at the end of the episode is the next episode's reset.
                next_seed = seeds[i + 1] if i + 1 < len(seeds) else ep_seed
                step = env.step(executed, next_seed)
                rec["rewards"].append(step["reward"])
                rec["success"].append(step["success"])
                rec["terminated"].append(step["terminated"])
                rec["truncated"].append(step["truncated"])
                image, instruction = step["image"], step["instruction"]
                if step["episode"] is not None:
                    break
                if len(rec["actions"]) > _MAX_STEPS_GUARD:
                    raise RuntimeError(f"{task_id} seed {ep_seed}: no time limit ended the episode")
            arrays = {k: np.asarray(rec[k], dtype=dt) for k, dt in EPISODE_KEYS.items()}
            ok = bool(arrays["success"][-1])
            length = len(arrays["actions"])
            entry = {
                "index": i,
                "seed": ep_seed,
                "length": length,
                "success": ok,
                "return": float(arrays["rewards"].sum()),
                "file": None,
            }
            if ok or keep_failures:
                entry["file"] = episode_file(i)
                np.savez_compressed(
                    out / entry["file"],
                    **arrays,
                    episode_success=np.asarray(ok),
                    seed=np.asarray(ep_seed, dtype=np.int64),
                    task_id=np.asarray(task_id),
                    instruction=np.asarray(ep_instruction),
                )
            meta["instruction"] = meta["instruction"] or ep_instruction
            meta["episodes"].append(entry)
            _summarise(meta, time.monotonic() - t0)
            _write_json(out / "meta.json", meta)
            log(
                f"episode {i + 1}/{episodes} seed {ep_seed}: "
                f"{'success' if ok else 'failure'} in {length} steps"
                f"{'' if entry['file'] else ' (dropped)'}"
            )
    finally:
        env.close()
    log(
        f"{task_id}: success {meta['successes']}/{meta['episodes_run']} "
        f"({meta['success_rate']:.2f}), mean length {meta['mean_episode_len']:.1f} "
        f"(successes {meta['mean_success_len']:.1f}), {meta['episodes_written']} written to {out}; "
        f"{meta['episodes_per_min']:.1f} episodes/min, {meta['env_steps_per_s']:.1f} steps/s "
        f"(+{build_s:.1f} s env build)"
    )
    return meta


def perturb(action: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The expert's 7-d action with N(0, sigma) added to the six arm dimensions, clipped to the
    controller's [-1, 1]; the gripper (last) is left as the expert set it."""
    noisy = np.array(action, dtype=np.float32, copy=True)
    noisy[:6] = np.clip(noisy[:6] + rng.normal(0.0, sigma, size=6), -1.0, 1.0)
    return noisy


def _summarise(meta: dict[str, Any], wall_s: float) -> None:
    eps = meta["episodes"]
    lengths = [e["length"] for e in eps]
    ok_lengths = [e["length"] for e in eps if e["success"]]
    meta.update(
        episodes_run=len(eps),
        successes=len(ok_lengths),
        episodes_written=sum(e["file"] is not None for e in eps),
        success_rate=len(ok_lengths) / len(eps),
        mean_episode_len=float(np.mean(lengths)),
        mean_success_len=float(np.mean(ok_lengths)) if ok_lengths else 0.0,
        total_steps=int(sum(lengths)),
        wall_s=round(wall_s, 3),
        episodes_per_min=60.0 * len(eps) / wall_s if wall_s > 0 else 0.0,
        env_steps_per_s=sum(lengths) / wall_s if wall_s > 0 else 0.0,
    )


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m services.env_server.collect_demos",
        description="Collect scripted-expert demonstrations (quantised as the policy's actions).",
    )
    p.add_argument("--task", required=True, help="PickCube-v1, PushCube-v1 or StackCube-v1")
    p.add_argument("--episodes", type=int, required=True, help="episodes to run")
    p.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-episode-steps", type=int, default=None, help="default: the task's")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--camera", default="base_camera")
    p.add_argument("--reward-mode", default="normalized_dense")
    p.add_argument("--keep-failures", action="store_true", help="also write failed episodes")
    p.add_argument(
        "--action-noise",
        type=float,
        default=0.0,
        help="std of Gaussian noise on the executed arm actions (labels stay the expert's)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="quantise with this checkpoint's norm_stats (default: default_norm_stats())",
    )
    p.add_argument("--unnorm-key", default=None, help="norm_stats key of --checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing collection")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    norm_stats = None
    if args.checkpoint is not None:
        from vla_rl.models import read_config

        norm_stats = read_config(args.checkpoint).norm_stats
    last: list[str] = []

    def log(line: str) -> None:
        last[:] = [line]
        if not args.quiet:
            print(line, flush=True)

    meta = collect_demos(
        args.task,
        args.episodes,
        args.seed,
        args.out,
        max_episode_steps=args.max_episode_steps,
        image_size=args.image_size,
        camera=args.camera,
        reward_mode=args.reward_mode,
        keep_failures=args.keep_failures,
        norm_stats=norm_stats,
        unnorm_key=args.unnorm_key,
        overwrite=args.overwrite,
        action_noise=args.action_noise,
        log=log,
    )
    if args.quiet:
        print(last[0], flush=True)
    return meta


if __name__ == "__main__":
    main(sys.argv[1:])
