"""Build a `TrainConfig` from a YAML file plus dotted overrides, and write the resolved one back.

Every key is checked against the dataclasses before anything is built: an unknown key anywhere is
one error naming its full dotted path (with a close match when there is one), a value of the
wrong type names the key and the type it should have.

Values may refer to other keys, OmegaConf-style: a string `${section.key}` is replaced by the
value at that absolute dotted path, once `defaults:` are composed, overrides applied and RLinf
spellings rewritten, and before the types are checked. A value that is exactly `${a.b}` takes
the referenced value with its type (a number, a list, a whole section); inside a longer string
the value is put in as text (`${runner.logger.log_path}/ckpt`). References may chain; a key that
is not written anywhere resolves to its field's default, or, in a section left out as a whole,
to that section's default (env.eval's own seed); values `__post_init__` derives later (a null
such as actor.checkpoint_dir filled in) are not seen. A cycle, or a reference to a key that does
not exist, is an error naming the key that holds it. `\\${...}` keeps the text literally
(without the backslash), and `dump_yaml` writes such text that way.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .docs import field_default
from .errors import ConfigError
from .schema import TrainConfig


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-5 as a float (YAML 1.1 insists on 1.0e-5)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

# RLinf spellings of our keys: alias -> canonical dotted key. (RLinf's actor.model.is_lora is
# accepted when true and dropped: LoRA is always on here.)
KEY_ALIASES = {
    "env.train.simulator_type": "env.train.env_type",
    "env.eval.simulator_type": "env.eval.env_type",
    "rollout.backend": "rollout.engine",
    "rollout.generation_backend": "rollout.engine",
    "actor.model.lora_rank": "actor.lora.rank",
    "actor.model.lora_path": "actor.lora.path",
    "algorithm.staleness_threshold": "algorithm.max_staleness",
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config of `path` (None: the tiny CPU default) with `key.sub=value` overrides applied.

    Override values are YAML scalars or flow collections: `actor.optim.lr=1e-5`,
    `env.train.task_ids=[PickCube-v1,PushCube-v1]`, `actor.model.model_path=null`.
    """
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    overridden: list[str] = []
    for item in overrides or []:
        key, value = parse_override(item)
        _assign(raw, key, value)
        overridden.append(key)
    _apply_aliases(raw)
    unknown = _unknown_keys(TrainConfig, raw, "")
    if unknown:
        raise _unknown_key_error(unknown, overridden, path)
    raw = _Interpolation(raw).resolved()
    unknown = _unknown_keys(TrainConfig, raw, "")  # a whole section may have been put elsewhere
    if unknown:
        raise _unknown_key_error(unknown, overridden, path)
    return _build(TrainConfig, raw, "")


