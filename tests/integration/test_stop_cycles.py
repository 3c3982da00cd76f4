"""Fast start-then-stop cycles of a real llama-server, through llamad's Supervisor in this process.

A stop that lands just as the child starts serving is the hard case: llama-server installs its
SIGTERM handler a moment before its serving loop starts, and the loop's start undoes what the
handler asked, so a SIGTERM in between is lost and only a second one ends the child.  Each cycle
stops the child at one of the two moments around that: as soon as it says "model loaded" (its
handler is about to be installed) and as soon as it is ready.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import provider

from helpers import alive
from llamad import runfiles
from llamad.config import BackendConfig, SupervisorConfig
from llamad.supervisor import RESIGNAL_AFTER, SERVING_PATH, State, Supervisor
from llamad.tap import make_probe

pytestmark = pytest.mark.integration

CYCLES = 40
SLOW = 1.5  # seconds from the stop to the child's exit: far above a clean stop, below the timed second SIGTERM
LOADED = b"model loaded"  # llama-server's line just before it installs its SIGTERM handler
SECOND = b"Received second interrupt"  # llama-server's line when a second SIGTERM ends it at once


class Lines:
    """The child's output, with a hook for the line that triggers a stop."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.on_loaded = lambda: None

    def child_line(self, line: bytes) -> None:
        self.lines.append(line)
        if LOADED in line:
            self.on_loaded()


@provider(ILogObserver)
class Resignals:
    """Counts llamad's "SIGTERM again" lines, by cycle."""

    def __init__(self) -> None:
        self.cycle = 0
        self.cycles: list[int] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "llamad.supervisor" and "SIGTERM again" in event.get("log_format", ""):
            self.cycles.append(self.cycle)


class Probe:
    """llamad's probe; with ``blind``, each child's first check of its serving loop fails."""

    def __init__(self, key: str) -> None:
        self.real = make_probe(reactor, key)
        self.blind = False
        self.checked: set[int] = set()

    def __call__(self, port: int, path: bytes, timeout: float) -> defer.Deferred[int]:
        if path == SERVING_PATH and self.blind and port not in self.checked:
            self.checked.add(port)
            return defer.succeed(503)
        return self.real(port, path, timeout)


@pytest.fixture
def supervisor(tmp_path: Path, demo_model: str, llama_server_bin: str) -> tuple[Supervisor, Lines, Probe]:
    """A lazy Supervisor of the demo model, its output, and its probe."""
    key = runfiles.new_key()
    probe = Probe(key)

    backend = BackendConfig(command=llama_server_bin, model=demo_model, context=256, parallel=1, threads=1,
                            start="lazy", ready_timeout=60)
    config = SupervisorConfig(stop_timeout=10, health_interval=0, crash_loop_limit=1000)
    output = Lines()
    sup = Supervisor(reactor, reactor, backend, config, probe=probe, key=key, run_dir=str(tmp_path / "run"),
                     output=output)
    return sup, output, probe


async def cycles(sup: Supervisor, output: Lines) -> tuple[list[tuple[int, str, float]], list[int]]:
    """Start then stop ``CYCLES`` times: the stops that took over ``SLOW`` s, and those that needed two SIGTERMs."""
    resignals = Resignals()
    globalLogPublisher.addObserver(resignals)
    sup.startService()
    pids: list[int] = []
    slow: list[tuple[int, str, float]] = []
    second: list[int] = []
    try:
        for cycle in range(CYCLES):
            resignals.cycle = cycle
            at_loaded = cycle % 2 == 0
            stopped: defer.Deferred[None] = defer.Deferred()
            asked: list[float] = []

            def stop() -> None:
                if not asked and sup.state in (State.STARTING, State.READY):
                    asked.append(time.monotonic())
                    sup.unload()

            def changed(old: State, new: State) -> None:
                if new == State.READY and not at_loaded:
                    reactor.callLater(0, stop)
                elif new in (State.STOPPED, State.BACKOFF, State.FAILED) and not stopped.called:
                    stopped.callback(None)

            sup._listeners[:] = [changed]
            output.on_loaded = (lambda: reactor.callLater(0, stop)) if at_loaded else (lambda: None)
            first_line = len(output.lines)
            sup.request_start()
            if sup.pid:
                pids.append(sup.pid)
            await stopped
            assert asked and sup.state == State.STOPPED, f"cycle {cycle}: {sup.state.value}: {sup.reason}"
            took = time.monotonic() - asked[0]
            if took > SLOW:
                slow.append((cycle, "at model loaded" if at_loaded else "at ready", round(took, 3)))
            if cycle in resignals.cycles or any(SECOND in line for line in output.lines[first_line:]):
                second.append(cycle)
    finally:
        globalLogPublisher.removeObserver(resignals)
        await sup.stopService()
    assert not [pid for pid in pids if alive(pid)], "a child outlived its stop"
    return slow, second


@pytest_twisted.ensureDeferred
async def test_a_stop_just_as_the_child_starts_serving_takes_one_sigterm(supervisor) -> None:
    sup, output, _ = supervisor
    slow, second = await cycles(sup, output)
    assert not slow and not second, (
        f"of {CYCLES} stops, {len(second)} needed a second SIGTERM and {len(slow)} took over {SLOW} s "
        f"(the timed second SIGTERM comes {RESIGNAL_AFTER:g} s after the first): {slow}")


@pytest_twisted.ensureDeferred
async def test_a_missed_sigterm_is_sent_again_as_soon_as_the_child_is_seen_serving(supervisor) -> None:
    # Each stop's check of the serving loop fails, so the SIGTERM goes at once, in the window included.
    sup, output, probe = supervisor
    probe.blind = True
    slow, second = await cycles(sup, output)
    assert not slow, f"{len(slow)} of {CYCLES} stops took over {SLOW} s ({len(second)} needed a second SIGTERM): {slow}"
