"""Demonstration episodes on disk, as `python -m services.env_server.collect_demos` writes them
and `vla-rl bc` reads them (the format is documented in that module's docstring): a directory
with `meta.json` and one `episode_<index:06d>.npz` per kept episode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "vla-rl-demos"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no executed_actions (they equal actions there)
CONTROL_MODE = "pd_ee_delta_pose"
EPISODE_KEYS = {
    "images": np.uint8,
    "actions": np.float32,
    "action_tokens": np.int64,
    "expert_actions": np.float32,
    "executed_actions": np.float32,
    "rewards": np.float32,
    "success": np.bool_,
    "terminated": np.bool_,
    "truncated": np.bool_,
}


def episode_file(index: int) -> str:
    return f"episode_{index:06d}.npz"


def load_episode(path: str | Path) -> dict[str, Any]:
    """One episode file -> dict of arrays (``images`` ...) and the scalars ``episode_success``
    (bool), ``seed`` (int), ``task_id`` and ``instruction`` (str). Checks keys and shapes."""
    with np.load(path, allow_pickle=False) as data:
        ep = {k: data[k] for k in data.files}
    if "executed_actions" not in ep and "actions" in ep:  # a version 1 episode: no noise
        ep["executed_actions"] = ep["actions"]
    missing = sorted(set(EPISODE_KEYS) | {"episode_success", "seed", "task_id", "instruction"})
    missing = [k for k in missing if k not in ep]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    t = len(ep["actions"])
    for k, dt in EPISODE_KEYS.items():
        if ep[k].dtype != dt or len(ep[k]) != t:
            raise ValueError(f"{path}: {k} has dtype {ep[k].dtype} and length {len(ep[k])}")
    ep["episode_success"] = bool(ep["episode_success"])
    ep["seed"] = int(ep["seed"])
    ep["task_id"] = str(ep["task_id"])
    ep["instruction"] = str(ep["instruction"])
    return ep


def load_demos(directory: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta.json, the written episodes in order) of a collect_demos output directory."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{directory}: not a {FORMAT} directory of version {READABLE_VERSIONS}")
    episodes = [load_episode(directory / e["file"]) for e in meta["episodes"] if e["file"]]
    return meta, episodes
