"""The commands of the README and of docs/*.md, pasted in order into a fresh shell next to a running `make run`.

A copy of the checkout runs `make run` (the demo model on ports 8000 and 8001, `data_dir = ./var`), then
every ``sh`` and ``python`` block of README.md and of each docs/*.md file runs, in the order of ``DOCS``, in one
bash with a bare environment: what a newcomer has.  A block is left out only when the line before it is
``<!-- docs-test: skip: <why> -->`` (it installs system files, never returns, is `make run` itself, or needs a
GPU, a Kubernetes cluster or a container runtime).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
# README first (it activates .venv for the rest), docs/keys.md last: its keys turn auth on for the running llamad.
DOCS = ("README.md", "docs/api.md", "docs/configuration.md", "docs/many-models.md", "docs/operations.md",
        "docs/migration.md", "docs/architecture.md", "docs/performance.md", "docs/guides.md", "docs/kubernetes.md",
        "docs/keys.md")
SKIP = re.compile(r"^<!-- docs-test: skip: .+ -->$")
FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(text: str) -> list[tuple[str, str]]:
    """The (language, code) of each fenced block not marked to be skipped."""
    found: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        skipped = i > 0 and bool(SKIP.match(lines[i - 1].strip()))
        if not skipped and m.group(1) in ("sh", "python"):
            found.append((m.group(1), "\n".join(lines[i + 1:end])))
        i = end + 1
    return found


def script(docs: list[tuple[str, str]]) -> str:
    parts = ["set -euo pipefail", "set -x"]
    for language, code in docs:
        if language == "python":
            parts.append(f"python - <<'LLAMAD_DOCS_PY'\n{code}\nLLAMAD_DOCS_PY")
        else:
            parts.append(code)
    return "\n".join(parts) + "\n"


def test_blocks_are_found_and_marked_ones_left_out():
    text = "a\n```sh\necho 1\n```\n<!-- docs-test: skip: never returns -->\n```sh\ntail -F x\n```\n```python\nprint(2)\n```\n"
    assert blocks(text) == [("sh", "echo 1"), ("python", "print(2)")]


def test_every_document_is_run_once():
    documents = {"README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))}
    assert sorted(DOCS) == sorted(documents)
    assert DOCS[0] == "README.md" and DOCS[-1] == "docs/keys.md"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200 and b'"ready"' in response.read()
    except OSError:
        return False


def test_every_command_in_the_docs_works_in_a_fresh_shell(tmp_path: Path):
    if not (port_free(8000) and port_free(8001)):
        pytest.fail("ports 8000 and 8001 must be free: the README's commands talk to them")
    checkout = tmp_path / "llamad"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    venv = Path(os.environ.get("VIRTUAL_ENV") or Path(shutil.which("twistd") or "").parent.parent)
    (checkout / ".venv").symlink_to(venv)
    fresh = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
             "TERM": "dumb"}
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["make", "run"], cwd=checkout, env=fresh, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        def up() -> bool:
            if server.poll() is not None:
                raise AssertionError(f"make run exited {server.returncode}:\n{log.read_text()[-3000:]}")
            return answers("http://127.0.0.1:8000/health")

        wait_for(up, 600, "make run to serve the demo model", interval=0.5)
        docs = [b for name in DOCS for b in blocks((ROOT / name).read_text())]
        assert len(docs) >= 15
        (tmp_path / "docs.sh").write_text(script(docs))
        ran = subprocess.run(["bash", str(tmp_path / "docs.sh")], cwd=checkout, env=fresh, capture_output=True,
                             timeout=600)
        output = (ran.stdout + ran.stderr).decode(errors="replace")
        assert ran.returncode == 0, f"a documented command failed:\n{output[-6000:]}"
        assert "Traceback" not in output, output[-6000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the terminal that ran `make run`
            server.wait(120)
    assert "llamad stopped" in log.read_text()
