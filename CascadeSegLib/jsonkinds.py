"""JSON settings checked against the kind of their dataclass field's default.

A config is hand-edited JSON: a quoted number, a null or 1 for true would otherwise reach the
code as a string, None or int and fail far away with a traceback, or, worse, run with it."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _kind_ok(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):       # JSON true is not 1, nor 1 true
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def kind_problem(value: Any, kind: type, what: str) -> str | None:
    """'WHAT must be KIND, got VALUE' when `value` is not of `kind` (bool, int, float or str), else
    None: for settings that are not dataclass fields."""
    import json

    return None if _kind_ok(value, kind) else f"{what} must be {_KINDS[kind]}, got {json.dumps(value)}"


def wrong_kind(cls: type, d: dict[str, Any], what: str) -> str | None:
    """'WHAT.KEY must be KIND, got VALUE' for the first value of `d` whose kind is not its field's
    default's (fields whose default is None, a tuple or a list are not checked), else None."""
    defaults = {f.name: f.default for f in fields(cls)}
    for name, value in d.items():
        kind = type(defaults.get(name))
        problem = kind_problem(value, kind, f"{what}.{name}") if kind in _KINDS else None
        if problem:
            return problem
    return None
