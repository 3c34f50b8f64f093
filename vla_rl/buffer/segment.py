"""A trajectory segment: one env's window of steps, the unit env servers write and learners read.

On the wire a segment is one safetensors blob: the arrays as tensors and the scalars and string
lists as a JSON string under the `vla_rl.segment` metadata key. Decoding checks everything, since
the bytes come from another process and a bad segment must be rejected, not trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import safetensors.numpy

FORMAT_VERSION = 1
_METADATA_KEY = "vla_rl.segment"
_HEADER_LIMIT = 64 * 1024 * 1024

# Tensor name -> dtype; shapes are checked in Segment.validate.
_ARRAY_DTYPES: dict[str, np.dtype] = {
    "images": np.dtype(np.uint8),
    "action_tokens": np.dtype(np.int64),
    "behaviour_logprobs": np.dtype(np.float32),
    "rewards": np.dtype(np.float32),
    "terminated": np.dtype(np.bool_),
    "truncated": np.dtype(np.bool_),
    "success": np.dtype(np.bool_),
    "bootstrap_image": np.dtype(np.uint8),
}
_METADATA_FIELDS = (
    "format",
    "segment_id",
    "run_id",
    "policy_version",
    "iteration",
    "group_id",
    "task_id",
    "instructions",
    "bootstrap_instruction",
    "episodes",
)
_EPISODE_KEYS = ("success_once", "episode_len", "return")


class SegmentDecodeError(ValueError):
    """The bytes are not a valid encoded segment; the message says what is wrong."""


@dataclass(eq=False)
class Segment:
    """One env's trajectory window of T steps with K action tokens per step.

    Step t pairs the observation before the step (`images[t]`, `instructions[t]`) with the action
    taken from it and what followed. The observation after the last step is kept apart
    (`bootstrap_image`) so the learner can bootstrap the value of an unfinished episode.
    """

    segment_id: str
    """Unique id, e.g. `<run>-<server>-<iteration>-<env>`; duplicates are dropped by it."""
    run_id: str
    policy_version: int
    """Adapter version of the policy that chose the actions."""
    iteration: int
    group_id: int
    """GRPO group shared by segments of the same prompt; -1 for none."""
    task_id: str
    images: np.ndarray
    """uint8 [T, H, W, 3]: observation before each step."""
    instructions: list[str]
    """Length T: the language instruction at each step."""
    action_tokens: np.ndarray
    """int64 [T, K]."""
    behaviour_logprobs: np.ndarray
    """float32 [T, K]: log-probs of `action_tokens` under the behaviour policy."""
    rewards: np.ndarray
    """float32 [T]."""
    terminated: np.ndarray
    """bool [T]."""
    truncated: np.ndarray
    """bool [T]."""
    success: np.ndarray
    """bool [T]."""
    bootstrap_image: np.ndarray
    """uint8 [H, W, 3]: observation after the last step."""
    bootstrap_instruction: str
    episodes: list[dict] = field(default_factory=list)
    """Finished episodes: `{"success_once": bool, "episode_len": int, "return": float}`."""

    @property
    def num_steps(self) -> int:
        """T, the number of steps."""
        return int(self.images.shape[0])

    def validate(self) -> None:
        """Raise ValueError naming the first field that is missing, mistyped or of a wrong shape."""
        for name in ("segment_id", "run_id", "task_id", "bootstrap_instruction"):
            _check_str(name, getattr(self, name))
        if not self.segment_id:
            raise ValueError("segment_id must not be empty")
        _check_int("policy_version", self.policy_version, minimum=0)
        _check_int("iteration", self.iteration, minimum=0)
        _check_int("group_id", self.group_id, minimum=-1)

        for name, dtype in _ARRAY_DTYPES.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray):
                raise ValueError(f"{name} must be a numpy array, got {type(value).__name__}")
            if value.dtype != dtype:
                raise ValueError(f"{name} must have dtype {dtype}, got {value.dtype}")

        images = self.images
        if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape) < 1:
            raise ValueError(f"images must have shape [T>=1, H, W, 3], got {list(images.shape)}")
        t, h, w, _ = images.shape
        if self.bootstrap_image.shape != (h, w, 3):
            raise ValueError(
                f"bootstrap_image must have shape {[h, w, 3]} like images, "
                f"got {list(self.bootstrap_image.shape)}"
            )
        tokens = self.action_tokens
        if tokens.ndim != 2 or tokens.shape[0] != t or tokens.shape[1] < 1:
            raise ValueError(
                f"action_tokens must have shape [T={t}, K>=1], got {list(tokens.shape)}"
            )
        if self.behaviour_logprobs.shape != tokens.shape:
            raise ValueError(
                f"behaviour_logprobs must have the shape of action_tokens {list(tokens.shape)}, "
                f"got {list(self.behaviour_logprobs.shape)}"
            )
        for name in ("rewards", "terminated", "truncated", "success"):
            shape = getattr(self, name).shape
            if shape != (t,):
                raise ValueError(f"{name} must have shape [T={t}], got {list(shape)}")
        for name in ("rewards", "behaviour_logprobs"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name} must be finite")
        if self.truncated[:-1].any():
            # A time-limit cut needs the episode's final observation to bootstrap from; a segment
            # keeps only one (bootstrap_image, after its last step), so collectors align the
            # time limit with the segment's end.
            step = int(np.flatnonzero(self.truncated[:-1])[0])
            raise ValueError(
                f"truncated at step {step} of {t}: a time-limit cut may only fall on a "
                "segment's last step (its bootstrap observation is the only final one kept)"
            )

        if not isinstance(self.instructions, list) or len(self.instructions) != t:
            raise ValueError(f"instructions must be a list of T={t} strings")
        for i, instruction in enumerate(self.instructions):
            _check_str(f"instructions[{i}]", instruction)

        if not isinstance(self.episodes, list):
            raise ValueError(f"episodes must be a list, got {type(self.episodes).__name__}")
        for i, episode in enumerate(self.episodes):
            _check_episode(i, episode)


def encode_segment(segment: Segment) -> bytes:
    """Validate `segment` and serialise it to one safetensors blob."""
    segment.validate()
    metadata = {
        "format": FORMAT_VERSION,
        "segment_id": segment.segment_id,
        "run_id": segment.run_id,
        "policy_version": int(segment.policy_version),
        "iteration": int(segment.iteration),
        "group_id": int(segment.group_id),
        "task_id": segment.task_id,
        "instructions": list(segment.instructions),
        "bootstrap_instruction": segment.bootstrap_instruction,
        "episodes": [
            {
                "success_once": bool(e["success_once"]),
                "episode_len": int(e["episode_len"]),
                "return": float(e["return"]),
            }
            for e in segment.episodes
        ],
    }
    tensors = {name: np.ascontiguousarray(getattr(segment, name)) for name in _ARRAY_DTYPES}
    return safetensors.numpy.save(tensors, metadata={_METADATA_KEY: json.dumps(metadata)})


def decode_segment(data: bytes) -> Segment:
    """Parse and validate an encoded segment; raise SegmentDecodeError on anything wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SegmentDecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    metadata = _parse_metadata(data)
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as e:  # safetensors raises its own error types for malformed payloads
        raise SegmentDecodeError(f"malformed safetensors payload: {e}") from e

    missing = sorted(set(_ARRAY_DTYPES) - set(tensors))
    unexpected = sorted(set(tensors) - set(_ARRAY_DTYPES))
    if missing or unexpected:
        raise SegmentDecodeError(f"tensors missing: {missing}, unexpected: {unexpected}")

    segment = Segment(
        **{name: metadata[name] for name in _METADATA_FIELDS if name != "format"},
        **tensors,
    )
    try:
        segment.validate()
    except ValueError as e:
        raise SegmentDecodeError(f"invalid segment: {e}") from e
    return segment


