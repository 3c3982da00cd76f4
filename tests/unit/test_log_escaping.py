"""Text from files and clients reaches every log escaped: no raw control character (a forged line, a
terminal escape sequence) in the boot log, twistd's stdout log, or the access log."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from llamad.keys.access import access_line
from llamad.logs import ChildLog, Lines, LogWriter, boot_observer, escape, twistd_observer
from llamad.root import LlamadService

HOSTILE = 'x\n\u001b[31m\r\t\x7f\x85"'
SHOWN = 'x\\n\\x1b[31m\\r\\t\\x7f\\x85"'
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # anything but the line breaks of the format


class Queued:
    """What a LogWriter would write, kept in memory (no thread)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def put(self, name: str, data: bytes) -> None:
        self.data.append(data)

    def text(self) -> str:
        return b"".join(self.data).decode()


class Thing:
    name = HOSTILE

    def __str__(self) -> str:
        return f"thing {HOSTILE}"


def log_everything(observer) -> None:
    """Outside text in every way a log call can format it."""
    publisher = LogPublisher(observer)
    log = Logger(namespace="llamad.test", observer=publisher)
    log.warn("key {key} skipped", key=HOSTILE)
    log.warn("repr {key!r}; path {path}; number {n:.1f}", key=HOSTILE, path=Path(f"/tmp/{HOSTILE}"), n=2.25)
    log.warn("error {e}; attribute {t.name}; item {items[0]}; str {t}", e=ValueError(HOSTILE), t=Thing(),
             items=[HOSTILE])
    log.info("config:\n{config}", config=Lines("[api]\nlisten = 1\nbad = \x1b[31m\x85"))
    try:
        raise RuntimeError(f"boom {HOSTILE}")
    except RuntimeError:
        log.failure("failed on {what}", Failure(), what=HOSTILE)


def test_escape_shows_c0_c1_and_del_as_python_does() -> None:
    assert escape(HOSTILE) == SHOWN
    assert escape("a\nb\tc\r\x1b", lines=True) == "a\nb\tc\\r\\x1b"
    assert escape("plain, é and 模型 unchanged") == "plain, é and 模型 unchanged"


def test_the_boot_log_escapes_every_field_and_keeps_the_format_line_breaks() -> None:
    writer = Queued()
    log_everything(boot_observer(writer))  # type: ignore[arg-type]
    text = writer.text()
    assert not RAW_CONTROL.search(text), text
    lines = text.split("\n")
    starts = [line for line in lines if line and not line.startswith("\t")]
    assert len(starts) == 5  # one line per event: no forged ones
    assert starts[0].endswith(f"key {SHOWN} skipped")
    assert f"repr {escape(repr(HOSTILE))}; path /tmp/{SHOWN}; number 2.2" in starts[1]
    assert f"error {SHOWN}; attribute {SHOWN}; item {SHOWN}; str thing {SHOWN}" in starts[2]
    assert starts[3].endswith("config:") and "\tbad = \\x1b[31m\\x85" in lines  # its own lines stay lines
    # A traceback keeps its lines (continuation lines, each after a tab); its other controls are escaped.
    assert starts[4].endswith(f"failed on {SHOWN}") and "RuntimeError: boom x\n\t\\x1b[31m\\r\t" in text


def test_other_observers_still_get_the_event_as_logged() -> None:
    events: list[dict] = []
    writer = Queued()
    publisher = LogPublisher(boot_observer(writer), events.append)  # type: ignore[arg-type]
    Logger(observer=publisher).info("{key}", key=HOSTILE)
    assert events[0]["key"] == HOSTILE and SHOWN in writer.text()


def test_twistd_logs_to_stdout_escaped_through_the_application(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    options = ServerOptions()
    options.parseOptions(["-n", "--pidfile="])  # as `twistd -n --pidfile= llamad` has them
    root = LlamadService(None, None, None, None)  # type: ignore[arg-type]  # the hand-over only
    root.log_observer = twistd_observer(options)
    application = Application("llamad")
    root.setServiceParent(application)
    observer = application.getComponent(ILogObserver)  # what twistd starts logging with
    assert observer is root.log_observer is not None
    assert ILogObserver.providedBy(observer)  # twistd takes it as a new-style observer, not a legacy one
    log_everything(observer)
    text = out.getvalue()
    assert f"key {SHOWN} skipped" in text and not RAW_CONTROL.search(text), text


def test_no_observer_of_ours_where_the_operator_chose_one() -> None:
    options = ServerOptions()
    options.parseOptions(["-n", "--logger", "twisted.logger.textFileLogObserver"])
    assert twistd_observer(options) is None
    assert twistd_observer(None) is None


def test_a_log_writer_line_is_escaped_whatever_the_writer() -> None:
    writer = LogWriter()
    received: list[bytes] = []
    writer.put = lambda name, data: received.append(data)  # type: ignore[method-assign]
    log_everything(boot_observer(writer))
    assert received and not RAW_CONTROL.search(b"".join(received).decode())


def test_the_childs_lines_are_escaped_too() -> None:
    writer = Queued()
    ChildLog(writer).child_line("said\x1b[31m\rred\x85\tand é\x7f".encode())  # type: ignore[arg-type]
    assert writer.data[0].endswith("Z said\\x1b[31m\\rred\\x85\tand é\\x7f\n".encode())


@pytest.mark.parametrize("field", ["key_id", "model", "route"])
def test_an_access_line_stays_one_json_object_whatever_the_names(field: str) -> None:
    names = {"key_id": "team", "model": "qwen", "route": "/v1/chat/completions", field: HOSTILE + "\\ \udcff"}
    line = access_line(1_700_000_000.5, names["key_id"], names["model"], names["route"], 200, 1, 2, 0.5, None,
                       None, None)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert not re.search(rb"[\x00-\x1f\x7f]", line[:-1]) and "\x85" not in line.decode()
    entry = json.loads(line)
    assert entry[field] == HOSTILE + "\\ \udcff" and entry["status"] == 200


def test_an_access_line_of_plain_names_is_unchanged() -> None:
    line = access_line(1_700_000_000.5, "team", "qwen-2.5", "/v1/chat/completions", 200, 1, 2, 0.5, None, None,
                       None)
    assert b'"key_id": "team", "model": "qwen-2.5", "route": "/v1/chat/completions"' in line


def test_the_boot_log_has_each_event_once_after_twisteds_replay(tmp_path) -> None:
    """twistd begins logging after makeService: Twisted then replays every earlier event to the
    whole publisher, the boot log's observer (there since the boot began) included."""
    import io
    import sys
    import warnings

    from twisted.logger import LogBeginner, LogPublisher, Logger

    from llamad.logs import BootObserver, open_logs

    publisher = LogPublisher()
    beginner = LogBeginner(publisher, io.StringIO(), sys, warnings)
    writer, boot_path = open_logs(str(tmp_path / "logs"), 1 << 20, 3, lambda: None)
    observer = BootObserver(writer)
    publisher.addObserver(observer)
    log = Logger(namespace="llamad", observer=publisher)
    for n in range(3):
        log.info("before logging began {n}", n=n)
    stdout: list[dict] = []
    beginner.beginLoggingTo([stdout.append], redirectStandardIO=False)  # what twistd does: replays the 3
    observer.logging_began()
    log.info("serving")
    writer.stop()
    lines = [line.split("] ", 1)[1] for line in open(boot_path).read().splitlines()]
    assert lines == ["before logging began 0", "before logging began 1", "before logging began 2", "serving"]
    assert len(stdout) == 4
