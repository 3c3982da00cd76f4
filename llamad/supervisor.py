"""The llama-server child: lifecycle state machine and the service that runs it.

:class:`Lifecycle` is pure: it takes events (start, ready, exited, ...) and
returns the effects to perform.  :class:`Supervisor` is the thin Twisted
service that performs them: spawn, readiness probe, signals, timers.
Unlike ``twisted.runner.procmon`` it gives up after a crash loop and its
``stopService`` waits until the child is really gone.  With a :class:`SlotKeeper`
(``llamad.kv``), a child's KV cache outlives it: saved before a stop llamad
decides, restored into the next child before it is reported ready.
"""

from __future__ import annotations

import enum
import os
import random as _random
import re
import signal
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from llamad import backends, runfiles
from llamad.backends import Target
from llamad.config import BackendConfig, SupervisorConfig
from llamad.timers import cancel


PROBE_INTERVAL = 0.02  # seconds between readiness polls: short, so a cold start adds little to the first byte
RECENT_LINES = 40  # child output kept to explain an exit
PROBE_TIMEOUT = 1.0  # seconds for one readiness poll
HURRY_STOP_TIMEOUT = 3.0  # SIGTERM-to-SIGKILL once shutdown has been asked for twice
WEDGED_STOP_TIMEOUT = 3.0  # SIGTERM-to-SIGKILL for a child that stopped answering
RESIGNAL_AFTER = 2.0  # seconds from SIGTERM to a second SIGTERM, for a child that missed the first
SERVING_PATH = b"/metrics"  # llama-server answers it from its serving loop (llamad starts it with --metrics)
MISS_CHECK = 0.05  # seconds between checks that a stopping llama-server is still serving
LEFTOVER_POLL = 0.05  # seconds between checks that an earlier boot's child is gone
READY_HINTS = (b"llama_server: listening on", b"server is listening", b"Uvicorn running")


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


class StartFailed(Exception):
    """A start that request waiters were counting on did not reach ready."""


# --- effects ---------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start a new child."""


@dataclass(frozen=True)
class Terminate:
    """SIGTERM the child, SIGKILL it after ``grace`` seconds (default: ``stop_timeout``)."""

    grace: float | None = None


@dataclass(frozen=True)
class Schedule:
    """Fire ``timer_fired`` after ``delay`` seconds (backoff or failed retry)."""

    delay: float


@dataclass(frozen=True)
class CancelTimer:
    """Drop the pending backoff or retry timer."""


@dataclass(frozen=True)
class SaveSlots:
    """Save the ready child's slots, then ``saved`` (the stop goes on)."""


@dataclass(frozen=True)
class RestoreSlots:
    """The child answers: restore the saved slots into it (only learn what it runs, if ``clean``), then
    ``restored``."""

    clean: bool = False


Effect = Spawn | Terminate | Schedule | CancelTimer | SaveSlots | RestoreSlots


