"""Logs on the volume: rotation that `tail -F` follows, the boot log, and a volume that fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import wait_for
from llamad.logs import utc_stamp

pytestmark = pytest.mark.integration

LINES = 4000


def counting_child(tmp_path, lines: int = LINES):
    """A backend that writes numbered lines as fast as it can, then waits."""
    script = tmp_path / "counting-child"
    # 100 lines every 20 ms: rotations come well apart, as they do in production.
    script.write_text(f"#!/bin/sh\ni=1\nwhile [ $i -le {lines} ]; do echo \"line $i of the child\"; "
                      "if [ $((i % 100)) -eq 0 ]; then sleep 0.02; fi; i=$((i+1)); done\nexec sleep 60\n")
    script.chmod(0o755)
    return str(script)


def opened(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open, by its descriptors in /proc."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fds / fd) == str(path) for fd in os.listdir(fds))
    except FileNotFoundError:
        return False


def test_tail_follows_rotations_and_loses_no_line(start_llamad, tmp_path):
    data = tmp_path / "data0"
    llama = data / "logs" / "llama"
    llama.mkdir(parents=True)
    (llama / "latest.txt").touch()
    seen = tmp_path / "tail.out"  # a file, not a pipe: a full pipe would stall tail itself
    with open(seen, "wb") as out:
        tail = subprocess.Popen(["tail", "-n", "+1", "-F", "-s", "0.05", str(llama / "latest.txt")],
                                stdout=out, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: opened(tail.pid, llama / "latest.txt"), 10, "tail to open latest.txt")
        daemon = start_llamad({"command": counting_child(tmp_path)}, wait="listening",
                              toml="[logs]\nmax_bytes = 20000\nkeep = 100\n")
        def written(path: Path) -> bytes:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return b""  # latest.txt.new, renamed over latest.txt between the listing and the read

        wait_for(lambda: any(b"line 4000 of" in written(p) for p in llama.iterdir()), 30, "the last line")
        wait_for(lambda: b"line 4000 of" in seen.read_bytes(), 30, "tail to follow to the last line")
    finally:
        tail.send_signal(signal.SIGTERM)
        tail.wait(10)
    numbers = [int(line.split(b"line ")[1].split()[0]) for line in seen.read_bytes().splitlines()
               if b" of the child" in line]
    assert numbers == list(range(1, LINES + 1))
    archives = sorted(p.name for p in llama.iterdir() if p.name.endswith(".log"))
    assert len(archives) >= 5 and all("_server_" in name for name in archives)
    assert all(p.stat().st_size <= 20000 for p in llama.iterdir())
    daemon.stop()


def test_archives_and_boot_logs_are_pruned_to_keep(start_llamad, tmp_path):
    child = counting_child(tmp_path)
    daemon = start_llamad({"command": child}, wait="listening", toml="[logs]\nmax_bytes = 4096\nkeep = 3\n")
    llama = daemon.data_dir / "logs" / "llama"
    wait_for(lambda: b"line 4000 of" in (llama / "latest.txt").read_bytes(), 30, "all lines")
    assert len([p for p in llama.iterdir() if p.name.endswith(".log")]) == 3
    assert daemon.stop() == 0
    boot = daemon.data_dir / "logs" / "_boot"
    latest = (boot / "latest.txt").read_text().strip()
    text = open(latest).read()
    for expected in ("effective config", "GPUs:", "backend start: pid", "[logs]", "max_bytes = 4096"):
        assert expected in text, expected
    for _ in range(4):  # more boots than keep
        # Boot logs are named by the second: the next one's name must sort after every earlier one.
        newest = max(p.name for p in boot.iterdir() if p.name.endswith(".log"))
        wait_for(lambda: utc_stamp() > newest, 5, "a second later than the newest boot log's", interval=0.05)
        again = start_llamad({"command": child}, wait="listening", toml="[logs]\nkeep = 3\n",
                             data_dir=daemon.data_dir)
        assert again.stop() == 0
    assert len([p for p in boot.iterdir() if p.name.endswith(".log")]) == 3


def test_a_failing_volume_is_counted_and_serving_goes_on(start_llamad, tmp_path):
    data = tmp_path / "data0"
    llama = data / "logs" / "llama"
    llama.mkdir(parents=True)
    os.symlink("/dev/full", llama / "latest.txt")  # every write: ENOSPC
    daemon = start_llamad()
    status, body, _ = daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 2})
    assert status == 200
    metrics = daemon.request("GET", "/metrics")[1].decode()
    errors = float(metrics.split("\nllamad_log_write_errors_total ")[1].split()[0])
    assert errors > 0
    assert daemon.request("GET", "/ping", port="health")[0] == 200
    assert daemon.stop() == 0
    assert "failed log writes so far" in daemon.log()


def test_logs_come_back_after_the_log_directory_is_deleted(start_llamad, tmp_path):
    script = tmp_path / "ticking-child"
    script.write_text("#!/bin/sh\ni=1\nwhile [ $i -le 1200 ]; do echo \"tick $i\"; sleep 0.05; i=$((i+1)); done\n"
                      "exec sleep 60\n")
    script.chmod(0o755)
    daemon = start_llamad({"command": str(script)}, wait="listening")
    logs = daemon.data_dir / "logs"
    child_log = logs / "llama" / "latest.txt"
    wait_for(lambda: b"tick 5\n" in child_log.read_bytes(), 30, "the child's first lines")
    shutil.rmtree(logs)
    # Within about a second the open files are found unlinked and made again, directories included.
    wait_for(lambda: child_log.exists() and b"tick" in child_log.read_bytes(), 10, "the child log again")
    pointer = logs / "_boot" / "latest.txt"

    def boot_log_back() -> bool:
        daemon.proc.send_signal(signal.SIGHUP)  # llamad logs the reload: lines for the boot log
        return pointer.exists() and b"SIGHUP: reloading" in Path(pointer.read_text().strip()).read_bytes()

    wait_for(boot_log_back, 10, "the boot log and its pointer again", interval=0.3)
    assert daemon.stop() == 0
