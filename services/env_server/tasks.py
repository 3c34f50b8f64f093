"""Registry of language-conditioned ManiSkill tasks: a ManiSkill env id and its instruction.

User tasks live in modules that register their gym env with ManiSkill's ``@register_env`` and call
``register_task`` here; ``import_task_modules`` imports them by import path (in every process that
builds envs, since a ``spawn``-ed env worker starts from a fresh interpreter).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

# What each task's success condition really asks (from the task docstrings in
# mani_skill/envs/tasks/tabletop). PickCube's goal sphere is hidden from the cameras, so the
# instruction cannot name where the goal is.
_TASK_INSTRUCTIONS: dict[str, str] = {
    "PickCube-v1": "pick up the red cube and move it to the goal position",
    "PushCube-v1": "push the blue cube forward onto the red and white target",
    "PullCube-v1": "pull the blue cube back onto the red and white target",
    "StackCube-v1": "stack the red cube on top of the green cube",
}


def register_task(task_id: str, instruction: str, *, override: bool = False) -> None:
    """Give ``task_id`` (a ManiSkill env id) its language instruction.

    Re-registering the same instruction is a no-op (modules may be imported more than once);
    a different one needs ``override=True``.
    """
    if not task_id or not isinstance(task_id, str):
        raise ValueError(f"task_id must be a non-empty string, got {task_id!r}")
    if not instruction or not isinstance(instruction, str):
        raise ValueError(f"instruction for task {task_id!r} must be a non-empty string")
    known = _TASK_INSTRUCTIONS.get(task_id)
    if known is not None and known != instruction and not override:
        raise ValueError(
            f"task {task_id!r} is already registered with instruction {known!r}; "
            "pass override=True to replace it"
        )
    _TASK_INSTRUCTIONS[task_id] = instruction


def registered_tasks() -> dict[str, str]:
    """A copy of the registry: task id -> instruction."""
    return dict(_TASK_INSTRUCTIONS)


BUILTIN_TASK_MODULES = ("services.env_server.ood_tasks",)
"""Task modules every env server may import: the OOD evaluation variants shipped here."""


def check_task_modules(requested: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise PermissionDenied unless every requested module is one the server was started with
    (--task-modules) or a built-in one: importing runs the module's code, so which modules exist
    is the server's configuration, never a client's choice."""
    from vla_rl.rpc.server import PermissionDenied

    permitted = set(allowed) | set(BUILTIN_TASK_MODULES)
    refused = [m for m in requested if m not in permitted]
    if refused:
        raise PermissionDenied(
            f"task module(s) {refused} are not enabled on this env server (start it with "
            f"--task-modules; enabled: {sorted(permitted)})"
        )


def import_task_modules(paths: Iterable[str]) -> None:
    """Import user task modules by import path (e.g. ``"my_pkg.tasks.put_on_plate"``)."""
    for path in paths:
        try:
            importlib.import_module(path)
        except ImportError as err:
            raise ValueError(f"cannot import task module {path!r}: {err}") from err


def _maniskill_registry() -> dict:
    import mani_skill.envs  # noqa: F401  (registers the built-in tasks)
    from mani_skill.utils.registration import REGISTERED_ENVS

    return REGISTERED_ENVS


def env_has_own_instruction(task_id: str) -> bool:
    """Whether the ManiSkill env gives its instruction per episode (``get_language_instruction``,
    as ManiSkill's Bridge digital-twin tasks and RLinf's PutOnPlate tasks do)."""
    spec = _maniskill_registry().get(task_id)
    return spec is not None and callable(getattr(spec.cls, "get_language_instruction", None))


def resolve_task(task_id: str) -> tuple[str | None, int | None]:
    """Check that ``task_id`` can be built and instructed; return (instruction, default max steps).

    The instruction is None when the env supplies its own per episode and the registry has none.
    Raises ValueError naming the task and listing the known ones.
    """
    registry = _maniskill_registry()
    instruction = _TASK_INSTRUCTIONS.get(task_id)
    spec = registry.get(task_id)
    if spec is None:
        if instruction is not None:
            raise ValueError(
                f"task {task_id!r} has an instruction but no ManiSkill env is registered under "
                "that id: add the module that defines it to task_modules"
            )
        raise ValueError(f"unknown task {task_id!r}; known tasks: {sorted(_known(registry))}")
    if instruction is None and not env_has_own_instruction(task_id):
        raise ValueError(
            f"task {task_id!r} is a ManiSkill env but has no language instruction: call "
            f"register_task({task_id!r}, '...') in a task module; known tasks: "
            f"{sorted(_known(registry))}"
        )
    return instruction, spec.max_episode_steps


def _known(registry: dict) -> list[str]:
    own = [t for t, spec in registry.items() if hasattr(spec.cls, "get_language_instruction")]
    return sorted(set(_TASK_INSTRUCTIONS) | set(own))


def check_task_lists(lists: dict[str, dict[str, list[str]]]) -> list[str]:
    """{config key: {"tasks": [...], "modules": [...]}} -> one "key: reason" line per task that
    cannot be built or instructed (empty when all can)."""
    errors = []
    for key, spec in lists.items():
        try:
            import_task_modules(spec.get("modules", []))
            for task_id in spec["tasks"]:
                resolve_task(task_id)
        except ValueError as e:
            errors.append(f"{key}: {e}")
    return errors


def main(argv: list[str] | None = None) -> None:
    """`python -m services.env_server.tasks '<json>'`: the launcher's check of a config's task
    lists before it starts anything (exit 2 with one line per bad list). A separate process so
    the launcher need not import ManiSkill, and runs beside its other start-up work."""
    import json
    import sys

    errors = check_task_lists(json.loads((argv or sys.argv[1:])[0]))
    if errors:
        print("\n".join(errors), file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