def _parse_metadata(data: bytes) -> dict:
    # The safetensors header is an 8-byte little-endian length followed by that much JSON;
    # the numpy loader does not return the metadata, so it is read here.
    if len(data) < 8:
        raise SegmentDecodeError(f"payload of {len(data)} bytes is too short for a header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, _HEADER_LIMIT):
        raise SegmentDecodeError(
            f"header length {header_len} exceeds the payload of {len(data)} bytes"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SegmentDecodeError(f"header is not JSON: {e}") from e
    file_metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(file_metadata, dict) or _METADATA_KEY not in file_metadata:
        raise SegmentDecodeError(f"header has no {_METADATA_KEY!r} metadata")
    try:
        metadata = json.loads(file_metadata[_METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as e:
        raise SegmentDecodeError(f"{_METADATA_KEY!r} metadata is not JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise SegmentDecodeError(f"{_METADATA_KEY!r} metadata must be a JSON object")
    missing = [k for k in _METADATA_FIELDS if k not in metadata]
    unexpected = sorted(set(metadata) - set(_METADATA_FIELDS))
    if missing or unexpected:
        raise SegmentDecodeError(f"metadata keys missing: {missing}, unexpected: {unexpected}")
    if not _is_int(metadata["format"]) or metadata["format"] != FORMAT_VERSION:
        raise SegmentDecodeError(
            f"segment format {metadata['format']!r} is not the supported {FORMAT_VERSION}"
        )
    return metadata


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: object, minimum: int) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_episode(i: int, episode: object) -> None:
    if not isinstance(episode, dict):
        raise ValueError(f"episodes[{i}] must be a dict, got {type(episode).__name__}")
    missing = [k for k in _EPISODE_KEYS if k not in episode]
    unexpected = sorted(set(episode) - set(_EPISODE_KEYS))
    if missing or unexpected:
        raise ValueError(f"episodes[{i}] keys missing: {missing}, unexpected: {unexpected}")
    if not isinstance(episode["success_once"], (bool, np.bool_)):
        raise ValueError(f"episodes[{i}]['success_once'] must be a bool")
    _check_int(f"episodes[{i}]['episode_len']", episode["episode_len"], minimum=1)
    value = episode["return"]
    if not (_is_int(value) or isinstance(value, (float, np.floating))) or not math.isfinite(value):
        raise ValueError(f"episodes[{i}]['return'] must be a finite number")
