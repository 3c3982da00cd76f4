"""Who used what: the access log, one JSON object per line, and its sums per key and model.

``logs/access/latest.txt`` is rotated and kept as the child's log is (archives
``<UTC ts>_access_<instance>.log``), and written by the same background
thread.  One line per request answered on the API port::

    {"time": "2026-11-23T17:30:05.123Z", "key_id": "team-a", "model": "qwen", "route": "/v1/chat/completions",
     "status": 200, "prompt_tokens": 12, "completion_tokens": 85, "duration": 1.2345, "ttfb": 0.0812,
     "queue_wait": 0.0, "cold_start": null}

``key_id`` is null when auth is off, ``model`` when the request named none
(llamad's own routes, a refusal before routing).  Seconds are floats; the
tokens come from the response's ``usage``.  Key ids, model ids and route
labels are checked names, so a line is formatted without an encoder on the
request path; a name that holds a quote, a backslash or a control character
(a model file's name can) is encoded, every control character escaped, so a
line is always one JSON object on one line.

With ``logs.format = "json"`` each line also has the keys every JSON log line
has (:func:`llamad.logs.json_line`) after its ``time``: ``"level": "info",
"source": "access", "message": "<route> <status>"``; the fields stay as they are.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from twisted.internet.interfaces import IDelayedCall, IReactorTime

LATEST = "latest.txt"
ARCHIVE_SUFFIX = ".log"
BATCH_SECONDS = 0.2


class AccessLog:
    """Lines gathered on the reactor and handed to the log thread together, at most ``delay`` seconds
    after the first: one queue hand-over and one write per batch, not per request."""

    def __init__(self, clock: IReactorTime, put: Callable[[bytes], None], delay: float = BATCH_SECONDS,
                 json: bool = False) -> None:
        """``json``: write each line in the JSON log format (:func:`json_access_line`)."""
        self.clock = clock
        self.put = put
        self.delay = delay
        self.json = json
        self.lines: list[bytes] = []
        self.call: IDelayedCall | None = None

    def __call__(self, line: bytes) -> None:
        self.lines.append(json_access_line(line) if self.json else line)
        if self.call is None:
            self.call = self.clock.callLater(self.delay, self.flush)

    def flush(self) -> None:
        """Hand over what is gathered (at once at shutdown, before the log thread stops)."""
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        if self.lines:
            lines, self.lines = self.lines, []
            self.put(b"".join(lines))


_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f-\x9f\ud800-\udfff]*')  # what a JSON string holds as it is
_C1 = re.compile(r"[\x7f-\x9f]")  # DEL and C1: valid in JSON, raw, and a terminal acts on some


def _string(text: str) -> bytes:
    """``text`` as a JSON string."""
    if _PLAIN.fullmatch(text):
        return b'"%s"' % text.encode()
    text = _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))
    return text.encode("utf-8", "backslashreplace")  # a lone surrogate (an undecodable file name): \udcxx


_STAMP: list = [-1, b""]  # the second last formatted, and its text
_LINE = (b'{"time": "%s.%03dZ", "key_id": %s, "model": %s, "route": %s, "status": %d, "prompt_tokens": %d, '
         b'"completion_tokens": %d, "duration": %s, "ttfb": %s, "queue_wait": %s, "cold_start": %s}\n')


def access_line(wall: float, key_id: str | None, model: str | None, route: str, status: int, prompt: int,
                completion: int, duration: float | None, ttfb: float | None, queue_wait: float | None,
                cold_start: float | None) -> bytes:
    """One line; the time's text up to the second is formatted once a second."""
    second = int(wall)
    if second != _STAMP[0]:
        _STAMP[0], _STAMP[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
    return _LINE % (
        _STAMP[1], int((wall - second) * 1000),
        b"null" if key_id is None else _string(key_id),
        b"null" if model is None else _string(model),
        _string(route), status, prompt, completion,
        b"null" if duration is None else b"%.4f" % duration,
        b"null" if ttfb is None else b"%.4f" % ttfb,
        b"null" if queue_wait is None else b"%.4f" % queue_wait,
        b"null" if cold_start is None else b"%.4f" % cold_start)


_TIME = b'{"time": "'
# The route's JSON string (an escaped quote does not end it) and the status after it.
_ROUTE_STATUS = re.compile(rb'"route": "([^"\\]*(?:\\.[^"\\]*)*)", "status": (\d+)')


def json_access_line(line: bytes) -> bytes:
    """An :func:`access_line` in the JSON log format: ``level``, ``source`` and ``message`` inserted after its
    ``time``, as :func:`llamad.logs.json_line` orders them.  Spliced, not decoded and encoded again: this
    runs once per request, and the line's layout is this module's own."""
    found = _ROUTE_STATUS.search(line)
    if found is None or not line.startswith(_TIME):  # not a line of access_line's: left as it is
        return line
    end = line.index(b'", ', len(_TIME)) + 3
    return b'%s"level": "info", "source": "access", "message": "%s %s", %s' % (
        line[:end], found.group(1), found.group(2), line[end:])


@dataclass
class Usage:
    """One key's use of one model."""

    requests: int = 0
    errors: int = 0  # status 400 and up
    prompt_tokens: int = 0
    completion_tokens: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def log_files(directory: str) -> list[str]:
    """The access log's files, oldest first: the archives (their names sort by time), then latest.txt."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    archives = sorted(n for n in names if n.endswith(ARCHIVE_SUFFIX) and "_access_" in n)
    return [os.path.join(directory, n) for n in archives] + (
        [os.path.join(directory, LATEST)] if LATEST in names else [])


def entries(directory: str, warnings: list[str]) -> Iterator[dict]:
    """Every line of the access log as a dict; a line that is not a JSON object (a write cut by a
    full disk) is skipped and counted in ``warnings``."""
    for path in log_files(directory):
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue  # rotated away between the listing and here
        with f:
            for number, raw in enumerate(f, start=1):
                try:
                    entry = json.loads(raw)
                except ValueError:
                    warnings.append(f"{path}:{number}: skipped: not a JSON line")
                    continue
                if isinstance(entry, dict):
                    yield entry


def usage(directory: str, since: str = "", warnings: list[str] | None = None) -> dict[tuple[str, str], Usage]:
    """Requests and tokens per (key_id, model) from ``since`` (an ISO 8601 UTC time, compared as the
    log writes it; empty: everything kept).  Requests without a key count under "-", without a model under "-"."""
    sums: dict[tuple[str, str], Usage] = {}
    for entry in entries(directory, warnings if warnings is not None else []):
        if since and str(entry.get("time", "")) < since:
            continue
        key = (entry.get("key_id") or "-", entry.get("model") or "-")
        u = sums.get(key)
        if u is None:
            u = sums[key] = Usage()
        status = int(entry.get("status") or 0)
        u.requests += 1
        u.errors += status >= 400
        u.statuses[status] = u.statuses.get(status, 0) + 1
        u.prompt_tokens += int(entry.get("prompt_tokens") or 0)
        u.completion_tokens += int(entry.get("completion_tokens") or 0)
    return sums
