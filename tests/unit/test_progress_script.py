"""scripts/progress.sh: a long build shows its progress (each new 10 %) and its time, nothing else."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "progress.sh"


def progress(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "build.log"), "llamad: compiling x", "bash", "-c",
                           body], capture_output=True, text=True, timeout=30)


def test_cmake_percentages_are_thinned_to_each_new_ten_percent(tmp_path: Path) -> None:
    lines = [f"[{p:3d}%] Building C object obj{p}.o" for p in (0, 1, 4, 9, 10, 11, 35, 34, 52, 99, 100)]
    body = "echo '-- Configuring done'; " + "; ".join(f"echo '{line}'" for line in lines) + "; echo Linking"
    done = progress(tmp_path, body)
    assert (done.returncode, done.stderr) == (0, "")
    shown = done.stdout.splitlines()
    assert [re.sub(r" \(\d+m\d\ds\)$", "", line) for line in shown[:-1]] == [
        f"llamad: compiling x: {p}%" for p in (0, 10, 30, 50, 90, 100)]
    assert re.fullmatch(r"llamad: compiling x: done in \d+m\d\ds", shown[-1])
    log = (tmp_path / "build.log").read_text().splitlines()
    assert log[0] == "-- Configuring done" and log[-1] == "Linking" and len(log) == len(lines) + 2


def test_ninja_counts_become_percentages(tmp_path: Path) -> None:
    body = "for i in $(seq 1 40); do echo \"  [$i/40] /usr/bin/g++ -c a$i.cpp\"; done"
    done = progress(tmp_path, body)
    assert done.returncode == 0
    steps = [line.split(": ")[2].split("%")[0] for line in done.stdout.splitlines()[:-1]]
    assert steps == [str(p) for p in range(0, 101, 10)]


def test_nothing_to_build_prints_nothing(tmp_path: Path) -> None:
    done = progress(tmp_path, "echo 'Requirement already satisfied: llama-cpp-python'")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert "Requirement already satisfied" in (tmp_path / "build.log").read_text()


def test_a_failed_build_keeps_its_status_and_shows_the_end_of_its_log(tmp_path: Path) -> None:
    done = progress(tmp_path, "echo '[ 50%] Building a.o'; echo 'a.c:1: error: boom' >&2; exit 3")
    assert done.returncode == 3
    assert done.stdout.startswith("llamad: compiling x: 50% (")
    assert re.match(r"llamad: compiling x: failed after \d+m\d\ds \(exit 3\); the last lines of ", done.stderr)
    assert done.stderr.rstrip().endswith("a.c:1: error: boom")


def test_the_builds_go_through_it() -> None:
    assert "progress.sh" in (ROOT / "scripts" / "build-llama-server.sh").read_text()
    test_recipe = (ROOT / "Makefile").read_text().split("\ntest: setup\n", 1)[1].split("\n\n", 1)[0]
    assert "scripts/progress.sh" in test_recipe and " -v install '.[test,llama-cpp-python]'" in test_recipe
