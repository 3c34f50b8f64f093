"""The learner's checkpoint layout, in one place for the learner that writes it and the launcher
that reads where a run stands:

    <checkpoint_dir>/global_step_N/adapter.safetensors   LoRA + value head (versioned blob)
                                   optimizer.pt         optimizer state keyed by parameter name
                                   state.json           {"iteration": N, "policy_version": V}
    <checkpoint_dir>/latest                             the name of the newest complete one

A checkpoint directory appears only once complete (written under a temporary name, then
renamed), so a crash mid-save leaves the previous one as the latest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
PREFIX = "global_step_"


@dataclass(frozen=True)
class CheckpointState:
    """Where a checkpoint stands in the run."""

    iteration: int
    policy_version: int


def save_checkpoint(
    root: Path,
    state: CheckpointState,
    adapter_blob: bytes,
    optimizer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write global_step_<iteration>/ atomically, point `latest` at it, keep the newest `keep`."""
    root = Path(root)
    final = root / f"{PREFIX}{state.iteration}"
    tmp = root / f".tmp_{PREFIX}{state.iteration}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ADAPTER_FILE).write_bytes(adapter_blob)
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(
        json.dumps({"iteration": state.iteration, "policy_version": state.policy_version})
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / LATEST_FILE).write_text(final.name)
    steps = sorted(
        (p for p in root.glob(f"{PREFIX}*") if p.is_dir()),
        key=lambda p: int(p.name.rsplit("_", 1)[1]),
    )
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names, or None when the run has none yet."""
    latest = Path(root) / LATEST_FILE
    if not latest.is_file():
        return None
    return Path(root) / latest.read_text().strip()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either a global_step_N/ directory or a checkpoint root (its
    latest); ValueError naming the path when it is neither."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / STATE_FILE).is_file():
        return latest
    raise ValueError(
        f"{path} is not a checkpoint: expected {STATE_FILE} in it, or a '{LATEST_FILE}' file "
        f"naming a {PREFIX}N directory"
    )


def check_checkpoint(path: str | Path) -> None:
    """ValueError naming the file when a checkpoint directory cannot be read back whole: its
    state, its adapter (every tensor of the safetensors file) and its optimizer state."""
    path = Path(path)
    try:
        read_state(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / STATE_FILE}: {e}") from None
    try:
        from safetensors.torch import load as load_safetensors

        load_safetensors((path / ADAPTER_FILE).read_bytes())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path / ADAPTER_FILE}: {e}") from None
    try:
        torch.load(path / OPTIMIZER_FILE, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ValueError(f"{path / OPTIMIZER_FILE}: {e}") from None


def own_checkpoints(root: str | Path) -> list[Path]:
    """This run's checkpoint directories, newest first (`latest` first when it names one)."""
    root = Path(root)
    steps = sorted(
        (p for p in root.glob(f"{PREFIX}*") if p.is_dir()),
        key=lambda p: int(p.name.rsplit("_", 1)[1]),
        reverse=True,
    )
    latest = latest_checkpoint(root)
    if latest is not None and latest in steps:
        steps.remove(latest)
        steps.insert(0, latest)
    return steps


def resume_source(
    checkpoint_dir: str | Path, resume_dir: str | None, warn: Any = None
) -> Path | None:
    """The checkpoint a (re)started learner continues from: this run's newest intact one (a
    restart after a crash; an unreadable newer one is skipped, with `warn(message)` naming the
    file), else `resume_dir` (runner.resume_dir: continue another run), else None."""
    own = own_checkpoints(checkpoint_dir)
    for i, path in enumerate(own):
        try:
            check_checkpoint(path)
        except ValueError as e:
            if warn is not None:
                later = "the previous one" if i + 1 < len(own) else "none is left"
                warn(f"checkpoint {path.name} is unusable ({e}); falling back: {later}")
            continue
        return path
    if own:
        raise ValueError(f"no intact checkpoint under {checkpoint_dir}; see the messages above")
    return resolve_checkpoint(resume_dir) if resume_dir else None


def read_state(path: str | Path) -> CheckpointState:
    """iteration and policy_version of a checkpoint directory."""
    data = json.loads((Path(path) / STATE_FILE).read_text())
    return CheckpointState(int(data["iteration"]), int(data["policy_version"]))


def read_checkpoint(path: str | Path) -> tuple[CheckpointState, bytes, dict[str, Any]]:
    """(state, adapter blob, optimizer state) of a checkpoint directory."""
    path = Path(path)
    optimizer = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    return read_state(path), (path / ADAPTER_FILE).read_bytes(), optimizer
