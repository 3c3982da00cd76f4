"""Log files on the volume, in llama-gguf-inference's layout, written off the reactor thread.

- ``llama/latest.txt``: the child's stdout and stderr, one UTC-timestamped line
  per line.  At ``logs.max_bytes`` it is renamed to
  ``llama/<UTC ts>_server_<instance>.log`` and a new ``latest.txt`` begins, so
  ``tail -F llama/latest.txt`` follows it; ``logs.keep`` archives are kept.
- ``access/latest.txt``: one JSON line per API request (:mod:`llamad.keys.access`),
  rotated and kept as the child's log, archives ``<UTC ts>_access_<instance>.log``.
- ``_boot/<UTC ts>_boot_<instance>.log``: llamad's own log for this boot, each
  event once; ``_boot/latest.txt`` holds the path of the last boot that bound its
  ports, or of one that failed while no llamad served the data dir (a second
  daemon that fails on a busy port keeps its log but leaves the pointer at the
  serving one's); ``logs.keep`` boot logs are kept.

Text from files and clients (a key id, a path, a request's model name, an
exception's message) can hold control characters: a newline that forges a log
line, an escape sequence that rewrites the terminal of whoever reads the log.
Every log event is escaped where it is written (:func:`escaping`): the boot
log here, and twistd's own log (stdout under ``twistd -n``) through
:func:`twistd_observer`; so is each line of the child's output.  C0 and C1
controls and DEL in an event's values show as ``\\n``, ``\\x1b`` and so on;
only the format strings (llamad's own text) and tracebacks break lines.

Every write happens in one background thread fed by a bounded queue: a slow,
full or vanished volume never stalls the reactor (the health port keeps
answering).  A failed write is counted and reported on stderr at most once a
minute; a full queue drops lines and counts them the same way.  A log file
deleted under the daemon (its directory included) is made again within about a
second of writing, and ``_boot/latest.txt`` with it.
"""

from __future__ import annotations

import functools
import io
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from typing import Any, Callable

from twisted.logger import (
    FileLogObserver, ILogObserver, LegacyLogObserverWrapper, LogEvent, formatEventAsClassicLogText,
)
from zope.interface import implementer

QUEUE_LINES = 10000
WARN_EVERY = 60.0  # seconds between stderr reports of failed writes
CHECK_EVERY = 1.0  # seconds between checks that an open log file is still at its path
REPLAYED_EVENTS = 1 << 16  # the events twisted.logger keeps from before logging began, to replay


def utc_stamp(seconds: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))


