"""The access log in the JSON log format: each line has the keys every JSON log line has (level, source,
message), its own fields unchanged, and ``llamad keys usage`` still reads it."""

from __future__ import annotations

import json
import re

from twisted.internet.task import Clock

from llamad.keys.access import BATCH_SECONDS, AccessLog, access_line, json_access_line, usage
from llamad.logs import json_line

HOSTILE = 'x\n\u001b[31m\r\t\x7f\x85"\\ \udcff'
WALL = 1795000000.25


def line(route: str = "/v1/chat/completions", status: int = 200, model: str | None = "qwen:7b") -> bytes:
    return access_line(WALL, "team-a", model, route, status, 12, 85, 1.23456, 0.08, 0.0, None)


def json_lines(lines: list[bytes]) -> list[bytes]:
    clock = Clock()
    handed: list[bytes] = []
    log = AccessLog(clock, handed.append, json=True)
    for one in lines:
        log(one)
    clock.advance(BATCH_SECONDS)
    return b"".join(handed).splitlines(keepends=True)


def test_a_json_access_line_is_what_json_line_writes_for_its_fields() -> None:
    [written] = json_lines([line()])
    entry = json.loads(written)
    assert list(entry)[:4] == ["time", "level", "source", "message"]
    fields = json.loads(line())
    own = {k: v for k, v in fields.items() if k != "time"}
    assert entry == json.loads(json_line(WALL, "info", "access", "/v1/chat/completions 200", own))
    assert {k: entry[k] for k in fields} == fields  # the access log's own fields, unchanged


def test_a_hostile_route_stays_one_json_object() -> None:
    [written] = json_lines([line(route=HOSTILE, model=HOSTILE)])
    assert written.endswith(b"\n") and written.count(b"\n") == 1
    assert not re.search(rb"[\x00-\x1f\x7f]", written[:-1]) and "\x85" not in written.decode()
    entry = json.loads(written)
    assert entry["route"] == HOSTILE and entry["model"] == HOSTILE and entry["message"] == f"{HOSTILE} 200"


def test_several_lines_in_one_batch_each_get_the_keys() -> None:
    written = json_lines([line(), line(route="/health", status=503, model=None)])
    entries = [json.loads(one) for one in written]
    assert [e["message"] for e in entries] == ["/v1/chat/completions 200", "/health 503"]
    assert all(e["source"] == "access" and e["level"] == "info" for e in entries)


def test_the_text_format_writes_the_line_as_it_was() -> None:
    clock = Clock()
    handed: list[bytes] = []
    AccessLog(clock, handed.append)(line())
    clock.advance(BATCH_SECONDS)
    assert handed == [line()] and b'"level"' not in handed[0]
    assert json_access_line(b"not an access line\n") == b"not an access line\n"


def test_keys_usage_reads_json_lines(tmp_path) -> None:
    (tmp_path / "latest.txt").write_bytes(b"".join(json_lines([line(), line(status=429)])))
    sums = usage(str(tmp_path))
    assert list(sums) == [("team-a", "qwen:7b")]
    u = sums[("team-a", "qwen:7b")]
    assert (u.requests, u.errors, u.prompt_tokens, u.completion_tokens) == (2, 1, 24, 170)
