"""systemd: the unit file verifies, and sd_notify speaks over a real unix datagram socket."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from helpers import TWISTD, wait_for

pytestmark = pytest.mark.integration

UNIT = Path(__file__).resolve().parents[2] / "etc" / "llamad.service"


def test_unit_file_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "llamad.service"
    # The unit names /opt/llamad; point it at this venv's twistd so the check can see an executable.
    unit.write_text(UNIT.read_text().replace("/opt/llamad/bin/twistd", TWISTD))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for a bad setting, but names the unit in a warning.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "llamad.service" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems == [], problems
    text = UNIT.read_text()
    for setting in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "WatchdogSec=",
                    "TimeoutStopSec=", "twistd -n --pidfile= llamad --config /etc/llamad/llamad.toml"):
        assert setting in text


def test_sd_notify_ready_status_watchdog_stopping(start_llamad, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    messages: list[str] = []

    def drain() -> list[str]:
        """Every datagram queued so far."""
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    try:
        daemon = start_llamad(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        wait_for(lambda: any("READY=1" in m for m in drain()), 10, "READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={daemon.proc.pid}" in ready and "STATUS=serving" in ready
        assert any("STATUS=backend ready" in m for m in messages)
        # The watchdog keeps coming while the daemon runs: three more pings after READY=1, with no window on when
        # (WatchdogSec=0.2 asks for one every 0.1 s; that interval is tested on a Clock in tests/unit/test_notify.py).
        count = messages.count("WATCHDOG=1")
        wait_for(lambda: drain().count("WATCHDOG=1") >= count + 3, 30, "three more WATCHDOG=1")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
        assert any(m.startswith("STOPPING=1") for m in drain())
    finally:
        sock.close()
