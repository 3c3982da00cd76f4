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

With ``logs.format = "json"`` every line of these files and of twistd's log
(stdout under ``twistd -n``) is one JSON object, made by :func:`json_line`:
``time`` (RFC 3339 UTC, milliseconds), ``level``, ``source`` (the Twisted
namespace of llamad's own events, ``child`` for a child's line, ``access``
for the access log), ``model`` where the line is about one, ``message`` (the
text the text format shows, escaped the same way), ``traceback`` for a
failure, then the event's own fields.  A child's lines are wrapped in its
file too (one format per file, so a collector parses every line alike), and
are also sent to twistd's log, where a container's collector reads them.

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
import json as _json
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Mapping

from twisted.logger import (
    FileLogObserver, ILogObserver, LegacyLogObserverWrapper, LogEvent, LogLevel, formatEvent,
    formatEventAsClassicLogText, globalLogPublisher,
)
from zope.interface import implementer

QUEUE_LINES = 10000
WARN_EVERY = 60.0  # seconds between stderr reports of failed writes
CHECK_EVERY = 1.0  # seconds between checks that an open log file is still at its path
REPLAYED_EVENTS = 1 << 16  # the events twisted.logger keeps from before logging began, to replay
CHILD_SOURCE = "child"  # the namespace of a child's lines sent to twistd's log (JSON format only)


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

    def __init__(self, on_error: Callable[[], None] = lambda: None, json: bool = False) -> None:
        """``json``: the log format chosen for every file (and the sinks made on this writer by default)."""
        self.json = json
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
            text = f"{message} ({self.errors} failed log writes so far)"
            line = (json_line(time.time(), "warn", "llamad.logs", text, {"failed_writes": self.errors})
                    if self.json else f"llamad: warning: {text}\n")
            os.write(2, line.encode("utf-8", "replace"))


class ChildLog:
    """A child's output lines, stamped and queued for ``llama/latest.txt`` (a fleet: ``llama/<id>/latest.txt``).

    In the JSON format each line is wrapped (source ``child``, the model's id) in its file, and also
    published to Twisted's log, so that twistd's log (stdout under ``-n``) carries every model's lines
    with their model; the boot log leaves them out.  The text format writes the file only, as always.
    """

    def __init__(self, writer: LogWriter, name: str = "child", model_id: str = "", json: bool | None = None,
                 publish: Callable[[LogEvent], None] | None = None) -> None:
        """``json``: None follows the writer; ``publish``: where the JSON lines go besides the file (Twisted's
        global log publisher unless a test gives its own)."""
        self.writer = writer
        self.name = name
        self.model_id = model_id
        self.json = getattr(writer, "json", False) if json is None else json
        self.publish = publish if publish is not None else globalLogPublisher

    @property
    def path(self) -> str:
        """The file the lines go to."""
        return self.writer.files[self.name].path

    def child_line(self, line: bytes) -> None:
        if not self.json:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()).encode()
            self.writer.put(self.name, stamp + b"Z " + escape_bytes(line) + b"\n")
            return
        now = time.time()
        text = escape_bytes(line).decode("utf-8", "backslashreplace")
        model = self.model_id or None
        self.writer.put(self.name, json_line(now, "info", CHILD_SOURCE, text, model=model).encode())
        event: dict[str, Any] = {"log_namespace": CHILD_SOURCE, "log_level": LogLevel.info, "log_time": now,
                                 "log_format": "{log_text}", "log_text": text, "log_source": None}
        if model is not None:
            event["model"] = model
        self.publish(event)


def model_log(writer: LogWriter, logs_dir: str, model_id: str, max_bytes: int, keep: int,
              json: bool | None = None) -> ChildLog:
    """The child log of one model of a fleet: ``llama/<id>/latest.txt``, rotated like the one-model log.
    ``json``: None follows the writer."""
    name = f"child:{model_id}"
    writer.add(name, RotatingFile(os.path.join(logs_dir, "llama", model_id), max_bytes, keep, instance_name()))
    return ChildLog(writer, name, model_id=model_id, json=json)


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
              clock: Callable[[], float] = time.monotonic, json: bool = False) -> tuple[LogWriter, str]:
    """Start the writer with the child log and this boot's log; returns it and the boot log's path.

    ``_boot/latest.txt`` names the boot log only once the ports are bound (:meth:`LogWriter.take_pointer`).
    ``json``: the JSON format (``logs.format``), for the writer's own warnings and, by default, for every
    sink made on it (the boot log, the child logs).
    """
    instance = instance_name()
    boot_dir = os.path.join(logs_dir, "_boot")
    llama_dir = os.path.join(logs_dir, "llama")
    writer = LogWriter(on_error, json)
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
    """llamad's own log events, formatted as twistd does and escaped (or as JSON lines), into this boot's
    log, each once; a child's lines, sent to Twisted's log in the JSON format, have their own file.

    It watches the global publisher from the start of the boot, so that a boot
    that fails before twistd starts logging still leaves its log.  When twistd
    does start logging, Twisted replays every event logged so far to the whole
    publisher, this observer included: an event already written is skipped
    (the replay hands on the very same event objects).  :meth:`logging_began`
    ends that watch once the replay is over.
    """

    def __init__(self, writer: LogWriter, json: bool | None = None) -> None:
        """``json``: None follows the writer."""
        text = _QueuedText(writer, "boot")
        use_json = getattr(writer, "json", False) if json is None else json
        self.observer = (FileLogObserver(text, json_event) if use_json
                         else escaping(FileLogObserver(text, formatEventAsClassicLogText)))
        self.seen: dict[int, LogEvent] | None = {}  # id -> event, kept alive so that no id is reused

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == CHILD_SOURCE:
            return
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