def instance_name() -> str:
    """Which worker this is, in log file names: ``INSTANCE_ID`` when set (an operator's explicit name, first
    in llama-gguf-inference too), else RunPod's pod id, else the host name; made safe for a file name."""
    name = os.environ.get("INSTANCE_ID") or os.environ.get("RUNPOD_POD_ID") or socket.gethostname() or "llamad"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def prune(directory: str, suffix: str, keep: int, exclude: str = "") -> None:
    """Delete the oldest ``*suffix`` files beyond ``keep`` (names sort by time)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(suffix) and n != exclude)
    for name in names[: max(0, len(names) - keep)]:
        os.unlink(os.path.join(directory, name))


def write_pointer(pointer: str, target: str) -> None:
    """Atomically make the file ``pointer`` hold the path ``target`` (``_boot/latest.txt``)."""
    with open(pointer + ".tmp", "w", encoding="utf-8") as f:
        f.write(target + "\n")
    os.replace(pointer + ".tmp", pointer)


class WatchedFile:
    """An append-only log file that notices when its path stops leading to it.

    An open descriptor keeps writing into a file whose directory was deleted,
    so about once a second (``clock`` is monotonic) a write first checks that
    the file is still linked at its path, and reopens it (directories
    included) if not.  Used from the writer thread only.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.file: io.FileIO | None = None
        self.checked = 0.0

    def open_file(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.file = open(self.path, "ab", buffering=0)
        self.checked = self.clock()

    def check(self) -> None:
        """Close the file if it is no longer at its path (checked at most every ``CHECK_EVERY`` s)."""
        now = self.clock()
        if self.file is None or now - self.checked < CHECK_EVERY:
            return
        self.checked = now
        try:
            opened = os.fstat(self.file.fileno())
            current = os.stat(self.path)
            gone = opened.st_nlink == 0 or (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino)
        except OSError:
            gone = True
        if gone:
            self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class RotatingFile(WatchedFile):
    """``latest.txt`` plus timestamped archives.  Used from the writer thread only."""

    def __init__(self, directory: str, max_bytes: int, keep: int, instance: str,
                 clock: Callable[[], float] = time.monotonic, kind: str = "server") -> None:
        """``kind``: the archives' middle name, ``<UTC ts>_<kind>_<instance>.log``."""
        super().__init__(os.path.join(directory, "latest.txt"), clock)
        self.kind = kind
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep = keep
        self.instance = instance
        self.size = 0

    def write(self, data: bytes) -> None:
        self.check()
        if self.file is not None and self.size and self.size + len(data) > self.max_bytes:
            self.rotate()
        if self.file is None:
            self.open_file()
            assert self.file is not None
            self.size = self.file.tell()
        self.file.write(data)
        self.size += len(data)

    def rotate(self) -> None:
        """Archive ``latest.txt`` and start a new one; the name never disappears."""
        self.close()
        archive = f"{utc_stamp()}_{self.kind}_{self.instance}.log"
        n = 1
        while os.path.exists(os.path.join(self.directory, archive)):  # two rotations in one second
            archive = f"{utc_stamp()}_{self.kind}_{self.instance}.{n}.log"
            n += 1
        os.link(self.path, os.path.join(self.directory, archive))
        fresh = self.path + ".new"
        open(fresh, "wb").close()
        os.replace(fresh, self.path)  # atomic: `tail -F` sees a new file under the same name
        prune(self.directory, ".log", self.keep)


class AppendFile(WatchedFile):
    """A plain append-only file (the boot log), and the ``pointer`` file that names it once taken.

    When the file has to be created again (its directory was deleted), a
    taken pointer is rewritten too, so ``_boot/latest.txt`` leads to it again.
    """

    def __init__(self, path: str, pointer: str = "", clock: Callable[[], float] = time.monotonic,
                 keep: int = 0) -> None:
        """``keep``: the boot logs :meth:`take_pointer` leaves (0: no pruning)."""
        super().__init__(path, clock)
        self.pointer = pointer
        self.keep = keep
        self.pointing = False  # the pointer names this file
        self.repoint = False  # the file was created again and the pointer not yet rewritten

    def take_pointer(self) -> None:
        """Make the pointer name this file and prune the oldest boot logs (this one counts in ``keep``).

        A boot that failed beside a serving daemon must not: it would point at
        its own error and prune the log of the daemon that holds the ports.
        """
        self.pointing = True
        directory = os.path.dirname(self.path)
        if self.keep:
            prune(directory, ".log", self.keep - 1, exclude=os.path.basename(self.path))
        write_pointer(self.pointer, self.path)

    def write(self, data: bytes) -> None:
        self.check()
        if self.file is None:
            self.repoint = self.repoint or not os.path.exists(self.path)
            self.open_file()
            if self.repoint and self.pointing:
                write_pointer(self.pointer, self.path)
            self.repoint = False
        assert self.file is not None
        self.file.write(data)


class LogWriter:
    """One thread that owns every log file; the reactor only enqueues."""

    def __init__(self, on_error: Callable[[], None] = lambda: None) -> None:
        self.files: dict[str, RotatingFile | AppendFile] = {}
        # (file name, bytes to write), (file name, what to call on the writer thread), or None: stop.
        self.queue: queue.Queue[tuple[str, bytes | Callable[[], None]] | None] = queue.Queue(QUEUE_LINES)
        self.on_error = on_error
        self.errors = 0
        self.dropped = 0
        self._last_warning = 0.0
        self.thread = threading.Thread(target=self._run, name="llamad-logs", daemon=True)

    def add(self, name: str, target: RotatingFile | AppendFile) -> None:
        self.files[name] = target

    def start(self) -> None:
        self.thread.start()

    def put(self, name: str, data: bytes) -> None:
        """Queue ``data`` for file ``name``; never blocks."""
        try:
            self.queue.put_nowait((name, data))
        except queue.Full:
            self.dropped += 1
            self._failed("log queue full (volume too slow?): line dropped")

    def take_pointer(self, name: str = "boot") -> None:
        """Have the boot log ``name`` take its pointer, in order with the lines queued before."""
        target = self.files[name]
        if isinstance(target, AppendFile) and target.pointer:
            self.queue.put((name, target.take_pointer))  # blocks at most while the queue is full: once, at boot

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is queued (bounded wait), then close the files."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                break
            name, data = item
            try:
                if callable(data):
                    data()
                else:
                    self.files[name].write(data)
            except Exception as e:  # the thread must outlive any one bad write
                try:
                    self.files[name].close()  # reopen on the next line: the volume may come back
                except OSError:
                    pass
                self._failed(f"cannot write {name} log: {e}")
        for target in self.files.values():
            try:
                target.close()
            except OSError:
                pass

    def _failed(self, message: str) -> None:
        self.errors += 1
        self.on_error()
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY or not self._last_warning:
            self._last_warning = now
            # Straight to fd 2: under twistd, sys.stderr feeds the (failing) log itself.
            os.write(2, f"llamad: warning: {message} ({self.errors} failed log writes so far)\n".encode())


class ChildLog:
    """A child's output lines, stamped and queued for ``llama/latest.txt`` (a fleet: ``llama/<id>/latest.txt``)."""

    def __init__(self, writer: LogWriter, name: str = "child") -> None:
        self.writer = writer
        self.name = name

    def child_line(self, line: bytes) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()).encode()
        self.writer.put(self.name, stamp + b"Z " + escape_bytes(line) + b"\n")


