"""Comparing llamad's JSON answers with llama-server's by shape: keys and JSON types, recursively."""

from __future__ import annotations

from typing import Any


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not JSON: {value!r}")


def shape_diff(ours: Any, theirs: Any, path: str = "$", ignore: frozenset[str] = frozenset()) -> list[str]:
    """Where ``ours`` differs from ``theirs`` in keys or JSON types, recursively.

    Keys in ``ignore`` (llamad's own) are left out of ours.  Lists of the same
    length are compared element by element, others each element with the
    router's first (an empty list on either side says nothing about element types).
    """
    if json_type(ours) != json_type(theirs):
        return [f"{path}: {json_type(ours)} != router's {json_type(theirs)}"]
    if isinstance(ours, dict):
        mine = set(ours) - ignore
        diffs = [f"{path}: extra key {k!r}" for k in sorted(mine - set(theirs))]
        diffs += [f"{path}: missing key {k!r}" for k in sorted(set(theirs) - mine)]
        for key in sorted(mine & set(theirs)):
            diffs += shape_diff(ours[key], theirs[key], f"{path}.{key}", ignore)
        return diffs
    if isinstance(ours, list) and ours and theirs:
        pairs = zip(ours, theirs) if len(ours) == len(theirs) else ((item, theirs[0]) for item in ours)
        return [d for i, (a, b) in enumerate(pairs) for d in shape_diff(a, b, f"{path}[{i}]", ignore)]
    return []