class Lifecycle:
    """Supervisor states and transitions, with no I/O.

    stopped -> starting -> ready -> stopping -> stopped, plus backoff after an
    unexpected exit and failed after ``crash_loop_limit`` exits within
    ``crash_loop_window``.

    ``keeps_slots``: the child's KV cache is kept across children.  Starting
    then ends with a restore (``probed``, then ``restored``) and a stop of a
    ready child begins with a save (``saved``); a crash saves nothing.  A
    refused restore stops the child, and the next one starts clean.
    """

    def __init__(self, config: SupervisorConfig, random: Callable[[], float] = _random.random,
                 keeps_slots: bool = False) -> None:
        self.config = config
        self.random = random
        self.keeps_slots = keeps_slots
        self.saving = False  # stopping: the slots are being saved, the SIGTERM waits
        self.restoring = False  # starting: the child answers, the saved slots are being restored
        self.clean_next = False  # the next child restores nothing (the last one refused, or died restoring)
        self.state = State.STOPPED
        self.reason = ""  # why the last child ended (or failed to start)
        self.want_up = False
        self.attempt = 0
        self.failures: deque[float] = deque()
        self.serving = False  # the running child has been ready
        self.lost_serving_child = False  # the last child to end had been serving (a crash, not a failed start)
        self.wedged_reason = ""

    def start(self) -> list[Effect]:
        """Someone wants the child up (eager start, or a request at cold start)."""
        self.want_up = True
        if self.state == State.STOPPED:
            self.state = State.STARTING
            return [Spawn()]
        return []

    def retry(self) -> list[Effect]:
        """Leave ``failed`` now (SIGHUP, admin restart, or the retry timer)."""
        if self.state != State.FAILED:
            return self.start()
        self.failures.clear()
        self.attempt = 0
        self.state = State.STOPPED
        return [CancelTimer(), *self.start()]

    def stop(self) -> list[Effect]:
        self.want_up = False
        if self.state == State.READY and self.keeps_slots:
            self.state = State.STOPPING
            self.saving = True
            return [SaveSlots()]
        if self.state in (State.STARTING, State.READY):
            self.restoring = False
            self.state = State.STOPPING
            return [Terminate()]
        if self.state in (State.BACKOFF, State.FAILED):
            self.state = State.STOPPED
            return [CancelTimer()]
        return []

    def ready(self) -> list[Effect]:
        if self.state == State.STARTING:
            self.state = State.READY
            self.attempt = 0
            self.serving = True
        return []

    def probed(self) -> list[Effect]:
        """The readiness probe answered: ready, or first the saved slots (before any request reaches it)."""
        if self.state != State.STARTING or self.restoring:
            return []
        if not self.keeps_slots:
            return self.ready()
        self.restoring = True
        clean, self.clean_next = self.clean_next, False
        return [RestoreSlots(clean)]

    def restored(self, ok: bool) -> list[Effect]:
        """The restore is over; ``ok`` False: the child refused a file, and its cache may be corrupt."""
        if self.state != State.STARTING or not self.restoring:
            return []
        self.restoring = False
        if ok:
            return self.ready()
        self.clean_next = True
        self.reason = "refused a saved KV cache: restarting it clean"
        self.state = State.STOPPING  # still wanted: its exit starts the clean one, not counted as a failure
        return [Terminate()]

    def saved(self) -> list[Effect]:
        """The slots are saved, or the save budget ran out: the stop goes on."""
        if self.state != State.STOPPING or not self.saving:
            return []
        self.saving = False
        return [Terminate()]

    def wedged(self, reason: str, grace: float) -> list[Effect]:
        """The ready child stopped answering its health checks: replace it (a failure, like a crash)."""
        if self.state != State.READY:
            return []
        self.wedged_reason = self.reason = reason
        self.state = State.STOPPING
        return [Terminate(grace)]

    def ready_timeout(self, seconds: float) -> list[Effect]:
        if self.state != State.STARTING:
            return []
        self.reason = f"not ready within ready_timeout ({seconds:g} s)"
        self.state = State.STOPPING
        return [Terminate()]

    def exited(self, now: float, reason: str) -> list[Effect]:
        """The child is gone (or could not be spawned)."""
        was = self.state
        self.lost_serving_child, self.serving = self.serving, False
        wedged, self.wedged_reason = self.wedged_reason, ""
        self.saving = False
        if self.restoring:  # it died loading its saved slots: the next one must not try them again
            self.restoring = False
            self.clean_next = True
        if was == State.STOPPING and not self.want_up:
            self.state = State.STOPPED
            return []
        if was == State.STOPPING and (wedged or self.reason.startswith("not ready")):
            reason = wedged or self.reason  # the time-out or the hang is the story, not the SIGTERM
        elif was == State.STOPPING:
            # Stopped on purpose, then wanted again before the exit: start anew.
            self.state = State.STOPPED
            return self.start()
        self.reason = reason
        self.failures.append(now)
        while self.failures and self.failures[0] < now - self.config.crash_loop_window:
            self.failures.popleft()
        if len(self.failures) >= self.config.crash_loop_limit:
            self.state = State.FAILED
            retry = self.config.failed_retry_after
            return [Schedule(retry)] if retry > 0 else []
        self.state = State.BACKOFF
        return [Schedule(self.backoff_delay())]

    def backoff_delay(self) -> float:
        """Exponential backoff with jitter: half fixed, half random."""
        base = min(self.config.backoff_max, self.config.backoff_initial * 2**self.attempt)
        self.attempt += 1
        return base * (0.5 + 0.5 * self.random())

    def timer_fired(self) -> list[Effect]:
        if self.state == State.BACKOFF:
            self.state = State.STARTING
            return [Spawn()]
        if self.state == State.FAILED:
            return self.retry()
        return []


# --- exit diagnosis --------------------------------------------------------