def tiny_cpu_default() -> TrainConfig:
    """The embedded default: tiny random OpenVLA, CPU only, PickCube-v1, 2 envs, 2 iterations."""
    return TrainConfig()


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict of the config (what `dump_yaml` writes)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig, path: str | Path | None = None) -> str:
    """The resolved config as YAML (loadable by `load_config`); also written to `path` if given."""
    text = "# Resolved vla-rl config.\n" + yaml.safe_dump(
        _escape_references(to_dict(cfg)), sort_keys=False, default_flow_style=False
    )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b.c=value` into the dotted key and the YAML-parsed value."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"override {item!r} must look like section.key=value")
    try:
        value = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse override value {text!r}: {err}") from None
    return key, value


# ------------------------------------------------------------------------------------ YAML files


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, composing its `defaults:` list first (RLinf/Hydra-like, simple form).

    Each defaults entry is a file relative to this one, optionally placed at a dotted key:
    `env/pick_cube@env.train`; `_self_` marks where this file's own keys go (last by default).
    """
    path = path.resolve()
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    if path in chain:
        raise ConfigError("defaults", f"{path} includes itself through {[str(p) for p in chain]}")
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError("", f"cannot parse {path}: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping of sections")
    defaults = data.pop("defaults", [])
    if not isinstance(defaults, list):
        raise ConfigError("defaults", f"{path}: expected a list of files")
    merged: dict[str, Any] = {}
    self_merged = False
    for entry in defaults:
        if entry == "_self_":
            merged, self_merged = _deep_merge(merged, data), True
            continue
        if not isinstance(entry, str):
            raise ConfigError(
                "defaults", f"{path}: entries are 'file' or 'file@key', got {entry!r}"
            )
        name, _, target = entry.partition("@")
        file = path.parent / name
        if not file.suffix:
            file = file.with_suffix(".yaml")
        sub: Any = _read_yaml(file, (*chain, path))
        for part in reversed(target.split(".") if target else []):
            sub = {part: sub}
        merged = _deep_merge(merged, sub)
    return merged if self_merged else _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- raw dict editing


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError(section, f"is a value, not a section, so {dotted} cannot be set")
        node = child
    node[parts[-1]] = value


def _pop(raw: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    section, last = _section(raw, dotted), dotted.rsplit(".", 1)[-1]
    return (True, section.pop(last)) if last in section else (False, None)


def _apply_aliases(raw: dict[str, Any]) -> None:
    """Rewrite RLinf spellings to ours in place (values are checked later, under our names)."""
    found, is_lora = _pop(raw, "actor.model.is_lora")
    if found and is_lora is not True:
        raise ConfigError(
            "actor.model.is_lora",
            "vla-rl always trains LoRA adapters (they are what the rollout servers load); "
            "remove the key or set it true",
        )
    for alias, canonical in KEY_ALIASES.items():
        found, value = _pop(raw, alias)
        if not found:
            continue
        if canonical.rsplit(".", 1)[-1] in _section(raw, canonical):
            raise ConfigError(alias, f"is RLinf's name for {canonical}; give only one of them")
        _assign(raw, canonical, value)


def _section(raw: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The dict that holds the last key of `dotted` ({} when a parent is missing)."""
    node: Any = raw
    for part in dotted.split(".")[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


# ------------------------------------------------------------------------------ interpolation


# `${a.b.c}`, or `\${a.b.c}` (kept literally, without the backslash).
_REFERENCE = re.compile(r"(\\?)\$\{([^${}]*)\}")


class _Interpolation:
    """Resolves every `${dotted.key}` in a raw config dict (the dict itself is left as it is)."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.done: dict[str, Any] = {}  # dotted key -> its resolved value
        self.active: list[str] = []  # keys being resolved, innermost last (to report cycles)

    def resolved(self) -> dict[str, Any]:
        return self._resolve(self.raw, "")

    def _resolve(self, value: Any, key: str) -> Any:
        """`value` (found at `key` in the raw dict) with every reference in it resolved."""
        if key in self.done:
            return self.done[key]
        if key in self.active:
            cycle = " -> ".join([*self.active[self.active.index(key) :], key])
            raise ConfigError(key, f"interpolation cycle: {cycle}")
        self.active.append(key)
        if isinstance(value, str):
            out = self._string(value, key)
        elif isinstance(value, dict):
            out = {k: self._resolve(v, _join(key, k)) for k, v in value.items()}
        elif isinstance(value, list):
            out = [self._resolve(v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            out = value
        self.active.pop()
        self.done[key] = out
        return out

    def _string(self, text: str, key: str) -> Any:
        whole = _REFERENCE.fullmatch(text)
        if whole and not whole.group(1):
            return copy.deepcopy(self._reference(whole.group(2), key))

        def substitute(match: re.Match[str]) -> str:
            if match.group(1):
                return match.group(0)[1:]
            value = self._reference(match.group(2), key)
            if isinstance(value, dict | list):
                raise ConfigError(
                    key,
                    f"{match.group(0)} is a {'section' if isinstance(value, dict) else 'list'}; "
                    "it can be a whole value but not part of a string",
                )
            return _as_text(value)

        return _REFERENCE.sub(substitute, text)

    def _reference(self, target: str, key: str) -> Any:
        target = target.strip()
        parts = target.split(".")
        if not target or not all(parts):
            raise ConfigError(
                key, f"${{{target}}}: expected an absolute dotted key, like ${{algorithm.gamma}}"
            )
        found, value, depth = self._lookup(parts)
        if not found:
            found, value = _default_at(parts, depth)
        if not found:
            raise ConfigError(key, f"${{{target}}} refers to {target!r}, which is not a config key")
        return value

    def _lookup(self, parts: list[str]) -> tuple[bool, Any, int]:
        """(found, resolved value, how many leading parts the raw dict holds) of a dotted key."""
        node: Any = self.raw
        resolved = False  # whether `node` is already resolved (its strings are plain text)
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                return False, None, depth
            node = node[part]
            if not resolved and isinstance(node, str):
                node, resolved = self._resolve(node, ".".join(parts[: depth + 1])), True
        return True, node if resolved else self._resolve(node, ".".join(parts)), len(parts)


def _default_at(parts: list[str], depth: int) -> tuple[bool, Any]:
    """The default of a dotted key whose first `depth` parts the raw config holds (as sections).

    A section given in the config starts from its parent's default for it (env.eval's own seed,
    see `_section_defaults`), so the default of a key is found by walking the defaults from the
    top; only where that walk meets no section (a section whose default is None) does the key
    get its class's field default.
    """
    given = _class_at(parts[:depth])
    if given is None:  # the raw config holds a plain mapping there: it replaced the default whole
        return False, None
    found, value = _walk_defaults(TrainConfig, parts)
    return (found, value) if found else _walk_defaults(given, parts[depth:])


def _class_at(parts: list[str]) -> Any:
    cls: Any = TrainConfig
    for part in parts:
        cls = _section_type(get_type_hints(cls).get(part)) if cls is not None else None
    return cls


def _walk_defaults(cls: Any, parts: list[str]) -> tuple[bool, Any]:
    field = _field_map(cls).get(parts[0]) if cls is not None and parts else None
    if field is None:
        return False, None
    value = field_default(field)
    if value is dataclasses.MISSING:
        return False, None
    for part in parts[1:]:
        if dataclasses.is_dataclass(value) and part in _field_map(type(value)):
            value = getattr(value, part)
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return False, None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return True, dataclasses.asdict(value)
    return True, copy.deepcopy(value)


def _section_defaults(field: dataclasses.Field[Any]) -> dict[str, Any]:
    """The keys in which a section field's own default differs from its class's defaults, as
    raw values: env.eval's default is EnvSectionConfig(seed=1000), so a config that gives only
    `env.eval.num_servers` must still evaluate from seed 1000, not the class default 0 (which
    would replay the training starts)."""
    if field.default_factory is dataclasses.MISSING:
        return {}
    default = field.default_factory()
    if not dataclasses.is_dataclass(default):
        return {}
    plain = type(default)()
    differs = {}
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        if f.init and value != getattr(plain, f.name):
            differs[f.name] = (
                dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            )
    return differs


def _field_map(cls: Any) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def _as_text(value: Any) -> str:
    """A scalar as it reads in YAML, for a reference inside a longer string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _escape_references(value: Any) -> Any:
    """`value` with `${` in strings written `\\${`, so that loading it back keeps the text."""
    if isinstance(value, str):
        return _REFERENCE.sub(lambda m: "\\" + m.group(0), value)
    if isinstance(value, dict):
        return {k: _escape_references(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_references(v) for v in value]
    return value


# ------------------------------------------------------------------------------ typed building


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (through `X | None`), or None for plain values."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _unknown_keys(cls: type, data: Any, prefix: str) -> list[tuple[str, str | None]]:
    """(dotted key, closest known dotted key or None) for every key no dataclass declares."""
    if not isinstance(data, Mapping):
        return []  # a type error, reported while building
    hints = get_type_hints(cls)
    unknown: list[tuple[str, str | None]] = []
    for key, value in data.items():
        dotted = _join(prefix, key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            unknown.append((dotted, _join(prefix, close[0]) if close else None))
            continue
        section = _section_type(hints[key])
        if section is not None:
            unknown.extend(_unknown_keys(section, value, dotted))
    return unknown


def _unknown_key_error(
    unknown: list[tuple[str, str | None]], overridden: list[str], path: str | Path | None
) -> ConfigError:
    def source(key: str) -> str:
        for item in overridden:
            if key == item or key.startswith(item + ".") or item.startswith(key + "."):
                return " (from an override)"
        return f" (in {path})" if path is not None else ""

    def describe(key: str, close: str | None) -> str:
        return (f", did you mean {close!r}?" if close else "") + source(key)

    (first, first_close), *rest = unknown
    message = "unknown key" + describe(first, first_close)
    if rest:
        message += "; also unknown: " + "; ".join(repr(k) + describe(k, c) for k, c in rest)
    return ConfigError(first, message)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a section (a mapping), got {_show(data)}")
    hints = get_type_hints(cls)
    fields = _field_map(cls)
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key in fields and _section_type(hints[key]) is not None:
            value = {**_section_defaults(fields[key]), **value}
        kwargs[key] = _coerce(value, hints[key], _join(prefix, key))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise (err.under(prefix) if prefix else err) from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` (ints widen to float; nothing else converts)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must not be null; expected {_describe(tp)}")
        for arg in (a for a in args if a is not type(None)):
            if dataclasses.is_dataclass(arg):
                return _build(arg, value, key)
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}")
    if value is None:
        raise ConfigError(key, f"must not be null; expected {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}")
        return {
            _coerce(k, args[0], key): _coerce(v, args[1], _join(key, k)) for k, v in value.items()
        }
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"{key}: the loader cannot check fields of type {tp!r}")
    if not ok:
        hint = " (quote it to make it a string)" if tp is str and _is_scalar(value) else ""
        raise ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}{hint}")
    return float(value) if tp is float else value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | bool)


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "a section (a mapping)"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", repr(tp))
    )


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
