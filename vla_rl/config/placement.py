"""`cluster.component_placement`: which GPUs (or the CPU) each component runs on.

Spec strings follow RLinf: "cpu", "all", "0", "0-3", "0,2", "0-1,4", and one spec may serve several
components at once through a combined key such as "actor,rollout,env". Components may share GPUs
(RLinf's collocated mode); a component the mapping leaves out runs on the CPU.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from .errors import ConfigError

COMPONENTS = ("env", "rollout", "actor")

# Parsed spec: "cpu", "all", or explicit GPU ranks in ascending order.
PlacementSpec = str | tuple[int, ...]


def parse_spec(spec: str | int, key: str) -> PlacementSpec:
    """Parse one device spec ("cpu", "all", "0", "0-3", "0,2", ...) without knowing the GPUs."""
    if isinstance(spec, bool) or not isinstance(spec, str | int):
        raise ConfigError(
            key, f"expected a device spec such as 'cpu', 'all', '0-3' or '0,2', got {spec!r}"
        )
    text = str(spec).strip().lower()
    if text in ("cpu", "all"):
        return text
    if ":" in text:
        raise ConfigError(
            key,
            f"{spec!r}: RLinf's 'resources:processes' form is not supported; give GPU ranks only "
            "(each component places its own processes on them)",
        )
    ranks: list[int] = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        try:
            low, high = (int(bounds[0]), int(bounds[-1])) if len(bounds) <= 2 else (0, -1)
        except ValueError:
            low, high = 0, -1
        if low < 0 or high < low:
            raise ConfigError(
                key, f"{spec!r}: {part.strip()!r} is not a GPU rank or an ascending range a-b"
            )
        ranks.extend(range(low, high + 1))
    if len(set(ranks)) != len(ranks):
        raise ConfigError(key, f"{spec!r} names a GPU more than once")
    return tuple(sorted(ranks))


def parse_placement(
    placement: Mapping[str, str | int], key: str = "cluster.component_placement"
) -> dict[str, PlacementSpec]:
    """Per-component parsed specs; combined keys are split, missing components get "cpu"."""
    parsed: dict[str, PlacementSpec] = {}
    for names, spec in placement.items():
        entry_key = f"{key}.{names}"
        if isinstance(spec, Mapping):
            raise ConfigError(
                entry_key, "RLinf's node_group/placement mapping is not supported; give a spec"
            )
        components = [name.strip() for name in str(names).split(",")]
        value = parse_spec(spec, entry_key)
        for component in components:
            if component not in COMPONENTS:
                close = difflib.get_close_matches(component, COMPONENTS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    entry_key,
                    f"unknown component {component!r}{hint}; components are {list(COMPONENTS)}",
                )
            if component in parsed:
                raise ConfigError(entry_key, f"component {component!r} is placed twice")
            parsed[component] = value
    for component in COMPONENTS:
        parsed.setdefault(component, "cpu")
    return parsed


def resolve_placement(
    placement: Mapping[str, str | int], num_gpus: int
) -> dict[str, list[int] | str]:
    """Map each component to its GPU ranks on a machine with `num_gpus` GPUs, or to "cpu".

    Raises ConfigError when a spec asks for a GPU the machine does not have.
    """
    resolved: dict[str, list[int] | str] = {}
    for component, spec in parse_placement(placement).items():
        key = f"cluster.component_placement.{component}"
        if spec == "cpu":
            resolved[component] = "cpu"
            continue
        if num_gpus <= 0:
            raise ConfigError(
                key, f"{component} is placed on GPUs ({_show(spec)}) but this machine has none"
            )
        ranks = list(range(num_gpus)) if spec == "all" else list(spec)
        missing = [rank for rank in ranks if rank >= num_gpus]
        if missing:
            raise ConfigError(
                key,
                f"{component} is placed on GPU(s) {missing} but this machine has {num_gpus} "
                f"(ranks 0-{num_gpus - 1})",
            )
        resolved[component] = ranks
    return resolved


def _show(spec: PlacementSpec) -> str:
    return spec if isinstance(spec, str) else ",".join(map(str, spec))
