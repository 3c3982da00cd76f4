"""The test suite's layout: no test module imports another, and no two share a name.

Shared fixtures live in a folder's conftest.py; shared plain helpers in modules that are not test modules
(tests/fakes.py, tests/wire.py, tests/integration/helpers.py...).  Test modules are imported by their bare
name (no packages under tests/), so two of one name in different folders cannot both be collected.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def is_test_module(name: str) -> bool:
    """Whether a module name (dotted or not) names a test module: ``test_*`` or ``*_test``."""
    last = name.rsplit(".", 1)[-1]
    return last.startswith("test_") or last.endswith("_test")


def module_paths() -> list[Path]:
    return sorted(path for path in TESTS.rglob("*.py") if is_test_module(path.stem))


def imported(source: str, filename: str = "<test>") -> list[tuple[int, str]]:
    """Every module an ``import`` or ``from ... import`` in ``source`` names (at any depth), with its line;
    ``from . import x`` names ``x``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.lineno, node.module))
            else:
                found += [(node.lineno, alias.name) for alias in node.names]
    return sorted(found)


def cross_imports(path: Path) -> list[str]:
    return [f"{path.relative_to(TESTS)}:{line} imports {name}"
            for line, name in imported(path.read_text(), str(path)) if is_test_module(name)]


def test_the_check_sees_every_spelling() -> None:
    source = '''
import os
import test_a
import pkg.test_b as b
from test_c import helper
from fakes import FakeBackend, test_like_name
from . import test_d
from .test_e import h


def f():
    from test_f import g
'''
    flagged = [name for _, name in imported(source) if is_test_module(name)]
    assert flagged == ["test_a", "pkg.test_b", "test_c", "test_d", "test_e", "test_f"]


def test_the_suite_is_found() -> None:
    names = {path.relative_to(TESTS).as_posix() for path in module_paths()}
    assert {"unit/test_test_layout.py", "unit/test_gate.py", "integration/test_core.py"} <= names
    assert not any(name.startswith(("fakes", "wire", "integration/helpers", "unit/conftest")) for name in names)


def test_no_test_module_imports_another() -> None:
    offenders = [line for path in module_paths() for line in cross_imports(path)]
    assert offenders == [], "shared code belongs in conftest.py or a helper module:\n" + "\n".join(offenders)


def test_no_two_test_modules_share_a_name() -> None:
    places: dict[str, list[str]] = defaultdict(list)
    for path in module_paths():
        places[path.name].append(path.relative_to(TESTS).parent.as_posix())
    shared = {name: folders for name, folders in places.items() if len(folders) > 1}
    assert shared == {}, "pytest imports test modules by their bare name: rename one of each"