def describe_exit(exit_code: int | None, signal_number: int | None) -> str:
    """One line saying how the child ended, with a likely cause."""
    if signal_number is None and exit_code is not None and exit_code > 128:
        signal_number = exit_code - 128  # a wrapper shell's way of saying "killed by"
        how = f"exit code {exit_code}"
    elif signal_number is not None:
        how = "killed by signal"
    else:
        return "exited normally (code 0)" if exit_code == 0 else f"exited with code {exit_code}"
    try:
        name = signal.Signals(signal_number).name
    except ValueError:
        name = f"signal {signal_number}"
    hint = {
        signal.SIGKILL: "likely out of memory (check dmesg / the container's memory limit)",
        signal.SIGSEGV: "crash (segmentation fault)",
        signal.SIGABRT: "aborted (a llama.cpp assertion or fatal error; see the child log)",
        signal.SIGBUS: "crash (bus error: model file truncated or changed while mapped?)",
        signal.SIGILL: "crash (illegal instruction: binary built for another CPU?)",
        signal.SIGTERM: "terminated",
    }.get(signal_number, "")
    text = f"{how} {name}" if how == "killed by signal" else f"{how} ({name})"
    return f"{text}: {hint}" if hint else text


def exit_kind(reason: str) -> str:
    """A bounded label for ``reason``: what ``llamad_backend_restarts_total`` counts by."""
    if reason.startswith("not ready within"):
        return "ready_timeout"
    if reason.startswith("wedged"):
        return "wedged"
    if reason.startswith("spawn failed"):
        return "spawn_failed"
    if "SIGKILL" in reason:
        return "killed"
    if any(name in reason for name in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE")):
        return "crashed"
    if reason.startswith(("killed by signal", "exit code ")):
        return "signalled"
    return "exited"


# --- the service ---------------------------------------------------------------


class ChildOutput(Protocol):
    def child_line(self, line: bytes) -> None: ...


Probe = Callable[[int, bytes, float], "defer.Deferred[int]"]


class SlotKeeper(Protocol):
    """A model's KV cache kept across its children (:class:`llamad.kv.cache.KVCache`)."""

    def spawning(self) -> str | None:
        """A child starts: the directory for its ``--slot-save-path``, made now; None: none this start."""

    def restore(self, port: int, clean: bool) -> defer.Deferred[bool]:
        """The child answers: load the saved slots into it (``clean``: none); False: it refused one.  Never fails."""

    def save(self, port: int) -> defer.Deferred[None]:
        """Save the child's slots; fires within the save budget, never fails."""

    def settled(self) -> defer.Deferred[None]:
        """Fires once what the saves wrote is on disk."""

    def saved(self) -> dict[str, int]:
        """What is saved now: ``slots``, ``tokens``, ``bytes``; from memory."""


_LLAMA_ERROR = re.compile(rb"^\d+\.\d+\.\d+\.\d+ E (.+)$")


def error_line(lines: Iterable[bytes]) -> str:
    """The child's own words for why it failed.

    llama.cpp marks error lines with `` E ``; the first one is the cause (the
    later ones are its consequences).  Other servers: the last line that
    mentions an error.
    """
    recent = list(lines)
    for line in recent:
        m = _LLAMA_ERROR.match(line.strip())
        if m:
            return m.group(1).decode("utf-8", "replace").strip()[:300]
    for word in (b"error", b"failed", b"invalid"):
        for line in reversed(recent):
            if word in line.lower():
                return line.decode("utf-8", "replace").strip()[:300]
    return ""


def free_port() -> int:
    """A free loopback port for the child (the child binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ChildProtocol(ProcessProtocol):
    def __init__(self, owner: Supervisor) -> None:
        self.owner = owner
        self.buffers = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self.buffers.get(childFD, b"") + data).split(b"\n")
        self.buffers[childFD] = lines.pop()
        for line in lines:
            self.owner._child_line(self, line.rstrip(b"\r"))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self.buffers.items():
            if rest:
                self.owner._child_line(self, rest)
        self.buffers = {}
        self.owner._child_ended(self, reason)


class ModelLog(Logger):
    """The supervisor's log: each event names its model (the ``model`` of a JSON log line)."""

    def __init__(self, model_id: str) -> None:
        super().__init__(namespace="llamad.supervisor")
        self.model_id = model_id

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if self.model_id:
            kwargs.setdefault("model", self.model_id)
        super().emit(level, format, **kwargs)


class Supervisor(Service):
    """Runs one backend child through :class:`Lifecycle`.

    :param reactor: spawns the child (``IReactorProcess``).
    :param clock: every timer; a ``Clock`` in tests.
    :param probe: ``probe(port, path, timeout)`` fires with the HTTP status of a GET on the child.
    :param key: the child's API key; written to a 0600 file in ``run_dir`` for each start and
        removed as soon as the child has read it (where that cannot be watched: at ready), or has ended.
    :param run_dir: private runtime folder for the key file and ``<name>.pid``, the record a
        later boot uses to stop a child this one leaves behind.  Empty: none.
    :param kv: keeps the child's KV cache across children (llama-server only); None: off.
    """

    name = "supervisor"
    supervised = True

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        backend: BackendConfig,
        config: SupervisorConfig,
        probe: Probe,
        key: str,
        run_dir: str = "",
        output: ChildOutput | None = None,
        new_session: bool = True,
        random: Callable[[], float] = _random.random,
        base_env: dict[str, str] | None = None,
        child_name: str = "llama",
        kv: SlotKeeper | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.backend = backend
        self.log = ModelLog(backend.model_id)
        self.config = config
        self.probe = probe
        self.key = key
        self.run_dir = run_dir
        self.pid_file = os.path.join(run_dir, f"{child_name}.pid") if run_dir else ""
        self.key_file = ""
        self._key_watch: Callable[[], None] | None = None  # ends the watch for the child reading its key file
        self.output = output
        self.new_session = new_session and bool(backends.new_session_prefix())
        self.base_env = base_env
        self.kv = kv if backend.kind == "llama-server" else None
        self.machine = Lifecycle(config, random, keeps_slots=self.kv is not None)
        self.stop_timeout = config.stop_timeout
        self.process: Any = None
        self.protocol: _ChildProtocol | None = None
        self.port = 0
        self.pid: int | None = None
        self.generation = 0  # one per spawn: a target from an earlier child is never mistaken for this one's
        self._target: Target | None = None  # the last target() and the port it was made for
        self._target_port = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_start_seconds: float | None = None
        self.restarts = 0
        self.health_failures = 0
        self.recent_lines: deque[bytes] = deque(maxlen=RECENT_LINES)
        self._timer: IDelayedCall | None = None
        self._probe_call: IDelayedCall | None = None
        self._probe_busy = False
        self._health_call: IDelayedCall | None = None
        self._ready_deadline: IDelayedCall | None = None
        self._kill_call: IDelayedCall | None = None
        self._resignal_call: IDelayedCall | None = None
        self._term_call: IDelayedCall | None = None  # the SIGTERM, held until the serving loop answers
        self._miss_call: IDelayedCall | None = None  # the next check for a SIGTERM the child missed
        self._watch_missed = False  # the SIGTERM was sent before the serving loop was seen: it may be lost
        self._ready_path = b"/health"
        self._leftover: runfiles.ChildRecord | None = None  # an earlier boot's child, being stopped
        self._leftover_call: IDelayedCall | None = None
        self._spawn_pending = False
        self._saving: defer.Deferred[None] | None = None  # the save a stop waits for
        self._stopped_waiters: list[defer.Deferred[None]] = []
        self._ready_waiters: list[tuple[defer.Deferred[None], int]] = []
        self._listeners: list[Callable[[State, State], None]] = []

    # public surface

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def reason(self) -> str:
        return self.machine.reason

    def add_listener(self, listener: Callable[[State, State], None]) -> None:
        """Call ``listener(old, new)`` on every state change."""
        self._listeners.append(listener)

    def request_start(self, since: float | None = None) -> None:
        self._run(self.machine.start)

    def unload(self) -> None:
        """Stop the child but keep the service: the next request starts it again."""
        self._run(self.machine.stop)

    def restart(self) -> None:
        """Start over now: out of ``failed`` at once, or a fresh child for a running one."""
        if self.state == State.FAILED:
            self._run(self.machine.retry)
        elif self.state in (State.STARTING, State.READY):
            self._run(self.machine.stop)
            self._run(self.machine.start)
        else:
            self._run(self.machine.start)

    def retry(self) -> None:
        """Leave ``failed`` now (SIGHUP); a child in any other state is left as it is."""
        if self.state == State.FAILED:
            self._run(self.machine.retry)

    def startService(self) -> None:
        super().startService()
        self._find_leftover()
        if self.backend.start == "eager":
            self.request_start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._run(self.machine.stop)
        stopped = self.when_stopped()
        kv = self.kv
        if kv is not None:
            stopped.addCallback(lambda _: kv.settled())  # the saved files sealed before the process exits
        return stopped

    def target(self) -> Target:
        """The running child's address (one object per child: every request asks)."""
        target, port = self._target, self.port
        if target is None or port != self._target_port or target.generation != self.generation \
                or target.key != self.key:
            target = self._target = Target(f"http://127.0.0.1:{port}".encode(), self.key, self.generation)
            self._target_port = port
        return target

    def wait_ready(self, newer_than: int | None = None) -> defer.Deferred[None]:
        """Fires when a child is ready; fails with :class:`StartFailed` if its start fails.

        ``newer_than``: a generation whose child could not be reached; wait for a later
        child even while this one still looks ready (its exit has not been seen yet).
        A ready child that crashes does not fail the waiters: they wait for its restart.
        """
        if self.state == State.READY and (newer_than is None or self.generation > newer_than):
            return defer.succeed(None)
        entry: list[tuple[defer.Deferred[None], int]] = []
        d: defer.Deferred[None] = defer.Deferred(lambda _: self._ready_waiters.remove(entry[0]))
        entry.append((d, -1 if newer_than is None else newer_than))
        self._ready_waiters.append(entry[0])
        return d

    def when_stopped(self) -> defer.Deferred[None]:
        """Fires once no child is running and none will be started."""
        if self.state == State.STOPPED and self._leftover is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._stopped_waiters.append(d)
        return d

    # effects

    def _run(self, event: Callable[..., list[Effect]], *args: Any) -> None:
        before = self.state
        effects = event(*args)
        after = self.state
        if after != before:
            self._announce(before, after)
        for effect in effects:
            if isinstance(effect, Spawn):
                self._spawn()
            elif isinstance(effect, Terminate):
                self._terminate(self.stop_timeout if effect.grace is None else min(effect.grace, self.stop_timeout))
            elif isinstance(effect, Schedule):
                self._cancel_timer()
                self._timer = self.clock.callLater(effect.delay, self._run, self.machine.timer_fired)
                self.log.info("backend {state}: next start in {delay:.1f} s", state=self.state.value, delay=effect.delay)
            elif isinstance(effect, CancelTimer):
                self._cancel_timer()
            elif isinstance(effect, SaveSlots):
                self._save_slots()
            elif isinstance(effect, RestoreSlots):
                self._restore_slots(effect.clean)

    def _announce(self, before: State, after: State) -> None:
        if after == State.READY:
            self._ready_deadline = cancel(self._ready_deadline)
            self.ready_at = self.clock.seconds()
            self.last_start_seconds = self.ready_at - (self.started_at or self.ready_at)
            self.log.info("backend ready: pid {pid} port {port}, {secs:.3f} s after spawn",
                     pid=self.pid, port=self.port, secs=self.last_start_seconds)
            self.key_file = self._remove_key_file()  # read at startup (if no watch saw it read): no copy on disk
            self.health_failures = 0
            self._health_call = cancel(self._health_call)
            if self.config.health_interval > 0:
                self._health_call = self.clock.callLater(self.config.health_interval, self._health_check)
        elif after == State.FAILED:
            self.log.error("backend failed: {n} exits within {w:g} s; last: {reason}",
                      n=len(self.machine.failures), w=self.config.crash_loop_window, reason=self.reason)
        for listener in list(self._listeners):
            listener(before, after)
        if after == State.READY:
            self._fire_ready_waiters(None)
        elif (after == State.FAILED or (after == State.STOPPED and not self.running)
              or (after == State.BACKOFF and not self.machine.lost_serving_child)):
            # A start that failed, a crash loop, or the service stopping: waiting longer would not
            # help.  A crash of a serving child keeps them (the restart serves them), and so does an
            # unload: a fleet that evicted the model starts it again when it fits.
            self._fire_ready_waiters(StartFailed(self.reason or f"backend {after.value}"))
        if after == State.STOPPED and self._leftover is None:
            self._fire_stopped_waiters()

    def _fire_ready_waiters(self, error: Exception | None) -> None:
        keep = []
        waiters, self._ready_waiters = self._ready_waiters, keep
        for d, newer_than in waiters:
            if error is not None:
                d.errback(error)
            elif self.generation > newer_than:
                d.callback(None)
            else:
                keep.append((d, newer_than))

    def _fire_stopped_waiters(self) -> None:
        waiters, self._stopped_waiters = self._stopped_waiters, []
        for d in waiters:
            d.callback(None)

    def _cancel_timer(self) -> None:
        self._timer = cancel(self._timer)

    def _spawn(self) -> None:
        if self._leftover is not None:
            self._spawn_pending = True  # after the earlier boot's child is gone (its port, its GPU memory)
            return
        self.port = free_port()
        self.generation += 1
        prefix = backends.new_session_prefix() if self.new_session else []
        try:
            self._write_key_file()
        except OSError as e:
            self.log.error("cannot write the backend's key file in {dir}: {err}", dir=self.run_dir, err=e)
            self._run(self.machine.exited, self.clock.seconds(), f"spawn failed: key file: {e}")
            return
        launch = backends.launch(self.backend, self.port, self.key, self.key_file or os.devnull,
                                 self.base_env, prefix)
        argv = launch.argv
        if self.kv is not None:
            path = self.kv.spawning()
            if path:
                argv = [*argv, "--slot-save-path", path]  # llamad's, after extra_args: the last one wins
        self._ready_path = launch.ready_path
        self.protocol = _ChildProtocol(self)
        self.started_at = self.clock.seconds()
        self.ready_at = None
        try:
            self.process = self.reactor.spawnProcess(self.protocol, argv[0], argv, env=launch.env)
        except OSError as e:
            self.protocol = None
            self.key_file = self._remove_key_file()
            self.log.error("backend spawn failed: {argv0}: {err}", argv0=argv[0], err=e)
            self._run(self.machine.exited, self.clock.seconds(), f"spawn failed: {e}")
            return
        self.pid = self.process.pid
        self._write_record()
        self.log.info("backend start: pid {pid} port {port}: {argv}", pid=self.pid, port=self.port, argv=" ".join(argv))
        self._probe_call = self.clock.callLater(PROBE_INTERVAL, self._probe)
        timeout = self.backend.ready_timeout
        self._ready_deadline = self.clock.callLater(timeout, self._run, self.machine.ready_timeout, timeout)

    def _write_key_file(self) -> None:
        if self.backend.kind != "llama-server":
            return  # llama-cpp-python reads the key from its environment
        if self.run_dir:
            runfiles.ensure_private_dir(self.run_dir)
        _, self.key_file = runfiles.write_key_file(self.run_dir or None, self.key)
        # Gone as soon as the child has read it, not at ready (a large model loads for minutes: a
        # SIGKILLed llamad would leave it until the next boot of this data dir cleans it up).
        path = self.key_file
        self._key_watch = runfiles.when_read(self.reactor, path, lambda: runfiles.remove(path))

    def _remove_key_file(self) -> str:
        if self._key_watch is not None:
            self._key_watch()
            self._key_watch = None
        if self.key_file:
            runfiles.remove(self.key_file)
        return ""

    def _write_record(self) -> None:
        """Note the child in ``<name>.pid``, so a boot after a SIGKILL of llamad can stop it."""
        if not self.pid_file or self.pid is None:
            return
        record = runfiles.record_for(self.pid, self.key_file)
        if record is None:
            return  # gone already: its exit is on the way
        try:
            runfiles.ensure_private_dir(self.run_dir)
            runfiles.write_record(self.pid_file, record)
        except OSError as e:
            self.log.warn("cannot write {path}: {err} (a child left by a SIGKILLed llamad will not be found)",
                     path=self.pid_file, err=e)

    # an earlier boot's child

    def _find_leftover(self) -> None:
        """At boot: stop the child an earlier llamad on this data dir left running, if any."""
        if not self.pid_file:
            return
        record = runfiles.read_record(self.pid_file)
        if record is None:
            return
        if not record.running():
            self._forget(record)
            return
        self.log.warn("found backend pid {pid} left running by an earlier llamad on this data dir: stopping it",
                 pid=record.pid)
        self._leftover = record
        runfiles.signal_group(record.pid, signal.SIGTERM)
        self._leftover_call = self.clock.callLater(LEFTOVER_POLL, self._leftover_check,
                                                   self.clock.seconds() + self.stop_timeout)

    def _leftover_check(self, kill_at: float) -> None:
        record = self._leftover
        assert record is not None
        if record.running():
            if self.clock.seconds() >= kill_at:
                self.log.warn("leftover backend pid {pid} still running after SIGTERM: SIGKILL", pid=record.pid)
                runfiles.signal_group(record.pid, signal.SIGKILL)
                kill_at = float("inf")
            self._leftover_call = self.clock.callLater(LEFTOVER_POLL, self._leftover_check, kill_at)
            return
        self.log.info("leftover backend pid {pid} is gone", pid=record.pid)
        self._leftover_call = None
        self._leftover = None
        self._forget(record)
        if self._spawn_pending:
            self._spawn_pending = False
            if self.state == State.STARTING:
                self._spawn()
        if self.state == State.STOPPED:
            self._fire_stopped_waiters()

    def _forget(self, record: runfiles.ChildRecord) -> None:
        runfiles.remove(self.pid_file)
        if record.key_file and os.path.dirname(record.key_file) == self.run_dir:
            runfiles.remove(record.key_file)

    # readiness, then health while ready

    def _probe(self, hinted: bool = False) -> None:
        self._probe_call = None
        if self.state != State.STARTING or self._probe_busy:
            return
        self._probe_busy = True
        protocol = self.protocol
        d = self.probe(self.port, self._ready_path, PROBE_TIMEOUT)

        def done(status: int | Failure) -> None:
            self._probe_busy = False
            if protocol is not self.protocol or self.state != State.STARTING:
                return
            if status == 200:
                self._run(self.machine.probed)
            elif self._probe_call is None:
                self._probe_call = self.clock.callLater(PROBE_INTERVAL, self._probe)

        d.addBoth(done)

    def _health_check(self) -> None:
        """While ready: a wedged child (a hang, or errors on /health) is replaced after N failures in a row."""
        self._health_call = None
        if self.state != State.READY:
            return
        protocol = self.protocol
        timeout = self.config.health_timeout

        def done(result: int | Failure) -> None:
            if protocol is not self.protocol or self.state != State.READY:
                return
            if result == 200:
                self.health_failures = 0
            else:
                self.health_failures += 1
                if isinstance(result, Failure):
                    why = (f"no answer within {timeout:g} s" if result.check(defer.TimeoutError, defer.CancelledError)
                           else result.getErrorMessage())
                else:
                    why = f"HTTP {result}"
                self.log.warn("backend health check {n}/{limit} failed: {why}", n=self.health_failures,
                         limit=self.config.health_failures, why=why)
                if self.health_failures >= self.config.health_failures:
                    reason = (f"wedged: {self._ready_path.decode()} failed {self.health_failures} times in a row "
                              f"(last: {why})")
                    self.log.error("backend pid {pid} {reason}: restarting it", pid=self.pid, reason=reason)
                    self._run(self.machine.wedged, reason, WEDGED_STOP_TIMEOUT)
                    return
            self._health_call = self.clock.callLater(self.config.health_interval, self._health_check)

        self.probe(self.port, self._ready_path, timeout).addBoth(done)

    def _child_line(self, protocol: _ChildProtocol, line: bytes) -> None:
        if self.output is not None:
            self.output.child_line(line)
        if protocol is self.protocol:
            self.recent_lines.append(line)
        if protocol is self.protocol and self.state == State.STARTING and any(h in line for h in READY_HINTS):
            # The child says it is up: probe now rather than at the next tick.
            self._probe_call = cancel(self._probe_call)
            self._probe()

    # the KV cache

    def _restore_slots(self, clean: bool) -> None:
        """Before the child is reported ready, so that no request reaches it first."""
        assert self.kv is not None
        protocol = self.protocol

        def done(ok: bool | Failure) -> None:
            if isinstance(ok, Failure):
                self.log.failure("backend pid {pid}: KV cache restore", ok, pid=self.pid)
            if protocol is self.protocol and self.state == State.STARTING:
                self._run(self.machine.restored, ok is True)

        self.kv.restore(self.port, clean).addBoth(done)

    def _save_slots(self) -> None:
        """Before a stop llamad decided; the SIGTERM follows when the save is over (bounded by its budget)."""
        assert self.kv is not None
        d = self.kv.save(self.port)
        self._saving = d

        def done(result: None | Failure) -> None:
            if isinstance(result, Failure):
                self.log.failure("backend pid {pid}: KV cache save", result, pid=self.pid)
            if self._saving is d:
                self._saving = None
                self._run(self.machine.saved)

        d.addBoth(done)

    # stopping

    def hurry(self) -> None:
        """Shutdown was asked for twice: the child gets a few seconds after SIGTERM, not stop_timeout."""
        self.stop_timeout = min(self.stop_timeout, HURRY_STOP_TIMEOUT)
        if self._saving is not None:
            self._saving = None
            self.log.info("backend pid {pid}: KV cache save cut short: shutdown asked again", pid=self.pid)
            self._run(self.machine.saved)
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.reset(self.stop_timeout)  # reset, not cancel: the SIGKILL still comes

    def _terminate(self, grace: float) -> None:
        if self.process is None and self._spawn_pending:
            # Stopped while waiting for a leftover child: this one never ran.
            self._spawn_pending = False
            self._run(self.machine.exited, self.clock.seconds(), "stopped before it started")
            return
        self._kill_call = self.clock.callLater(grace, self._kill, grace)
        if self.process is None or self.backend.kind != "llama-server" or self.machine.wedged_reason:
            self._send_term(watch=False)  # nothing to ask, or a hung child that would not answer
            return
        # llama-server installs its SIGTERM handler a moment before its serving loop starts, and the
        # loop's start undoes a stop asked in between: the signal would be lost.  Once the loop has
        # answered, a SIGTERM always lands; a child still loading has no handler yet and ends at once.
        protocol = self.protocol
        self._term_call = self.clock.callLater(PROBE_TIMEOUT, self._send_term, True)

        def answered(status: int | Failure) -> None:
            if protocol is self.protocol and self._term_call is not None:
                self._term_call = cancel(self._term_call)
                self._send_term(watch=status != 200)

        self.probe(self.port, SERVING_PATH, PROBE_TIMEOUT).addBoth(answered)

    def _send_term(self, watch: bool) -> None:
        """SIGTERM now; ``watch``: the serving loop was not seen running first, so the child may miss it."""
        self._term_call = None
        self._signal(signal.SIGTERM)
        if self._kill_call is not None and self._kill_call.getTime() - self.clock.seconds() > RESIGNAL_AFTER:
            self._resignal_call = self.clock.callLater(RESIGNAL_AFTER, self._resignal)
        self._watch_missed = watch
        if self._watch_missed:
            self._miss_call = self.clock.callLater(MISS_CHECK, self._check_missed)

    def _check_missed(self) -> None:
        """A child whose serving loop answers after the SIGTERM missed it: its loop started just after
        the handler ran.  A child that took it answers no more (its loop is over)."""
        self._miss_call = None
        protocol = self.protocol

        def answered(status: int | Failure) -> None:
            if protocol is not self.protocol or not self._watch_missed:
                return  # gone, or the timed second SIGTERM was sent already
            if status == 200:
                self._watch_missed = False
                self._resignal_call = cancel(self._resignal_call)
                self.log.info("backend pid {pid} still serving after SIGTERM (it came as its serving loop started): "
                         "SIGTERM again", pid=self.pid)
                self._signal(signal.SIGTERM)
            else:
                self._miss_call = self.clock.callLater(MISS_CHECK, self._check_missed)

        self.probe(self.port, SERVING_PATH, PROBE_TIMEOUT).addBoth(answered)

    def _resignal(self) -> None:
        """SIGTERM once more, for a missed one that no check caught (a child that does not answer, or
        another server); llama-server takes a second as "exit now".  By then its requests are done."""
        self._resignal_call = None
        self._watch_missed = False
        self._miss_call = cancel(self._miss_call)
        self.log.info("backend pid {pid} still running {t:g} s after SIGTERM: SIGTERM again", pid=self.pid,
                 t=RESIGNAL_AFTER)
        self._signal(signal.SIGTERM)

    def _kill(self, grace: float) -> None:
        self._kill_call = None
        self.log.warn("backend pid {pid} still running {t:g} s after SIGTERM: SIGKILL", pid=self.pid, t=grace)
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.pid is None:
            return
        try:
            if self.new_session:
                try:
                    os.killpg(self.pid, sig)
                    return
                except ProcessLookupError:
                    pass  # not yet its own group leader: signal the process itself
            self.process.signalProcess(signal.Signals(sig).name[3:])
        except (ProcessLookupError, error.ProcessExitedAlready):
            pass

    def _child_ended(self, protocol: _ChildProtocol, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self._probe_call = cancel(self._probe_call)
        self._health_call = cancel(self._health_call)
        self._ready_deadline = cancel(self._ready_deadline)
        self._kill_call = cancel(self._kill_call)
        self._resignal_call = cancel(self._resignal_call)
        self._term_call = cancel(self._term_call)
        self._miss_call = cancel(self._miss_call)
        self._watch_missed = False
        self._saving = None
        value = reason.value
        description = describe_exit(getattr(value, "exitCode", None), getattr(value, "signal", None))
        expected = self.state == State.STOPPING and not self.machine.want_up
        quoted = error_line(self.recent_lines)
        if quoted and not expected:
            description = f"{description}; it said: {quoted}"
        self.recent_lines.clear()
        if self.new_session and self.pid is not None:
            # Anything the child left in its group goes with it.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.key_file = self._remove_key_file()
        if self.pid_file:
            runfiles.remove(self.pid_file)
        log_method = self.log.info if expected else self.log.warn
        log_method("backend exit: pid {pid} {how}", pid=self.pid, how=description)
        self.process = None
        self.protocol = None
        self.pid = None
        if not expected:
            self.restarts += 1
        self._run(self.machine.exited, self.clock.seconds(), description)

    def snapshot(self) -> dict[str, Any]:
        """In-memory state for the health site and /health: no I/O."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_start_seconds": self.last_start_seconds,
            **({"kv": self.kv.saved()} if self.kv is not None else {}),
        }


class ExternalBackend:
    """``backend.kind = "external"``: a server llamad proxies to but does not run.

    It is always taken as ready; starting, stopping and restarting it are not
    llamad's to do, so those do nothing.
    """

    supervised = False
    state = State.READY
    reason = ""
    ready_at: float | None = None
    last_start_seconds: float | None = None

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._target = Target(self.url.encode(), "")

    def target(self) -> Target:
        return self._target

    def request_start(self, since: float | None = None) -> None:
        pass

    def wait_ready(self, newer_than: int | None = None) -> defer.Deferred[None]:
        return defer.succeed(None)

    def unload(self) -> None:
        pass

    def restart(self) -> None:
        pass

    def retry(self) -> None:
        pass

    def add_listener(self, listener: Callable[[State, State], None]) -> None:
        pass  # its state never changes

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state.value, "url": self.url}
