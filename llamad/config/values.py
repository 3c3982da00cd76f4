"""One value at a time: TOML's typed values checked against the key's type, text (the environment,
``--set``) parsed into it, sizes with units, and the checks of a choice or a number's bounds."""

from __future__ import annotations

import math
import re
import shlex
import tomllib
import typing
from collections import abc
from typing import Any

from llamad.config.errors import ConfigError
from llamad.config.schema import AUTO, MINIMUM_WHY, Bytes, MemorySize, key_type

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str) -> bool:
    """The one boolean parser for env vars and options."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false/1/0/yes/no/on/off), got {text!r}")


SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(B|[KMGT]i?B)?\s*$", re.IGNORECASE)


def _size(value: Any, auto: bool) -> int | str | None:
    """A size as bytes, or "auto" where allowed; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    if auto and value.strip().lower() == AUTO:
        return AUTO
    m = SIZE.match(value)
    if not m:
        return None
    unit = (m.group(2) or "b").lower()
    scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale) if "." in m.group(1) else int(m.group(1)) * scale


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "a list of strings"
    if origin in (abc.Mapping, dict):
        return "a table of integers" if typing.get_args(hint)[1] is int else "a table of strings"
    if hint is Bytes:
        return 'a size in bytes (an integer, or a string like "8GiB")'
    if hint == MemorySize:
        return 'a size in bytes (an integer, or a string like "8GiB") or "auto"'
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[hint]


def coerce(key: str, value: Any, source: str) -> Any:
    """Check a TOML-typed value against the key's type."""
    hint = key_type(key)
    origin = typing.get_origin(hint)
    ok: bool
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is Bytes or hint == MemorySize:
        size = _size(value, auto=hint == MemorySize)
        ok, value = size is not None, value if size is None else size
    elif origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # Mapping[str, str] or Mapping[str, int]
        kind = typing.get_args(hint)[1]
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in value.items()
        )
        value = dict(value) if ok else value
    if not ok:
        raise ConfigError(key, f"expected {_type_name(hint)}, got {value!r}", source)
    return value


def parse_text(key: str, text: str, source: str) -> Any:
    """Parse a string from the environment or an option into the key's type."""
    hint = key_type(key)
    try:
        if hint is bool:
            return parse_bool(text)
        if hint is int:
            try:
                return int(text.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
        if hint is float:
            try:
                return float(text.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {text!r}") from None
        if hint is str:
            return text
        if hint is Bytes or hint == MemorySize:
            return coerce(key, text, source)
        if typing.get_origin(hint) is tuple:
            if text.lstrip().startswith("["):
                return coerce(key, _parse_toml_value(key, text, source), source)
            if key.rpartition(".")[2] == "extra_args":
                return tuple(shlex.split(text))
            return tuple(w for w in re.split(r"[,\s]+", text) if w)
    except ValueError as e:
        raise ConfigError(key, str(e), source) from None
    if text.lstrip().startswith("{"):
        return coerce(key, _parse_toml_value(key, text, source), source)
    raise ConfigError(key, f'expected a TOML inline table, e.g. {{A = "1"}}, got {text!r}', source)


def _parse_toml_value(key: str, text: str, source: str) -> Any:
    """A list or table written as TOML (``["*"]``, ``{A = "1"}``) in a variable or ``--set``."""
    try:
        return loads_toml(f"value = {text.strip()}")["value"]
    except ValueError as e:
        raise ConfigError(key, f"not a valid TOML value: {text!r} ({e})", source) from None


def parse_toml(data: bytes) -> dict[str, Any]:
    """A TOML document from a file's bytes; every way it can be bad is a ValueError saying where.

    ``tomllib`` leaves two failures to the caller: a byte that is not UTF-8
    (UnicodeDecodeError, with no line) and a value nested deeper than the
    interpreter's stack (RecursionError).
    """
    return loads_toml(decode_utf8(data))


def decode_utf8(data: bytes) -> str:
    """``data`` as text; a byte that is not UTF-8 is a ValueError naming it, its line and offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"not UTF-8 (byte {data[e.start]:#04x} at line {line}, offset {e.start})") from None


def loads_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads``, with a value nested too deeply for the stack a ValueError rather than a RecursionError."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ValueError("a value is nested too deeply") from None


def check_choice(key: str, value: Any, choices: tuple[str, ...], source: str) -> None:
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r} (expected one of: {', '.join(choices)})", source)


def check_number(key: str, value: Any, hint: Any, source: str, low: float, positive: bool) -> None:
    """Finite and in range; "auto" sizes and non-numbers pass."""
    if hint is float and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}", source)
    if hint in (int, float, Bytes) or (hint == MemorySize and value != AUTO):
        if value < low or (positive and value <= 0):
            bound = "> 0" if positive else f">= {low:g}"
            why = MINIMUM_WHY.get(key)
            raise ConfigError(key, f"must be {bound}, got {value!r}" + (f": {why}" if why else ""), source)