def model_log(writer: LogWriter, logs_dir: str, model_id: str, max_bytes: int, keep: int) -> ChildLog:
    """The child log of one model of a fleet: ``llama/<id>/latest.txt``, rotated like the one-model log."""
    name = f"child:{model_id}"
    writer.add(name, RotatingFile(os.path.join(logs_dir, "llama", model_id), max_bytes, keep, instance_name()))
    return ChildLog(writer, name)


class _QueuedText:
    """A text stream for ``FileLogObserver`` that hands lines to the writer thread."""

    def __init__(self, writer: LogWriter, name: str) -> None:
        self.writer = writer
        self.name = name

    def write(self, text: str) -> None:
        self.writer.put(self.name, text.encode("utf-8", "replace"))

    def flush(self) -> None:
        pass


def open_logs(logs_dir: str, max_bytes: int, keep: int, on_error: Callable[[], None],
              clock: Callable[[], float] = time.monotonic) -> tuple[LogWriter, str]:
    """Start the writer with the child log and this boot's log; returns it and the boot log's path.

    ``_boot/latest.txt`` names the boot log only once the ports are bound (:meth:`LogWriter.take_pointer`).
    """
    instance = instance_name()
    boot_dir = os.path.join(logs_dir, "_boot")
    llama_dir = os.path.join(logs_dir, "llama")
    writer = LogWriter(on_error)
    writer.add("child", RotatingFile(llama_dir, max_bytes, keep, instance, clock))
    boot_path = os.path.abspath(os.path.join(boot_dir, f"{utc_stamp()}_boot_{instance}.log"))
    try:
        os.makedirs(boot_dir, exist_ok=True)
        os.makedirs(llama_dir, exist_ok=True)
        open(os.path.join(llama_dir, "latest.txt"), "ab").close()  # `tail -F` can start at once
        boot_path = new_file(boot_path)
    except OSError as e:
        writer._failed(f"cannot prepare the log directory {logs_dir}: {e}")
    writer.add("boot", AppendFile(boot_path, os.path.join(boot_dir, "latest.txt"), clock, keep))
    writer.start()
    return writer, boot_path


