"""Supervisor: the pure lifecycle, and the service driven by a fake process reactor and Clock."""

from __future__ import annotations

import signal
import sys

import pytest
from twisted.internet import defer

from fakes import SUP, FakeProbe, FakeProcessReactor, make_supervisor
from llamad.config import SupervisorConfig
from llamad.supervisor import (
    PROBE_INTERVAL, CancelTimer, Lifecycle, Schedule, Spawn, State, Supervisor, Terminate, describe_exit,
)

# --- Lifecycle (no I/O) -------------------------------------------------------

def machine(random: float = 1.0, **overrides: float) -> Lifecycle:
    cfg = SupervisorConfig(**{**SUP.__dict__, **overrides})
    return Lifecycle(cfg, random=lambda: random)


def test_start_ready_stop():
    m = machine()
    assert m.start() == [Spawn()] and m.state == State.STARTING
    assert m.start() == []  # one start at a time
    assert m.ready() == [] and m.state == State.READY
    assert m.stop() == [Terminate()] and m.state == State.STOPPING
    assert m.exited(5.0, "exited normally (code 0)") == [] and m.state == State.STOPPED


def test_unexpected_exit_backs_off_exponentially_then_fails():
    m = machine()
    m.start()
    assert m.exited(0.0, "crash") == [Schedule(1.0)] and m.state == State.BACKOFF
    assert m.timer_fired() == [Spawn()] and m.state == State.STARTING
    assert m.exited(1.0, "crash") == [Schedule(2.0)]
    m.timer_fired()
    assert m.exited(3.0, "crash again") == [Schedule(300)]
    assert m.state == State.FAILED and m.reason == "crash again"
    assert m.start() == [] and m.state == State.FAILED  # requests do not leave failed
    assert m.timer_fired() == [CancelTimer(), Spawn()] and m.state == State.STARTING


