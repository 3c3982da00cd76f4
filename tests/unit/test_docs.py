"""The README is a short door to docs/, every link between them holds, and the docs agree with the code.

docs/configuration.md's tables are checked against the config schema in test_docs_configuration.py; the
commands of every document run in tests/integration/test_docs_commands.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from llamad.config import MODEL_DEFAULTS, MODEL_KEY_TYPES, MODEL_ONLY_KEYS, _defaults
from llamad.gateway.routes import ADMIN_PATHS, ANY_ROLE_PATHS, OWN_ROUTES, PUBLIC_PATHS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 12288  # bytes: the README opens the door, docs/ holds the reference


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


# --- the README: a door ----------------------------------------------------------------------------


def test_the_readme_is_a_door_not_a_manual():
    assert len(README.read_bytes()) <= README_LIMIT


def test_the_readme_links_every_docs_file():
    readme = README.read_text()
    assert [doc.name for doc in DOCS if f"](docs/{doc.name}" not in readme] == []


def test_the_readme_has_one_endpoints_table():
    readme = README.read_text()
    assert readme.count("\n| port | path |") == 1
    for path in ("/ping", "/livez", "/readyz", "/health", "/metrics", "/admin/reload", "/admin/restart",
                 "/models/load", "/v1/chat/completions"):
        assert path in readme, path


def test_docs_say_what_make_run_and_keys_reload_really_do():
    """`make run` on Ctrl-C: twistd exits 0, GNU make ends by the SIGINT (130), as
    tests/integration/test_admin_tools.py shows; `keys reload` needs no pgrep."""
    readme = " ".join(README.read_text().split())
    everything = " ".join(" ".join(doc.read_text() for doc in [README, *DOCS]).split())
    assert "Ctrl-C drains, stops the child and exits 0" not in everything
    assert "twistd exits 0" in readme and "130" in readme
    assert "pgrep" not in everything and "llamad keys reload " in (ROOT / "docs" / "keys.md").read_text()


# --- links and anchors -----------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(text: str) -> set[str]:
    """GitHub's ids of a document's headings: lowercase, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.MULTILINE):
        plain = heading.replace("\\", "").replace("`", "").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")
        found.add(slug)
    return found


def test_anchors_are_made_as_github_makes_them():
    text = "# Title\n## [models.\\<id\\>]: one model\n## Port 8000: llamad's own routes\n```sh\n# not one\n```\n"
    assert anchors(text) == {"title", "modelsid-one-model", "port-8000-llamads-own-routes"}


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_link_between_the_documents_holds(doc: Path):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no such heading")
    assert broken == []


# --- the architecture: the module map and the route table -------------------------------------------

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_the_module_map_names_every_module_of_llamad_and_no_other():
    text = ARCHITECTURE.read_text()
    mapped = set(re.findall(r"^\| `(llamad/[\w/]+\.py)` \|", text, re.MULTILINE))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "llamad").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - mapped) == [], "modules missing from the module map"
    assert sorted(mapped - modules) == [], "in the module map, not in llamad/"


def test_the_module_map_names_only_files_that_exist():
    text = ARCHITECTURE.read_text()
    table = text.split("Outside the package:", 1)[1].split("\n## ", 1)[0]
    named = {name for row in re.findall(r"^\| (.+?) \|", table, re.MULTILINE)
             for name in re.findall(r"`([^`]+)`", row)}
    assert named and [name for name in sorted(named) if not (ROOT / name).exists()] == []


def test_the_route_table_has_llamads_own_routes_and_their_roles():
    text = ARCHITECTURE.read_text()
    table = text.split("## The routes of port 8000", 1)[1].split("\n## ", 1)[0]
    rows = [row for row in table.splitlines() if row.startswith("| `")]
    by_path = {path: row for row in rows for path in re.findall(r"`(/[\w/.]*)`", row.split(" | ")[0])}
    for path in {*OWN_ROUTES, *(path.decode() for path in ADMIN_PATHS | ANY_ROLE_PATHS | PUBLIC_PATHS)}:
        assert path in by_path, f"{path} not in the route table"
    for path in ADMIN_PATHS:
        assert "| admin |" in by_path[path.decode()], f"{path.decode()} needs the admin role"
    for path in ANY_ROLE_PATHS:
        assert "| any |" in by_path[path.decode()], f"{path.decode()} takes a key of any role"
    for path in PUBLIC_PATHS:
        assert by_path[path.decode()].split(" | ")[2] == "no", f"{path.decode()} needs no key"
