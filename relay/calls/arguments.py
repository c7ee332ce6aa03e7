"""Checking a model's tool arguments against the tool's JSON schema (docs/contract.md §11).

The subset of JSON Schema that tool definitions use in practice: ``type``,
``properties``, ``required``, ``enum``, ``items``, ``additionalProperties``
(false), ``minimum``/``maximum``, ``minLength``/``maxLength``. Keywords outside
it are not checked (the tool's own server still sees the arguments). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Deeper than any real tool's arguments; stops a hostile nesting from recursing far.
MAX_DEPTH = 16

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def check_arguments(schema: Mapping[str, Any], args: object) -> str | None:
    """None when ``args`` is a JSON object that matches ``schema``; else why not,
    in a few words the model can act on (``"target" is required``)."""
    if not isinstance(args, dict):
        return "arguments must be a JSON object"
    return _check(schema, args, "arguments", 0)


def _type_ok(kind: str, value: object) -> bool:
    types = _TYPES.get(kind)
    if types is None:
        return True  # a type name we do not know: not ours to refuse
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False  # JSON true is not a number, though Python's bool is an int
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, types)


def _check(schema: Mapping[str, Any], value: object, where: str, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f"{where} is nested too deeply"
    kind = schema.get("type")
    if isinstance(kind, str) and not _type_ok(kind, value):
        return f"{where} must be of type {kind}"
    if isinstance(kind, list) and not any(isinstance(k, str) and _type_ok(k, value) for k in kind):
        return f"{where} must be of type {' or '.join(str(k) for k in kind)}"
    enum = schema.get("enum")
    if isinstance(enum, list) and value not in enum:
        allowed = ", ".join(str(v) for v in enum[:10])
        return f"{where} must be one of: {allowed}"
    if isinstance(value, str):
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(low, int) and len(value) < low:
            return f"{where} is too short"
        if isinstance(high, int) and len(value) > high:
            return f"{where} is too long"
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if isinstance(low, int | float) and value < low:
            return f"{where} must be at least {low}"
        if isinstance(high, int | float) and value > high:
            return f"{where} must be at most {high}"
    if isinstance(value, dict):
        return _check_object(schema, value, where, depth)
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                problem = _check(items, item, f"{where}[{i}]", depth + 1)
                if problem:
                    return problem
    return None


def _check_object(
    schema: Mapping[str, Any], value: dict[str, Any], where: str, depth: int
) -> str | None:
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = schema.get("required")
    for name in required if isinstance(required, list) else ():
        if isinstance(name, str) and name not in value:
            return f'"{name}" is required'
    if schema.get("additionalProperties") is False:
        for name in value:
            if name not in props:
                return f'"{name}" is not an argument of this tool'
    for name, sub in props.items():
        if name in value and isinstance(sub, Mapping):
            problem = _check(sub, value[name], f'"{name}"', depth + 1)
            if problem:
                return problem
    return None
