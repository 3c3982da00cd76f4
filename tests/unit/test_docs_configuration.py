"""docs/configuration.md's tables against the config schema, both ways.

Every key `llamad check-config` prints (``section.key``, and ``models.<id>.<key>`` for a fleet's model) has
one row with the schema's default and the environment variables that set it, and every row names a key
the schema has.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from llamad.config import (
    ENV_KEYS, INTERFACE_ENV_KEYS, KEY_TYPES, MODEL_KEY_TYPES, PORT_ENV_KEYS, _defaults, load,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
HEADER = "| key | default | env | meaning |"
MODEL_PREFIX = "models.<id>."


def rows(text: str) -> dict[str, tuple[str, str, str]]:
    """Each key row of the doc's config tables: key -> (default, env, meaning), the cells as written."""
    found: dict[str, tuple[str, str, str]] = {}
    in_table = False
    for line in text.splitlines():
        if line.strip() == HEADER:
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if not in_table or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        assert len(cells) == 4, f"a row of four cells: {line}"
        key = re.fullmatch(r"`([^`]+)`", cells[0])
        assert key is not None, f"the first cell is one `key`: {line}"
        assert key.group(1) not in found, f"{key.group(1)} listed twice"
        found[key.group(1)] = (cells[1], cells[2], cells[3])
    return found


def value(cell: str) -> Any:
    """A default cell's TOML value: `"tcp:8000"`, `[]`, `1.0`."""
    m = re.fullmatch(r"`(.+)`", cell)
    assert m is not None, f"a default is one `value`: {cell}"
    return tomllib.loads(f"v = {m.group(1)}")["v"]


def same(documented: Any, default: Any) -> bool:
    """TOML's value equals the schema's (a tuple as a list, 600 as 600.0), and a bool stays a bool."""
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(default, bool) or isinstance(documented, bool):
        return type(default) is type(documented) and default == documented
    if isinstance(default, float) and isinstance(documented, int):
        return float(documented) == default
    return type(default) is type(documented) and default == documented


def env_of(key: str) -> set[str]:
    """The variables that set ``key``, from the schema's tables (MODEL_NAME sets backend.model under models_dir)."""
    names = {name for name, target in ENV_KEYS.items()
             if key == target or (isinstance(target, tuple) and key in target)}
    names |= {name for name, target in PORT_ENV_KEYS.items() if target == key}
    names |= {name for name, targets in INTERFACE_ENV_KEYS.items() if key in targets}
    if key == "backend.model":
        names.add("MODEL_NAME")
    return names


DOCUMENTED = rows(DOC.read_text())
PLAIN = {key: cells for key, cells in DOCUMENTED.items() if not key.startswith(MODEL_PREFIX)}
MODEL = {key[len(MODEL_PREFIX):]: cells for key, cells in DOCUMENTED.items() if key.startswith(MODEL_PREFIX)}


def test_the_doc_has_the_tables():
    assert len(PLAIN) > 50 and len(MODEL) > 10


def test_every_key_of_the_schema_is_documented_and_no_other():
    assert sorted(set(KEY_TYPES) - set(PLAIN)) == [], "in the schema, not in docs/configuration.md"
    assert sorted(set(PLAIN) - set(KEY_TYPES)) == [], "in docs/configuration.md, not in the schema"


@pytest.mark.parametrize("key", list(KEY_TYPES))
def test_each_key_is_documented_with_the_schema_default(key: str):
    default = _defaults()[key]
    documented = value(PLAIN[key][0])
    assert same(documented, default), f"{key}: the doc says {documented!r}, the schema {default!r}"


@pytest.mark.parametrize("key", list(KEY_TYPES))
def test_each_key_names_exactly_the_variables_that_set_it(key: str):
    cell = PLAIN[key][1]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", cell))
    assert named == env_of(key), f"{key}: the doc names {sorted(named)}, the schema {sorted(env_of(key))}"


def test_every_key_has_a_meaning():
    assert [key for key, (_, _, meaning) in DOCUMENTED.items() if not meaning] == []


def test_every_model_key_is_documented_and_no_other():
    assert sorted(set(MODEL_KEY_TYPES) - set(MODEL)) == [], "a [models.<id>] key not in docs/configuration.md"
    assert sorted(set(MODEL) - set(MODEL_KEY_TYPES)) == [], "in docs/configuration.md, not a [models.<id>] key"


def test_model_keys_are_documented_with_what_a_table_that_sets_nothing_gets(tmp_path: Path):
    """A [models.<id>] table that sets no key: each key as `llamad check-config` shows it, with its source."""
    path = tmp_path / "llamad.toml"
    path.write_text('[backend]\nmodel = "x.gguf"\n\n[models.m]\n')
    loaded = load(str(path), environ={}, check_files=False, require_model=False)
    for name in MODEL_KEY_TYPES:
        cell, source, got = MODEL[name][0], loaded.sources[f"models.m.{name}"], loaded.values[f"models.m.{name}"]
        if source.startswith("inherited from [backend]"):
            assert cell == "`[backend]`'s", f"models.<id>.{name}: inherited from [backend], the doc says {cell}"
        elif source.startswith("inherited from "):
            inherited = source.removeprefix("inherited from ").split(" ", 1)[0]
            assert cell == f"`{inherited}`", f"models.<id>.{name}: inherited from {inherited}, the doc says {cell}"
        else:
            assert source.startswith("default"), source
            assert same(value(cell), got), f"models.<id>.{name}: the doc says {cell}, the config {got!r}"
