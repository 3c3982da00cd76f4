"""``logs.format = "json"``: every line llamad writes is one JSON object (time, level, source, message,
model where there is one, the event's own fields), from llamad's events, a child's lines and the log
writer's own warnings; the text format stays as it was."""

from __future__ import annotations

import io
import json
import re
import sys
import time

import pytest
from twisted.application.service import Application
from twisted.logger import (
    FileLogObserver, ILogObserver, Logger, LogLevel, LogPublisher, formatEventAsClassicLogText,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from llamad.logs import (
    CHILD_SOURCE, ChildLog, Lines, LogWriter, boot_observer, escaping, json_event, json_line, model_log,
    open_logs, rfc3339, twistd_observer,
)
from llamad.root import LlamadService

HOSTILE = 'x\n\u001b[31m\r\t\x7f\x85"'
SHOWN = 'x\\n\\x1b[31m\\r\\t\\x7f\\x85"'  # as the text format shows it
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # none at all in a JSON line but its final newline
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
REQUIRED = ("time", "level", "source", "message")


class Queued:
    """What a LogWriter would write, kept in memory (no thread)."""

    def __init__(self, json: bool = False) -> None:
        self.json = json
        self.data: list[tuple[str, bytes]] = []

    def put(self, name: str, data: bytes) -> None:
        self.data.append((name, data))

    def text(self, name: str | None = None) -> str:
        return b"".join(d for n, d in self.data if name is None or n == name).decode()


def parsed(text: str) -> list[dict]:
    """Every line of ``text`` as a JSON object with the keys every line has; no raw control anywhere."""
    assert text.endswith("\n"), text
    objects = []
    for line in text[:-1].split("\n"):
        assert not RAW_CONTROL.search(line), line
        obj = json.loads(line)
        assert isinstance(obj, dict) and all(key in obj for key in REQUIRED), obj
        assert STAMP.match(obj["time"]), obj["time"]
        objects.append(obj)
    return objects


def llamad_events(observer) -> None:
    """llamad's own events, as its modules log them."""
    publisher = LogPublisher(observer)
    log = Logger(namespace="llamad.supervisor", observer=publisher)
    log.info("backend ready: pid {pid} port {port}", pid=4242, port=39001)
    log.warn("model {model} waits: {reason}", model="qwen", reason="no memory")
    log.info("config:\n{config}", config=Lines("[api]\nlisten = 1"))
    log.warn("key {key} skipped; {e}", key=HOSTILE, e=ValueError(HOSTILE))
    try:
        raise RuntimeError(f"boom {HOSTILE}")
    except RuntimeError:
        log.failure("failed on {what}", Failure(), what="reload")


def test_rfc3339_is_utc_to_the_millisecond() -> None:
    assert rfc3339(1796618645.1239) == "2026-12-07T04:44:05.123Z"
    assert rfc3339(1796618645.9999) == "2026-12-07T04:44:05.999Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


def test_a_json_line_has_its_keys_first_and_plain_fields_after() -> None:
    line = json_line(1796618645.5, "warn", "llamad", "hello", {"n": 2, "ok": True, "ids": ["a", "b"],
                     "nested": {"x": None}, "obj": object(), "nan": float("nan"), "time": "mine"}, model="m1")
    assert line.endswith("\n") and line.count("\n") == 1
    obj = json.loads(line)
    assert list(obj)[:5] == ["time", "level", "source", "model", "message"]
    assert obj == {"time": "2026-12-07T04:44:05.500Z", "level": "warn", "source": "llamad", "model": "m1",
                   "message": "hello", "n": 2, "ok": True, "ids": ["a", "b"], "nested": {"x": None},
                   "field_time": "mine"}  # not JSON (an object, NaN): left out; a field named as a key: renamed


def test_a_json_line_escapes_every_control_character() -> None:
    line = json_line(0, "info", "llamad", HOSTILE, {"key": HOSTILE + "\udcff"})
    assert not RAW_CONTROL.search(line[:-1]) and "\udcff" not in line
    obj = json.loads(line)
    assert obj["message"] == HOSTILE and obj["key"] == HOSTILE + "\udcff"  # the data itself is kept
    line.encode("utf-8")  # a lone surrogate is written as its escape: the line encodes


def test_llamads_own_events_are_one_json_object_a_line() -> None:
    writer = Queued(json=True)
    llamad_events(boot_observer(writer))  # type: ignore[arg-type]  # follows the writer's format
    lines = parsed(writer.text("boot"))
    assert len(lines) == 5  # one line per event, a traceback and a config included
    ready, waits, config, hostile, failure = lines
    assert ready["level"] == "info" and ready["source"] == "llamad.supervisor"
    assert ready["message"] == "backend ready: pid 4242 port 39001"
    assert (ready["pid"], ready["port"]) == (4242, 39001)
    assert waits["level"] == "warn" and waits["model"] == "qwen" and waits["reason"] == "no memory"
    assert config["message"] == "config:\n[api]\nlisten = 1"  # its own line breaks, inside the one line
    assert hostile["message"] == f"key {SHOWN} skipped; {SHOWN}"  # escaped as the text format shows it
    assert hostile["key"] == HOSTILE and "e" not in hostile  # a field as logged; an exception is no JSON
    assert failure["level"] == "critical" and failure["message"] == "failed on reload"
    assert "Traceback" in failure["traceback"] and "RuntimeError: boom x\n\\x1b[31m" in failure["traceback"]
    assert not any(key.startswith("log_") for line in lines for key in line)


def test_the_json_switch_of_a_sink_wins_over_its_writer() -> None:
    writer = Queued(json=False)
    llamad_events(boot_observer(writer, json=True))  # type: ignore[arg-type]
    assert len(parsed(writer.text())) == 5


def test_the_text_format_is_unchanged() -> None:
    """The text sinks write what twistd's classic format writes for the escaped event, as before."""
    writer, expected = Queued(), Queued()
    llamad_events(boot_observer(writer))  # type: ignore[arg-type]
    llamad_events(escaping(FileLogObserver(_Text(expected), formatEventAsClassicLogText)))
    assert writer.text() == expected.text() and not writer.text().startswith("{")


class _Text:
    def __init__(self, queued: Queued) -> None:
        self.queued = queued

    def write(self, text: str) -> None:
        self.queued.put("boot", text.encode())

    def flush(self) -> None:
        pass


def test_a_childs_line_in_text_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    gmtime = time.gmtime
    monkeypatch.setattr(time, "gmtime", lambda seconds=None: gmtime(1796618645.5 if seconds is None else seconds))
    writer = Queued()
    published: list[dict] = []
    child = ChildLog(writer, model_id="m1", publish=published.append)  # type: ignore[arg-type]
    child.child_line(b"srv  load_model: loading\x1b")
    assert writer.data == [("child", b"2026-12-07T04:44:05Z srv  load_model: loading\\x1b\n")]
    assert published == []  # the text format writes the file only


def test_a_childs_line_is_wrapped_with_its_model_in_its_file_and_on_twistds_log() -> None:
    writer = Queued(json=True)
    published: list[dict] = []
    ChildLog(writer, "child:m1", model_id="m1", publish=published.append).child_line(  # type: ignore[arg-type]
        "said\x1b[31m\tand é \xff".encode("utf-8") + b"\xff")
    [line] = parsed(writer.text("child:m1"))
    assert line["source"] == CHILD_SOURCE and line["model"] == "m1" and line["level"] == "info"
    assert line["message"] == "said\\x1b[31m\tand é \xff\\xff"  # escaped as in text; a bad byte as \xff
    [event] = published
    stdout = io.StringIO()
    FileLogObserver(stdout, json_event)(event)  # what twistd's JSON log writes for it
    [shown] = parsed(stdout.getvalue())
    assert shown == {"time": shown["time"], "level": "info", "source": "child", "model": "m1",
                     "message": line["message"]}
    assert shown["time"] == line["time"]


def test_the_boot_log_leaves_out_the_childs_lines() -> None:
    writer = Queued(json=True)
    observer = boot_observer(writer)  # type: ignore[arg-type]
    ChildLog(writer, model_id="m1", publish=observer).child_line(b"hello")  # type: ignore[arg-type]
    assert writer.text("boot") == "" and parsed(writer.text("child"))[0]["message"] == "hello"


def test_twistds_stdout_gets_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    options = ServerOptions()
    options.parseOptions(["-n", "--pidfile="])  # as `twistd -n --pidfile= llamad` has them
    root = LlamadService(None, None, None, None)  # type: ignore[arg-type]  # the hand-over only
    root.log_observer = twistd_observer(options, json=True)
    application = Application("llamad")
    root.setServiceParent(application)
    observer = application.getComponent(ILogObserver)  # what twistd starts logging with
    assert observer is root.log_observer is not None and ILogObserver.providedBy(observer)
    llamad_events(observer)
    ChildLog(Queued(json=True), model_id="m1", publish=observer).child_line(b"slot ready")  # type: ignore[arg-type]
    lines = parsed(out.getvalue())
    assert len(lines) == 6 and lines[4]["traceback"] and lines[0]["pid"] == 4242
    assert lines[5] == {"time": lines[5]["time"], "level": "info", "source": "child", "model": "m1",
                        "message": "slot ready"}


def test_twistds_own_and_legacy_events_have_no_twisted_keys_as_fields() -> None:
    out = io.StringIO()
    observer = FileLogObserver(out, json_event)
    legacy_log.addObserver(observer)  # a legacy observer sees new events through the same bridge
    try:
        legacy_log.msg("Loading %s..." % "app.tac")
        legacy_log.err(RuntimeError("old style"), "while starting")
    finally:
        legacy_log.removeObserver(observer)
    loading, error = [line for line in parsed(out.getvalue()) if line["source"] == "log_legacy"]
    assert loading["message"] == "Loading app.tac..." and loading["level"] == "info"
    assert set(loading) == {"time", "level", "source", "message"}
    assert error["level"] == "critical" and "RuntimeError: old style" in error["message"]  # as twistd words it
    assert set(error) == {"time", "level", "source", "message"}


def test_an_event_that_cannot_be_formatted_still_gives_a_json_line() -> None:
    line = json.loads(json_event({"log_format": "{x}", "log_level": LogLevel.info, "log_time": 0}))
    assert line["level"] == "info" and "x" in line["message"]  # Twisted's own "Unable to format" text
    assert json.loads(json_event({}))["source"] == "-"


def test_the_writers_own_warning_is_json_on_stderr(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    writer = LogWriter(json=True)
    writer._failed("cannot write child log: [Errno 28] No space left on device")
    [line] = parsed(capfd.readouterr().err)
    assert line["level"] == "warn" and line["source"] == "llamad.logs" and line["failed_writes"] == 1
    assert line["message"].startswith("cannot write child log") and "1 failed log writes so far" in line["message"]
    text = LogWriter()
    text._failed("disk full")
    assert capfd.readouterr().err == "llamad: warning: disk full (1 failed log writes so far)\n"


def test_open_logs_in_json_writes_json_files(tmp_path) -> None:
    logs = tmp_path / "logs"
    writer, boot_path = open_logs(str(logs), 1 << 20, 3, lambda: None, json=True)
    Logger(namespace="llamad", observer=LogPublisher(boot_observer(writer))).info("serving {n}", n=1)
    model_log(writer, str(logs), "m1", 1 << 20, 3).child_line(b"main: server is listening")
    ChildLog(writer, publish=lambda event: None).child_line(b"one model, no id given")
    writer.stop()
    [boot] = parsed(open(boot_path).read())
    assert boot["message"] == "serving 1" and boot["n"] == 1
    [child] = parsed((logs / "llama" / "m1" / "latest.txt").read_text())
    assert child["model"] == "m1" and child["message"] == "main: server is listening"
    [one] = parsed((logs / "llama" / "latest.txt").read_text())
    assert "model" not in one and one["source"] == "child"


def test_the_supervisors_lines_name_their_model() -> None:
    """A child's state changes are about one model: its JSON lines carry it, its text lines read as before."""
    from twisted.logger import LogLevel

    from llamad.logs import json_event
    from llamad.supervisor import ModelLog

    events: list[dict] = []
    log = ModelLog("qwen")
    log.observer = events.append  # type: ignore[assignment]
    log.info("backend ready: pid {pid}", pid=7)
    line = json.loads(json_event(events[0]))
    assert (line["model"], line["message"], line["level"], line["source"]) == (
        "qwen", "backend ready: pid 7", "info", "llamad.supervisor")
    assert events[0]["log_level"] is LogLevel.info
