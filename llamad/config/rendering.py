"""``llamad check-config``'s output: the effective config as TOML, each line commented with its source."""

from __future__ import annotations

import re
from typing import Any

from llamad.config.loading import Loaded
from llamad.config.schema import KEY_TYPES, MODEL_KEY_TYPES

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml_char(c: str) -> str:
    """Escape one character for a TOML basic string."""
    if c in ('"', "\\"):
        return "\\" + c
    if c < " " and c != "\t" or c == "\x7f":
        return f"\\u{ord(c):04x}"
    return c


def toml_key(name: str) -> str:
    """A table key, quoted unless bare (a model id with '.' or ':' is quoted)."""
    return name if re.match(r"^[A-Za-z0-9_-]+$", name) else _toml_value(name)


def render(loaded: Loaded) -> str:
    """The effective config as TOML, each line commented with its source; the models follow [fleet]."""
    lines: list[str] = []
    current = None

    def line(name: str, key: str) -> None:
        text = f"{name} = {_toml_value(loaded.values[key])}"
        lines.append(f"{text:<48} # {loaded.sources[key]}")

    def models() -> None:
        config = loaded.config
        if config.single_model:
            for model_id in config.models:
                lines.append(f"# one model, from [backend]: id {_toml_value(model_id)} "
                             "(no [models] tables, no fleet.models_dir)")
            return
        for model_id in config.models:
            lines.append(f"\n[models.{toml_key(model_id)}]")
            for name in MODEL_KEY_TYPES:
                line(name, f"models.{model_id}.{name}")

    for key in KEY_TYPES:
        section, _, name = key.rpartition(".")
        if section != current and section:
            if current == "fleet":
                models()
            lines.append(f"\n[{section}]")
            current = section
        line(name or key, key)
    return "\n".join(lines).lstrip("\n") + "\n"
