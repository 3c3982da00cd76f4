"""The README's config reference and etc/llamad.toml name every config key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from llamad.config import KEY_TYPES, MODEL_DEFAULTS, MODEL_KEY_TYPES, MODEL_ONLY_KEYS, _defaults

ROOT = Path(__file__).resolve().parents[2]


def test_readme_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in KEY_TYPES if f"| `{key}` |" not in readme]
    assert missing == []


def test_shipped_config_has_every_key_commented_with_its_default():
    lines = []
    for line in (ROOT / "etc" / "llamad.toml").read_text().splitlines():
        if re.match(r"^\[[a-z_]+\]$", line):
            lines.append(line)
        elif m := re.match(r"^# ([a-z_]+ = .*?)(\s{2,}#.*)?$", line):
            lines.append(m.group(1))
    doc = tomllib.loads("\n".join(lines))
    flat = {**{k: v for k, v in doc.items() if not isinstance(v, dict)},
            **{f"{s}.{k}": v for s, t in doc.items() if isinstance(t, dict) for k, v in t.items()}}
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in _defaults().items()}
    assert flat == plain


def test_readme_lists_every_model_key():
    readme = (ROOT / "README.md").read_text()
    names = [*MODEL_ONLY_KEYS, "<backend key>"]
    assert [name for name in names if f"| `models.<id>.{name}` |" not in readme] == []


def test_shipped_config_shows_a_model_table_with_each_model_key_and_its_default():
    """The commented [models.<id>] example: `#   key = value` lines, model keys with their defaults."""
    example = (ROOT / "etc" / "llamad.toml").read_text().split("\n# [models.", 1)[1].splitlines()[1:]
    shown: dict[str, object] = {}
    for line in example:
        if not (m := re.match(r"^#   ([a-z_]+ = .*?)(\s{2,}#.*)?$", line)):
            break
        shown.update(tomllib.loads(m.group(1)))
    assert set(shown) <= set(MODEL_KEY_TYPES)
    defaults = {name: _defaults()[v] if v == "idle.timeout" else v for name, v in MODEL_DEFAULTS.items()}
    assert {name: shown.get(name) for name in MODEL_ONLY_KEYS} == {
        name: list(v) if isinstance(v, tuple) else v for name, v in defaults.items()
    }


def test_readme_says_what_make_run_and_keys_reload_really_do():
    """`make run` on Ctrl-C: twistd exits 0, GNU make ends by the SIGINT (130), as
    tests/integration/test_admin_tools.py shows; `keys reload` needs no pgrep."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "Ctrl-C drains, stops the child and exits 0" not in readme
    assert "twistd exits 0" in readme and "130" in readme
    assert "pgrep" not in readme and "llamad keys reload " in readme