def test_backoff_is_capped_and_jittered():
    m = machine(random=0.0, crash_loop_limit=100)
    delays = []
    for t in range(6):
        m.start() if m.state == State.STOPPED else m.timer_fired()
        delays.append(m.exited(float(t), "crash")[0].delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # half of min(8, 2**n) with random() = 0


def test_ready_resets_backoff_and_old_exits_leave_the_window():
    m = machine()
    m.start()
    m.exited(0.0, "crash")
    m.timer_fired()
    m.ready()
    assert m.exited(100.0, "crash") == [Schedule(1.0)]  # attempt reset by ready
    m.timer_fired()
    assert m.exited(130.0, "crash") == [Schedule(2.0)]  # exit at 0 is outside the 60 s window
    assert m.state == State.BACKOFF


def test_failed_retry_after_zero_stays_failed():
    m = machine(crash_loop_limit=1, failed_retry_after=0)
    m.start()
    assert m.exited(0.0, "bad model") == [] and m.state == State.FAILED
    assert m.retry() == [CancelTimer(), Spawn()]


def test_ready_timeout_terminates_and_counts_as_failure():
    m = machine()
    m.start()
    assert m.ready_timeout(30) == [Terminate()] and m.state == State.STOPPING
    assert m.exited(30.0, "killed by signal SIGTERM") == [Schedule(1.0)]
    assert m.reason == "not ready within ready_timeout (30 s)"


def test_stop_during_backoff_or_failed_cancels_timer():
    m = machine()
    m.start()
    m.exited(0.0, "crash")
    assert m.stop() == [CancelTimer()] and m.state == State.STOPPED


def test_start_while_stopping_restarts_after_exit():
    m = machine()
    m.start()
    m.ready()
    m.stop()
    assert m.start() == []
    assert m.exited(1.0, "terminated") == [Spawn()] and m.state == State.STARTING


@pytest.mark.parametrize(
    "code, sig, expected",
    [
        (0, None, "exited normally (code 0)"),
        (1, None, "exited with code 1"),
        (None, 9, "killed by signal SIGKILL: likely out of memory"),
        (137, None, "exit code 137 (SIGKILL): likely out of memory"),
        (None, 11, "killed by signal SIGSEGV: crash (segmentation fault)"),
        (139, None, "exit code 139 (SIGSEGV): crash"),
    ],
)
def test_describe_exit(code, sig, expected):
    assert describe_exit(code, sig).startswith(expected)


# --- Supervisor service -----------------------------------------------------------

def test_spawn_argv_and_readiness_by_polling():
    sup, reactor, probe = make_supervisor()
    sup.startService()
    child = reactor.last
    assert child.argv[:3] == ["llama-server", "-m", "/models/demo.gguf"]
    assert "--api-key-file" in child.argv and "k" not in child.argv
    assert child.argv[child.argv.index("--alias") + 1] == "demo"
    assert sup.state == State.STARTING
    reactor.advance(PROBE_INTERVAL)
    assert probe.calls == [(sup.port, b"/health")]
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY and len(probe.calls) == 2
    reactor.advance(1)
    assert len(probe.calls) == 2  # no polling once ready


def test_listening_line_triggers_immediate_probe():
    sup, reactor, probe = make_supervisor()
    sup.startService()
    probe.status = 200
    reactor.last.output(b"main: loading\nllama_server: listening on http://127.0.0.1:1\n")
    assert sup.state == State.READY
    assert reactor.seconds() == 0


def test_child_output_lines_are_split_and_flushed():
    lines: list[bytes] = []
    sup, reactor, probe = make_supervisor(lines=lines)
    sup.startService()
    reactor.last.output(b"one\ntw", fd=1)
    reactor.last.output(b"o\r\nthr", fd=1)
    reactor.last.exit(1)
    assert lines == [b"one", b"two", b"thr"]


def test_crash_restarts_with_backoff_and_notifies_listeners():
    sup, reactor, probe = make_supervisor()
    changes = []
    sup.add_listener(lambda old, new: changes.append(new))
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    reactor.last.exit(None, signal.SIGKILL)
    assert sup.state == State.BACKOFF and "out of memory" in sup.reason
    assert sup.restarts == 1
    reactor.advance(0.99)
    assert len(reactor.processes) == 1
    reactor.advance(0.01)
    assert len(reactor.processes) == 2
    reactor.advance(PROBE_INTERVAL)
    assert changes == [State.STARTING, State.READY, State.BACKOFF, State.STARTING, State.READY]


def test_stop_sends_term_then_kill_and_fires_only_when_gone():
    sup, reactor, probe = make_supervisor()
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    child = reactor.last
    d = sup.stopService()
    assert child.signals == ["TERM"] and not d.called
    reactor.advance(1.9)
    assert child.signals == ["TERM"]
    reactor.advance(0.1)
    assert child.signals == ["TERM", "TERM"]  # in case the child missed the first
    reactor.advance(7.9)
    assert child.signals == ["TERM", "TERM"]
    reactor.advance(0.1)
    assert child.signals == ["TERM", "TERM", "KILL"] and not d.called
    child.exit(None, signal.SIGKILL)
    assert d.called and sup.state == State.STOPPED
    assert len(reactor.processes) == 1  # no restart after a requested stop


def test_stop_during_load():
    sup, reactor, probe = make_supervisor()
    sup.startService()
    d = sup.stopService()
    reactor.last.exit(None, signal.SIGTERM)
    assert d.called and sup.state == State.STOPPED
    reactor.advance(100)
    assert len(reactor.processes) == 1


def test_ready_timeout_kills_and_backs_off():
    sup, reactor, probe = make_supervisor()
    sup.startService()
    reactor.advance(30)
    assert reactor.last.signals == ["TERM"]
    reactor.last.exit(None, signal.SIGTERM)
    assert sup.state == State.BACKOFF and "ready_timeout" in sup.reason


def test_spawn_failure_is_a_failed_start():
    sup, reactor, probe = make_supervisor(fail_spawn=FileNotFoundError(2, "No such file", "llama-server"))
    sup.startService()
    assert sup.state == State.BACKOFF and sup.reason.startswith("spawn failed")


def test_lazy_start_waits_for_request_and_wait_ready():
    sup, reactor, probe = make_supervisor(start="lazy")
    sup.startService()
    assert reactor.processes == [] and sup.state == State.STOPPED
    waiter = sup.wait_ready()
    sup.request_start()
    sup.request_start()
    assert len(reactor.processes) == 1  # one shared start
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    assert waiter.called and waiter.result is None


def test_wait_ready_fails_when_the_start_fails():
    sup, reactor, probe = make_supervisor(start="lazy")
    sup.startService()
    waiter = sup.wait_ready()
    failures = []
    waiter.addErrback(failures.append)
    sup.request_start()
    reactor.last.exit(1)
    assert failures and "exited with code 1" in str(failures[0].value)


def test_cancelled_waiter_does_not_cancel_the_start():
    sup, reactor, probe = make_supervisor(start="lazy")
    sup.startService()
    waiter = sup.wait_ready()
    sup.request_start()
    waiter.addErrback(lambda f: None)
    waiter.cancel()
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY


def test_key_file_is_private_and_fresh(tmp_path):
    import os
    import stat

    from llamad.runfiles import write_key_file

    key, path = write_key_file(str(tmp_path))
    other, other_path = write_key_file(str(tmp_path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path).read().strip() == key and len(key) >= 32
    assert key != other and path != other_path


def test_exit_reason_quotes_the_childs_error_line():
    sup, reactor, probe = make_supervisor()
    sup.startService()
    reactor.last.output(b"other: failed to start\nmain: exiting\n")
    reactor.last.exit(1)
    assert sup.reason == "exited with code 1; it said: other: failed to start"


def test_exit_reason_quotes_llama_cpps_first_error_line():
    sup, reactor, probe = make_supervisor()
    sup.startService()
    reactor.last.output(b"0.00.003.821 I srv    load_model: loading model 'm.gguf'\n"
                        b"0.00.003.942 E gguf_init_from_reader: this GGUF file is version 1953849888\n"
                        b"0.00.004.107 E llama_model_load: error loading model\n"
                        b"0.00.004.477 E srv  llama_server: exiting due to model loading error\n")
    reactor.last.exit(1)
    assert sup.reason == "exited with code 1; it said: gguf_init_from_reader: this GGUF file is version 1953849888"


def test_restart_leaves_failed_at_once_and_replaces_a_running_child():
    sup, reactor, probe = make_supervisor()
    sup.config = sup.machine.config = SupervisorConfig(crash_loop_limit=1, failed_retry_after=300)
    sup.startService()
    reactor.last.exit(1)
    assert sup.state == State.FAILED
    sup.restart()
    assert sup.state == State.STARTING and len(reactor.processes) == 2
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    sup.restart()
    assert reactor.last.signals == ["TERM"] and sup.state == State.STOPPING
    reactor.last.exit(None, signal.SIGTERM)
    assert sup.state == State.STARTING and len(reactor.processes) == 3


def test_hurry_shortens_the_wait_before_sigkill():
    sup, reactor, probe = make_supervisor()
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    sup.stopService()
    reactor.advance(1)
    sup.hurry()
    reactor.advance(2.9)
    assert reactor.last.signals == ["TERM", "TERM"]
    reactor.advance(0.1)
    assert reactor.last.signals == ["TERM", "TERM", "KILL"]


@pytest.mark.parametrize("code, sig, kind", [
    (1, None, "exited"), (None, 9, "killed"), (137, None, "killed"), (None, 11, "crashed"), (134, None, "crashed"),
    (None, 15, "signalled"), (143, None, "signalled"),
])
def test_exit_kind_bounds_the_restart_label(code, sig, kind):
    from llamad.supervisor import exit_kind

    assert exit_kind(describe_exit(code, sig)) == kind
    assert exit_kind("not ready within ready_timeout (30 s)") == "ready_timeout"
    assert exit_kind("spawn failed: [Errno 2] No such file") == "spawn_failed"


# --- a crash of a ready child, health checks, runtime files -------------------------

def ready_supervisor(**kw) -> tuple[Supervisor, FakeProcessReactor, FakeProbe]:
    sup, reactor, probe = make_supervisor(**kw)
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY
    return sup, reactor, probe


def test_waiters_survive_the_crash_of_a_ready_child_and_are_served_by_its_restart():
    sup, reactor, probe = ready_supervisor()
    first = sup.target().generation
    waiter = sup.wait_ready(newer_than=first)  # this child refused a connection: it is dying
    assert not waiter.called
    reactor.last.exit(None, signal.SIGKILL)
    assert sup.state == State.BACKOFF and not waiter.called  # a crash, not a failed start
    reactor.advance(1.0)
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY and waiter.called and waiter.result is None
    assert sup.target().generation == first + 1


def test_waiters_fail_when_the_restart_itself_fails():
    sup, reactor, probe = ready_supervisor()
    waiter = sup.wait_ready(newer_than=sup.target().generation)
    failures: list = []
    waiter.addErrback(failures.append)
    reactor.last.exit(None, signal.SIGKILL)
    reactor.advance(1.0)
    reactor.last.output(b"0.00.001.000 E llama_model_load: error loading model\n")
    reactor.last.exit(1)
    assert sup.state == State.BACKOFF
    assert failures and "error loading model" in str(failures[0].value)


def test_wait_ready_for_a_newer_child_ignores_the_current_one():
    sup, reactor, probe = ready_supervisor()
    assert sup.wait_ready().called
    assert not sup.wait_ready(newer_than=sup.target().generation).called
    assert sup.wait_ready(newer_than=sup.target().generation - 1).called


def test_a_wedged_child_is_replaced_after_n_failed_health_checks_in_a_row():
    sup, reactor, probe = ready_supervisor()
    changes = []
    sup.add_listener(lambda old, new: changes.append(new))
    waiter = sup.wait_ready(newer_than=sup.target().generation)
    calls = len(probe.calls)
    reactor.advance(SUP.health_interval)
    assert len(probe.calls) == calls + 1  # checked while ready
    probe.status = 503
    reactor.advance(SUP.health_interval)
    probe.status = 200
    reactor.advance(SUP.health_interval)  # a success resets the count
    assert sup.health_failures == 0
    hung: defer.Deferred[int] = defer.Deferred()
    probe.status = hung  # SIGSTOP: nothing answers
    for _ in range(SUP.health_failures):
        reactor.advance(SUP.health_interval)
        hung.errback(defer.TimeoutError())
        hung = probe.status = defer.Deferred()
    child = reactor.last
    assert sup.state == State.STOPPING and child.signals == ["TERM"]
    assert sup.reason.startswith("wedged: /health failed 3 times in a row (last: no answer within 3 s)")
    reactor.advance(3.0)  # a hung child gets seconds, not stop_timeout
    assert child.signals == ["TERM", "TERM", "KILL"]
    child.exit(None, signal.SIGKILL)
    assert sup.state == State.BACKOFF and sup.reason.startswith("wedged") and sup.restarts == 1
    assert not waiter.called  # requests waiting for the model survive the restart
    probe.status = 200
    reactor.advance(1.0)
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY and waiter.called
    assert changes[:3] == [State.STOPPING, State.BACKOFF, State.STARTING]


def test_health_checks_stop_with_the_child_and_can_be_turned_off():
    sup, reactor, probe = ready_supervisor()
    sup.stopService()
    reactor.last.exit(None, signal.SIGTERM)
    calls = len(probe.calls)
    reactor.advance(SUP.health_interval * 5)
    assert len(probe.calls) == calls
    off = SupervisorConfig(**{**SUP.__dict__, "health_interval": 0})
    sup, reactor, probe = make_supervisor()
    sup.config = sup.machine.config = off
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    calls = len(probe.calls)
    reactor.advance(SUP.health_interval * 5)
    assert len(probe.calls) == calls


def test_key_file_lives_from_spawn_to_ready_and_the_pid_record_until_exit(tmp_path):
    import os

    from llamad import runfiles

    run_dir = str(tmp_path / "run")
    sup, reactor, probe = make_supervisor(run_dir=run_dir)
    sup.startService()
    key_file = reactor.last.argv[reactor.last.argv.index("--api-key-file") + 1]
    assert os.path.dirname(key_file) == run_dir and open(key_file).read().strip() == "k"
    assert oct(os.stat(run_dir).st_mode & 0o777) == "0o700"
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    assert not os.path.exists(key_file)  # the child read it at startup
    reactor.last.exit(1)
    assert not os.path.exists(os.path.join(run_dir, "llama.pid"))
    assert runfiles.read_record(os.path.join(run_dir, "llama.pid")) is None


def test_a_child_left_by_an_earlier_boot_is_stopped_before_the_first_spawn(tmp_path):
    import subprocess

    from llamad import runfiles

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        key_file = run_dir / "key-old"
        key_file.write_text("old\n")
        record = runfiles.record_for(leftover.pid, str(key_file))
        assert record is not None and record.running()
        runfiles.write_record(str(run_dir / "llama.pid"), record)
        sup, reactor, probe = make_supervisor(run_dir=str(run_dir))
        sup.startService()
        assert reactor.processes == [] and sup.state == State.STARTING  # waits: the old one has the GPU
        leftover.wait(10)  # SIGTERM sent at once; reaped here, so /proc shows it gone
        assert leftover.returncode == -signal.SIGTERM
        reactor.advance(0.05)
        assert len(reactor.processes) == 1 and not key_file.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
    # A recycled PID (same PID, another start time) is never signalled.
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stale = runfiles.ChildRecord(other.pid, (runfiles.start_time(other.pid) or 0) + 1, runfiles.boot_id())
        runfiles.write_record(str(run_dir / "llama.pid"), stale)
        sup, reactor, probe = make_supervisor(run_dir=str(run_dir))
        sup.startService()
        assert len(reactor.processes) == 1 and sup._leftover is None  # spawned at once, nothing signalled
        assert not (run_dir / "llama.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_stop_while_an_earlier_boots_child_is_being_stopped(tmp_path):
    import subprocess

    from llamad import runfiles

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    leftover = subprocess.Popen([sys.executable, "-c", ignore_term], start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert leftover.stdout is not None and leftover.stdout.readline() == b"1\n"  # SIGTERM is ignored now
        record = runfiles.record_for(leftover.pid)
        assert record is not None
        runfiles.write_record(str(run_dir / "llama.pid"), record)
        sup, reactor, probe = make_supervisor(run_dir=str(run_dir))
        sup.startService()
        d = sup.stopService()
        assert sup.state == State.STOPPED and not d.called  # the leftover still runs
        reactor.advance(SUP.stop_timeout)  # it ignored SIGTERM: SIGKILL
        leftover.wait(10)
        reactor.advance(0.05)
        assert d.called and reactor.processes == []
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
