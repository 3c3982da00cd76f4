"""The README's config reference and etc/llamad.toml name every config key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from llamad.config import KEY_TYPES, _defaults

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


def test_readme_says_what_make_run_and_keys_reload_really_do():
    """`make run` on Ctrl-C: twistd exits 0, GNU make ends by the SIGINT (130), as
    tests/integration/test_admin_tools.py shows; `keys reload` needs no pgrep."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "Ctrl-C drains, stops the child and exits 0" not in readme
    assert "twistd exits 0" in readme and "130" in readme
    assert "pgrep" not in readme and "llamad keys reload " in readme
