"""The supervisor with a KV cache keeper: saves before the stops llamad decides, restores before READY, and a
refused restore restarts the child clean.  The pure lifecycle, then the service on a fake process reactor."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from twisted.internet import defer

from fakes import SUP, FakeProbe, FakeProcessReactor, make_supervisor
from llamad.config import BackendConfig
from llamad.kv.cache import KVCache
from llamad.kv.slots import SlotClient
from llamad.kv.store import Store
from llamad.supervisor import (
    PROBE_INTERVAL, Lifecycle, RestoreSlots, SaveSlots, Schedule, Spawn, State, Supervisor, Terminate,
)

SLOT_DIR = "/data/state/kv/demo"


class FakeKeeper:
    """A :class:`llamad.supervisor.SlotKeeper` whose saves and restores end when the test says."""

    def __init__(self) -> None:
        self.saves: list[defer.Deferred[None]] = []
        self.restores: list[tuple[bool, defer.Deferred[bool]]] = []
        self.paths = 0
        self.settling: defer.Deferred[None] | None = None

    def spawning(self) -> str | None:
        self.paths += 1
        return SLOT_DIR

    def restore(self, port: int, clean: bool) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.restores.append((clean, d))
        return d

    def save(self, port: int) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.saves.append(d)
        return d

    def settled(self) -> defer.Deferred[None]:
        return self.settling if self.settling is not None else defer.succeed(None)

    def saved(self) -> dict[str, int]:
        return {"slots": len(self.saves), "tokens": 0, "bytes": 0}

    def cleans(self) -> list[bool]:
        return [clean for clean, _ in self.restores]


# --- Lifecycle (no I/O) -------------------------------------------------------------------------------


def test_a_keeping_lifecycle_restores_before_ready_and_saves_before_a_stop() -> None:
    m = Lifecycle(SUP, random=lambda: 1.0, keeps_slots=True)
    assert m.start() == [Spawn()]
    assert m.probed() == [RestoreSlots(clean=False)] and m.state == State.STARTING
    assert m.probed() == []  # one restore at a time
    assert m.restored(True) == [] and m.state == State.READY
    assert m.stop() == [SaveSlots()] and m.state == State.STOPPING
    assert m.stop() == []
    assert m.saved() == [Terminate()]
    assert m.saved() == []
    assert m.exited(1.0, "terminated") == [] and m.state == State.STOPPED


def test_a_refused_restore_stops_the_child_and_the_next_starts_clean() -> None:
    m = Lifecycle(SUP, random=lambda: 1.0, keeps_slots=True)
    m.start()
    m.probed()
    assert m.restored(False) == [Terminate()] and m.state == State.STOPPING
    assert m.exited(1.0, "terminated") == [Spawn()] and m.state == State.STARTING  # not a failure: no backoff
    assert not m.failures
    assert m.probed() == [RestoreSlots(clean=True)]
    m.restored(True)
    m.stop()
    m.saved()
    m.exited(2.0, "terminated")
    m.start()
    assert m.probed() == [RestoreSlots(clean=False)]  # clean once, not for good


def test_a_child_that_dies_restoring_is_a_failed_start_and_the_next_starts_clean() -> None:
    m = Lifecycle(SUP, random=lambda: 1.0, keeps_slots=True)
    m.start()
    m.probed()
    assert m.exited(1.0, "killed by signal SIGABRT") == [Schedule(1.0)] and m.state == State.BACKOFF
    m.timer_fired()
    assert m.probed() == [RestoreSlots(clean=True)]


def test_a_crash_or_a_hang_saves_nothing() -> None:
    m = Lifecycle(SUP, random=lambda: 1.0, keeps_slots=True)
    m.start()
    m.probed()
    m.restored(True)
    assert m.wedged("wedged: no answer", 3.0) == [Terminate(3.0)]
    m.exited(1.0, "terminated")
    m.timer_fired()
    m.probed()
    m.restored(True)
    assert m.exited(2.0, "killed by signal SIGSEGV")[0].delay > 0 and m.state == State.BACKOFF


def test_a_stop_while_starting_or_restoring_saves_nothing() -> None:
    m = Lifecycle(SUP, random=lambda: 1.0, keeps_slots=True)
    m.start()
    m.probed()
    assert m.stop() == [Terminate()]
    assert m.restored(True) == [] and m.state == State.STOPPING  # the late answer changes nothing


def test_without_a_keeper_nothing_changes() -> None:
    m = Lifecycle(SUP, random=lambda: 1.0)
    m.start()
    assert m.probed() == [] and m.state == State.READY
    assert m.stop() == [Terminate()]


# --- the service ----------------------------------------------------------------------------------------


def ready() -> tuple[Supervisor, FakeProcessReactor, FakeProbe, FakeKeeper]:
    """A supervisor whose first child restored its slots and is ready."""
    kv = FakeKeeper()
    sup, reactor, probe = make_supervisor(kv=kv)
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.STARTING and len(kv.restores) == 1
    kv.restores[-1][1].callback(True)
    assert sup.state == State.READY
    return sup, reactor, probe, kv


def test_the_child_gets_a_slot_save_path_from_llamad() -> None:
    sup, reactor, probe = make_supervisor(kv=FakeKeeper())
    sup.startService()
    assert reactor.last.argv[-2:] == ["--slot-save-path", SLOT_DIR]
    plain, plain_reactor, _ = make_supervisor()
    plain.startService()
    assert "--slot-save-path" not in plain_reactor.last.argv


def test_no_slot_save_path_when_the_directory_is_unusable() -> None:
    kv = FakeKeeper()
    kv.spawning = lambda: None  # type: ignore[method-assign]
    sup, reactor, probe = make_supervisor(kv=kv)
    sup.startService()
    assert "--slot-save-path" not in reactor.last.argv and sup.state == State.STARTING


def test_the_restore_comes_before_ready_so_no_request_reaches_the_child_first() -> None:
    kv = FakeKeeper()
    sup, reactor, probe = make_supervisor(kv=kv, start="lazy")
    changes: list[State] = []
    sup.add_listener(lambda old, new: changes.append(new))
    sup.startService()
    reactor.advance(5)
    waiter = sup.wait_ready()
    sup.request_start()
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    assert kv.cleans() == [False] and sup.state == State.STARTING
    assert not waiter.called and changes == [State.STARTING]
    reactor.advance(1)
    assert len(kv.restores) == 1  # the probe does not ask again meanwhile
    kv.restores[0][1].callback(True)
    assert sup.state == State.READY and waiter.called and changes == [State.STARTING, State.READY]
    assert sup.last_start_seconds == pytest.approx(1 + PROBE_INTERVAL)  # the restore is part of the start


def test_a_refused_restore_restarts_the_child_clean_before_it_serves() -> None:
    kv = FakeKeeper()
    sup, reactor, probe = make_supervisor(kv=kv, start="lazy")
    changes: list[State] = []
    sup.add_listener(lambda old, new: changes.append(new))
    sup.startService()
    waiter = sup.wait_ready()
    sup.request_start()
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    first = reactor.last
    kv.restores[0][1].callback(False)
    assert first.signals == ["TERM"] and sup.state == State.STOPPING and not waiter.called
    first.exit(None, signal.SIGTERM)
    assert len(reactor.processes) == 2 and sup.state == State.STARTING  # at once: no backoff
    reactor.advance(PROBE_INTERVAL)
    assert kv.cleans() == [False, True]
    kv.restores[1][1].callback(True)
    assert sup.state == State.READY and waiter.called
    assert State.READY not in changes[:-1] and State.BACKOFF not in changes


def test_unload_saves_before_the_sigterm() -> None:
    sup, reactor, probe, kv = ready()
    child = reactor.last
    sup.unload()
    assert sup.state == State.STOPPING and len(kv.saves) == 1 and child.signals == []
    reactor.advance(60)
    assert child.signals == []  # the keeper's own budget bounds the save, not this
    kv.saves[0].callback(None)
    assert child.signals == ["TERM"]
    child.exit(0)
    assert sup.state == State.STOPPED


def test_restart_saves_then_the_next_child_restores() -> None:
    sup, reactor, probe, kv = ready()
    first = reactor.last
    sup.restart()
    assert len(kv.saves) == 1 and first.signals == []
    kv.saves[0].callback(None)
    assert first.signals == ["TERM"]
    first.exit(0)
    assert len(reactor.processes) == 2
    reactor.advance(PROBE_INTERVAL)
    assert kv.cleans() == [False, False]


def test_stop_service_saves_and_waits_for_the_files_to_settle() -> None:
    sup, reactor, probe, kv = ready()
    kv.settling = defer.Deferred()
    child = reactor.last
    stopped: list[None] = []
    sup.stopService().addCallback(stopped.append)
    assert len(kv.saves) == 1 and child.signals == []
    kv.saves[0].callback(None)
    child.exit(0)
    assert sup.state == State.STOPPED and stopped == []
    kv.settling.callback(None)
    assert stopped == [None]


def test_a_crash_saves_nothing() -> None:
    sup, reactor, probe, kv = ready()
    reactor.last.exit(None, signal.SIGSEGV)
    assert sup.state == State.BACKOFF and kv.saves == []


def test_a_second_shutdown_signal_cuts_the_save_short() -> None:
    sup, reactor, probe, kv = ready()
    child = reactor.last
    d = sup.stopService()
    sup.hurry()
    assert child.signals == ["TERM"]
    kv.saves[0].callback(None)  # its late end changes nothing
    assert child.signals == ["TERM"]
    child.exit(0)
    assert d.called


def test_a_child_that_ends_during_its_save_is_stopped() -> None:
    sup, reactor, probe, kv = ready()
    child = reactor.last
    sup.unload()
    child.exit(None, signal.SIGKILL)
    assert sup.state == State.STOPPED
    kv.saves[0].callback(None)
    assert child.signals == [] and sup.state == State.STOPPED


def test_a_child_that_dies_restoring_restarts_clean_after_its_backoff() -> None:
    kv = FakeKeeper()
    sup, reactor, probe = make_supervisor(kv=kv)
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    reactor.last.exit(None, signal.SIGABRT)
    assert sup.state == State.BACKOFF
    kv.restores[0][1].callback(True)  # the answer of a child now gone
    assert sup.state == State.BACKOFF
    reactor.advance(1.0)
    reactor.advance(PROBE_INTERVAL)
    assert kv.cleans() == [False, True]


def test_the_ready_timeout_covers_the_restore() -> None:
    kv = FakeKeeper()
    sup, reactor, probe = make_supervisor(kv=kv)
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    reactor.advance(30)
    assert reactor.last.signals == ["TERM"] and sup.state == State.STOPPING
    reactor.last.exit(None, signal.SIGTERM)
    assert sup.state == State.BACKOFF and "ready_timeout" in sup.reason


def test_a_failing_keeper_restarts_clean_and_never_blocks_a_stop() -> None:
    kv = FakeKeeper()
    sup, reactor, probe = make_supervisor(kv=kv)
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    kv.restores[0][1].errback(RuntimeError("a bug"))
    assert reactor.last.signals == ["TERM"]
    reactor.last.exit(0)
    reactor.advance(PROBE_INTERVAL)
    kv.restores[1][1].callback(True)
    assert sup.state == State.READY
    sup.unload()
    kv.saves[0].errback(RuntimeError("a bug"))
    assert reactor.last.signals == ["TERM"]


def test_another_kind_of_child_keeps_no_slots() -> None:
    reactor = FakeProcessReactor()
    probe = FakeProbe()
    probe.status = 200
    kv = FakeKeeper()
    backend = BackendConfig(kind="llama-cpp-python", command="python3", model="/models/demo.gguf", ready_timeout=30)
    sup = Supervisor(reactor, reactor, backend, SUP, probe=probe, key="k", new_session=False,
                     base_env={"PATH": "/bin"}, kv=kv)
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY and kv.restores == [] and kv.paths == 0
    assert "--slot-save-path" not in reactor.last.argv


def test_a_slow_save_is_abandoned_at_the_budget_and_the_stop_goes_on(tmp_path: Path) -> None:
    # A real KVCache on the fake child: the budget is its own timer.
    model = tmp_path / "demo.gguf"
    model.write_bytes(b"GGUF")
    reactor = FakeProcessReactor()
    reactor.advance(1000)
    probe = FakeProbe()
    probe.status = 200
    backend = BackendConfig(model=str(model), command=str(model), parallel=2, ready_timeout=30)
    hanging: list[defer.Deferred[tuple[int, bytes]]] = []

    def get(port: int, path: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        return defer.succeed((200, b'[{"id": 0, "is_processing": false, "n_prompt_tokens": 900}]'))

    def post(port: int, path: bytes, body: object, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        hanging.append(defer.Deferred())  # a save that never ends
        return hanging[-1]

    store = Store(str(tmp_path / "state" / "kv"), None, lambda f, *args: defer.maybeDeferred(f, *args))
    kv = KVCache(reactor, store, "demo", backend, SlotClient(reactor, get, post), budget=5.0, env={})
    sup = Supervisor(reactor, reactor, backend, SUP, probe=probe, key="k", new_session=False,
                     base_env={"PATH": "/bin"}, kv=kv)
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY and reactor.last.argv[-1] == kv.dir
    child = reactor.last
    sup.unload()
    assert len(hanging) == 1 and child.signals == []
    reactor.advance(4.99)
    assert child.signals == []
    reactor.advance(0.01)
    assert child.signals == ["TERM"] and kv.stats.saves_abandoned == 1
    child.exit(0)
    assert sup.state == State.STOPPED
