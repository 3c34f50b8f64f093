"""Help text for the config keys, from the docstrings of the schema's fields.

A field's docstring is the string literal right after it in the class body. Python keeps no
trace of those at runtime, so they are read from the class source with `ast`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .schema import TrainConfig

WIDTH = 100


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (cleaned of indentation) for the fields of class `cls`.

    Fields without a docstring are left out; so is everything when the source is unavailable.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = next(
        (n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)),
        None,
    )
    if node is None:
        return {}
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_default(field: dataclasses.Field[Any]) -> Any:
    """The value a dataclass field gets when it is not given (dataclasses.MISSING: none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def section_type(tp: Any) -> type | None:
    """The dataclass an annotation holds (through `X | None`), or None for plain values."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        for arg in get_args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def describe_config(root: type = TrainConfig, width: int = WIDTH) -> str:
    """Every section and key of the config, with its type, default and docstring.

    Sections read `dotted.name: class docstring`; keys `  dotted.key (type, default X): doc`.
    Defaults are the ones the key gets when it is not written (before derived fields, such as
    actor.checkpoint_dir, are filled in).
    """
    lines: list[str] = []
    _describe(root, None, "", lines, width)
    return "\n".join(lines).strip("\n") + "\n"


def _describe(cls: type, instance: Any, prefix: str, lines: list[str], width: int) -> None:
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    leaves: list[str] = []
    sections: list[tuple[type, Any, str]] = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        default = getattr(instance, field.name) if instance is not None else field_default(field)
        section = section_type(hints[field.name])
        if section is not None:
            sub = default if isinstance(default, section) else None
            sections.append((section, sub, key))
            continue
        head = f"{key} ({_type_name(field, hints[field.name])}"
        if default is not dataclasses.MISSING:
            head += f", default {_yaml_text(default)}"
        doc = " ".join(docs.get(field.name, "(undocumented)").split())
        leaves.append(
            textwrap.fill(
                f"{head}): {doc}",
                width=width,
                initial_indent="  ",
                subsequent_indent="      ",
                break_on_hyphens=False,
                break_long_words=False,
            )
        )
    if prefix:
        doc = " ".join(inspect.cleandoc(cls.__doc__ or "").split())
        lines.append("")
        lines.append(textwrap.fill(f"{prefix}: {doc}", width=width, subsequent_indent="  "))
    lines.extend(leaves)
    for section, sub, key in sections:
        _describe(section, sub, key, lines, width)


def _type_name(field: dataclasses.Field[Any], hint: Any) -> str:
    if isinstance(field.type, str):  # `from __future__ import annotations`: as written
        return field.type
    return getattr(hint, "__name__", None) or repr(hint).replace("typing.", "")


def _yaml_text(value: Any) -> str:
    """`value` as one would write it in the YAML file or an override."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").strip()