def boot_observer(writer: LogWriter, json: bool | None = None) -> BootObserver:
    """llamad's own log events into this boot's log (:class:`BootObserver`); ``json``: None follows the writer."""
    return BootObserver(writer, json)


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


def twistd_observer(server_options: Any, json: bool = False) -> ILogObserver | None:
    """The log observer twistd would start with ``server_options`` (stdout under ``-n``, else
    ``--logfile`` or syslog), escaped, or writing JSON lines with ``json``; None where twistd's own choice
    stands (``--logger``, or no twistd).

    twistd takes an ``ILogObserver`` component of the application before its own choice, so llamad
    hands it this one; the choice itself is twistd's, made by its own logger class.  Syslog keeps its
    own line format: only a file (stdout included) gets JSON lines.
    """
    if server_options is None or server_options.get("logger"):
        return None
    from twisted.scripts.twistd import _SomeApplicationRunner

    make = getattr(_SomeApplicationRunner.loggerFactory(server_options), "_getLogObserver", None)
    if make is None:
        return None
    observer = make()
    if json and isinstance(observer, FileLogObserver):
        observer.formatEvent = json_event  # the same file, one JSON object a line
        return observer
    return escaping(observer)


# --- the JSON format ------------------------------------------------------------------------------

_JSON_RAW = re.compile(r"[\x7f-\x9f\ud800-\udfff]")  # valid JSON as they are, but a terminal acts on some
_OWN_KEYS = ("time", "level", "source", "model", "message", "traceback")
FIELD_PREFIX = "field_"  # an event's field named as one of the line's own keys is written under this prefix
# Keys an event from twisted.python.log carries besides its log_* ones: Twisted's, not the line's fields.
_LEGACY_KEYS = frozenset({"message", "time", "system", "isError", "format", "why", "failure", "printed",
                          "logLevel"})
_MAX_DEPTH = 8
_LEVELS = frozenset(LogLevel.iterconstants())


def rfc3339(seconds: float) -> str:
    """``2026-12-07T04:44:05.123Z``: UTC to the millisecond, as log collectors parse it."""
    whole = math.floor(seconds)
    millis = min(999, int((seconds - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _serialisable(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is plain JSON (strings, finite numbers, booleans, null, lists and objects of them)."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(_serialisable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _serialisable(v, depth + 1) for k, v in value.items())
    return False


def _encode(obj: Mapping[str, Any]) -> str:
    """``obj`` on one line, every control character escaped (DEL, C1 and lone surrogates too)."""
    text = _json.dumps(obj, ensure_ascii=False)
    return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_line(seconds: float, level: str, source: str, message: str, fields: Mapping[str, Any] | None = None,
              model: str | None = None, traceback: str | None = None) -> str:
    """One log line of the JSON format, the one formatter of every sink: ``time``, ``level``, ``source``,
    ``model`` (given, or a text field ``model``), ``message``, ``traceback``, then ``fields`` that are plain
    JSON; a field named as one of those keys is written as ``field_<name>``."""
    fields = fields or {}
    if model is None and isinstance(fields.get("model"), str):
        model = fields["model"]
    line: dict[str, Any] = {"time": rfc3339(seconds), "level": level, "source": source}
    if model is not None:
        line["model"] = model
    line["message"] = message
    if traceback:
        line["traceback"] = traceback
    for key, value in fields.items():
        if not _serialisable(value) or (key == "model" and value == model):
            continue
        line[FIELD_PREFIX + key if key in line or key in _OWN_KEYS and key != "model" else key] = value
    return _encode(line) + "\n"


def json_event(event: LogEvent) -> str:
    """A Twisted log event as a JSON line: its text as the text format shows it (escaped), its failure's
    traceback, and its own fields as they were logged (Twisted's ``log_*`` keys left out)."""
    try:
        safe = escape_event(event)
        message = formatEvent(safe)
        failure = safe.get("log_failure")
        traceback = None
        if failure is not None:
            try:
                traceback = failure.getTraceback()
            except Exception as e:  # a failure that cannot render still leaves its line
                traceback = f"(traceback unavailable: {escape(repr(e))})"
        level = event.get("log_level")
        legacy = "isError" in event and isinstance(event.get("message"), tuple)
        fields = {k: v for k, v in event.items()
                  if not k.startswith("log_") and not (legacy and k in _LEGACY_KEYS)}
        seconds = event.get("log_time")
        return json_line(seconds if isinstance(seconds, (int, float)) else time.time(),
                         level.name if level in _LEVELS else "info",
                         str(event.get("log_namespace") or "-"), message, fields, traceback=traceback)
    except Exception as e:  # an observer must not raise: the line says what went wrong instead
        return json_line(time.time(), "error", "llamad.logs", f"unformattable log event: {escape(repr(e))}")


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
