"""sd_notify on a Clock: the WATCHDOG=1 interval, and when the watchdog is off.

A real unix datagram socket receives what Notifier sends; only time is fake.
tests/integration/test_systemd.py checks the same messages arrive from a real
``twistd llamad``, without counting them in a wall-clock window.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from llamad.notify import Notifier


class Listener:
    """The systemd side: a bound datagram socket and everything it has received."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def watchdogs(self) -> int:
        return self.drain().count("WATCHDOG=1")


@pytest.fixture
def listener() -> Iterator[Listener]:
    with tempfile.TemporaryDirectory() as tmp:  # short: a unix socket path is at most 107 bytes
        server = Listener(os.path.join(tmp, "notify.sock"))
        try:
            yield server
        finally:
            server.sock.close()


def started(listener: Listener, **env: str) -> tuple[Notifier, Clock]:
    clock = Clock()
    notifier = Notifier(clock, {"NOTIFY_SOCKET": listener.path, **env})
    notifier.startService()
    return notifier, clock


def test_watchdog_every_half_watchdog_usec(listener: Listener) -> None:
    notifier, clock = started(listener, WATCHDOG_USEC="200000")  # 0.2 s: a ping every 0.1 s
    assert listener.watchdogs() == 1  # at once on start
    clock.advance(0.099)
    assert listener.watchdogs() == 1
    clock.advance(0.001)
    assert listener.watchdogs() == 2
    for _ in range(10):
        clock.advance(0.1)
    assert listener.watchdogs() == 12
    notifier.stopService()
    clock.advance(10)
    assert listener.watchdogs() == 12 and clock.getDelayedCalls() == []  # nothing after stop


def test_a_long_watchdog_interval_is_honoured(listener: Listener) -> None:
    notifier, clock = started(listener, WATCHDOG_USEC="30000000")  # WatchdogSec=30: every 15 s
    clock.advance(14.9)
    assert listener.watchdogs() == 1
    clock.advance(0.1)
    assert listener.watchdogs() == 2
    notifier.stopService()


@pytest.mark.parametrize("env", [
    {},  # no WatchdogSec in the unit
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": ""},
    {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},  # meant for another process
])
def test_no_watchdog_unless_asked_for_this_process(listener: Listener, env: dict[str, str]) -> None:
    notifier, clock = started(listener, **env)
    notifier.status("serving")
    clock.advance(60)
    assert listener.drain() == ["STATUS=serving"]  # the socket works; only the watchdog is off
    assert clock.getDelayedCalls() == []
    notifier.stopService()


def test_watchdog_pid_of_this_process_keeps_it(listener: Listener) -> None:
    notifier, clock = started(listener, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid()))
    clock.advance(0.1)
    assert listener.watchdogs() == 2
    notifier.stopService()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    clock = Clock()
    notifier = Notifier(clock, {"WATCHDOG_USEC": "200000"})
    notifier.startService()
    notifier.ready("serving")
    notifier.stopping()
    assert not notifier.enabled and clock.getDelayedCalls() == []
    notifier.stopService()


def test_ready_status_and_stopping_messages(listener: Listener) -> None:
    notifier, clock = started(listener)
    notifier.ready("serving")
    notifier.status("backend ready")
    notifier.stopping()
    notifier.stopService()
    assert listener.drain() == [
        f"READY=1\nSTATUS=serving\nMAINPID={os.getpid()}",
        "STATUS=backend ready",
        "STOPPING=1\nSTATUS=shutting down",
    ]


def test_a_lost_datagram_is_logged_not_raised(listener: Listener) -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        notifier, clock = started(listener, WATCHDOG_USEC="200000")
        listener.sock.close()
        os.unlink(listener.path)  # systemd went away: sendto fails with ENOENT
        clock.advance(0.1)  # the watchdog tick must not break the LoopingCall
        notifier.status("still serving")
        clock.advance(0.1)
        assert len(clock.getDelayedCalls()) == 1  # still ticking
        notifier.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if e.get("log_namespace") == "llamad.notify"]
    assert len(failures) == 3 and all("sd_notify to" in formatEvent(e) for e in failures)