def new_file(path: str) -> str:
    """Create ``path``, or ``<name>.1.log``, ``.2``... when it exists: a second daemon started in the same
    second (one that fails on a busy port) never writes into the first one's boot log."""
    stem, suffix = os.path.splitext(path)
    candidate, n = path, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{stem}.{n}{suffix}"


def access_log(writer: LogWriter, logs_dir: str, max_bytes: int, keep: int) -> Callable[[bytes], None]:
    """``access/latest.txt`` (rotated like the child's log); returns what takes one line."""
    directory = os.path.join(logs_dir, "access")
    writer.add("access", RotatingFile(directory, max_bytes, keep, instance_name(), kind="access"))
    try:
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, "latest.txt"), "ab").close()  # `tail -F` can start at once
    except OSError as e:
        writer._failed(f"cannot prepare the access log directory {directory}: {e}")
    return functools.partial(writer.put, "access")


@implementer(ILogObserver)
class BootObserver:
    """llamad's own log events, formatted as twistd does and escaped, into this boot's log, each once.

    It watches the global publisher from the start of the boot, so that a boot
    that fails before twistd starts logging still leaves its log.  When twistd
    does start logging, Twisted replays every event logged so far to the whole
    publisher, this observer included: an event already written is skipped
    (the replay hands on the very same event objects).  :meth:`logging_began`
    ends that watch once the replay is over.
    """

    def __init__(self, writer: LogWriter) -> None:
        self.observer = escaping(FileLogObserver(_QueuedText(writer, "boot"), formatEventAsClassicLogText))
        self.seen: dict[int, LogEvent] | None = {}  # id -> event, kept alive so that no id is reused

    def __call__(self, event: LogEvent) -> None:
        if self.seen is not None:
            if self.seen.get(id(event)) is event:
                return
            self.seen[id(event)] = event
            if len(self.seen) > REPLAYED_EVENTS:  # more than Twisted keeps to replay: a boot that never ends
                self.seen = None
        self.observer(event)

    def logging_began(self) -> None:
        """Twisted's replay is over: stop remembering events."""
        self.seen = None


def boot_observer(writer: LogWriter) -> BootObserver:
    """llamad's own log events into this boot's log (:class:`BootObserver`)."""
    return BootObserver(writer)


# --- escaping what comes from outside -------------------------------------------------------------

_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # newline and tab kept
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def escape(text: str, lines: bool = False) -> str:
    """``text`` with every C0 and C1 control character and DEL written as Python writes it in a string
    literal (``\\n``, ``\\x1b``, ``\\x85``); ``lines``: newlines and tabs stay as they are."""
    return (_CONTROLS_BUT_LINES if lines else _CONTROLS).sub(_escape_one, text)


_BYTE_CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|\xc2[\x80-\x9f]")  # C1 as UTF-8 writes it


def _escape_byte(match: re.Match[bytes]) -> bytes:
    c = match.group()[-1]
    return {0x0a: b"\\n", 0x0d: b"\\r"}.get(c) or b"\\x%02x" % c


def escape_bytes(line: bytes) -> bytes:
    """A child's output line with its C0 and C1 controls and DEL escaped as :func:`escape` writes them,
    tabs kept: the child may quote a client, and its log is read in terminals too."""
    return _BYTE_CONTROLS.sub(_escape_byte, line)


class Lines(str):
    """Text llamad formatted itself over several lines (the effective config): logged with its line
    breaks, every other control character escaped."""


class _Escaped:
    """An event's value that is not text, as a formatter sees it: whatever text it turns into comes out
    escaped (``{x}``, ``{x!r}``, ``{x:.2f}``, ``{x.attr}``, ``{x[0]}`` and ``{x()}`` alike)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return escape(format(self.value, spec))

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return escape(repr(self.value))

    def __getattr__(self, name: str) -> _Escaped:
        return _Escaped(getattr(self.value, name))

    def __getitem__(self, key: Any) -> _Escaped:
        return _Escaped(self.value[key])

    def __call__(self, *args: Any, **kwargs: Any) -> _Escaped:
        return _Escaped(self.value(*args, **kwargs))


class _EscapedText(str):
    """An event's text, escaped, and still a ``str`` to whatever observer reads it; ``{x!r}`` is the
    original's repr (which escapes its own way), not the repr of the escaped text."""

    original: str

    def __new__(cls, original: str, lines: bool = False) -> _EscapedText:
        text = super().__new__(cls, escape(original, lines))
        text.original = original
        return text

    def __repr__(self) -> str:
        return escape(repr(self.original))


class _EscapedFailure:
    """A logged failure whose traceback (an exception's message may quote a client) comes out escaped."""

    def __init__(self, failure: Any) -> None:
        self.failure = failure

    def __getattr__(self, name: str) -> Any:
        return getattr(self.failure, name)

    def getTraceback(self, *args: Any, **kwargs: Any) -> str:
        return escape(self.failure.getTraceback(*args, **kwargs), lines=True)


_PLAIN = (int, float, bool, type(None))  # nothing to escape in what these format to
_TEXT_FIELDS = ("log_text", "log_io", "log_system")  # twisted's own keys that carry outside text


def escape_event(event: LogEvent) -> LogEvent:
    """A copy of ``event`` that formats to text with no control character but the format string's own
    line breaks (and the tracebacks').  Twisted's ``log_*`` keys stay as they are but for the text ones."""
    safe = dict(event)
    for key, value in event.items():
        if key.startswith("log_"):
            if key in _TEXT_FIELDS and isinstance(value, str):
                safe[key] = escape(value, lines=True)
            elif key == "log_failure" and value is not None:
                safe[key] = _EscapedFailure(value)
        elif isinstance(value, str):
            safe[key] = _EscapedText(value, lines=isinstance(value, Lines))
        elif not isinstance(value, _PLAIN):
            safe[key] = _Escaped(value)
    return safe


@implementer(ILogObserver)
class _EscapingObserver:
    """An observer that hands on each event escaped (a copy: other observers see it as it was logged)."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        self.observer(escape_event(event))


def escaping(observer: Any) -> ILogObserver:
    """``observer`` (new or legacy) given each event escaped."""
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return _EscapingObserver(observer)


def twistd_observer(server_options: Any) -> ILogObserver | None:
    """The log observer twistd would start with ``server_options`` (stdout under ``-n``, else
    ``--logfile`` or syslog), escaped; None where twistd's own choice stands (``--logger``, or no twistd).

    twistd takes an ``ILogObserver`` component of the application before its own choice, so llamad
    hands it this one; the choice itself is twistd's, made by its own logger class.
    """
    if server_options is None or server_options.get("logger"):
        return None
    from twisted.scripts.twistd import _SomeApplicationRunner

    make = getattr(_SomeApplicationRunner.loggerFactory(server_options), "_getLogObserver", None)
    return escaping(make()) if make is not None else None


def gpu_inventory(timeout: float = 5.0) -> str:
    """``nvidia-smi``'s view of the GPUs, or why there is none (run once, at boot)."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on PATH (no NVIDIA GPU, or drivers not mounted)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    return Lines(out.stdout.strip() or out.stderr.strip() or f"nvidia-smi exited {out.returncode}")
