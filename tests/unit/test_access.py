"""The access log's lines and their hand-over to the log thread, on a Clock."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from llamad.keys.access import BATCH_SECONDS, AccessLog, access_line


def test_a_line_is_one_json_object_with_every_field():
    line = access_line(1795000000.25, "team-a", "qwen:7b", "/v1/chat/completions", 200, 12, 85, 1.23456, 0.08,
                       0.0, 2.5)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"time": "2026-11-18T11:06:40.250Z", "key_id": "team-a", "model": "qwen:7b",
                                "route": "/v1/chat/completions", "status": 200, "prompt_tokens": 12,
                                "completion_tokens": 85, "duration": 1.2346, "ttfb": 0.08, "queue_wait": 0.0,
                                "cold_start": 2.5}
    empty = json.loads(access_line(1795000001.0, None, None, "other", 401, 0, 0, None, None, None, None))
    assert empty["key_id"] is None and empty["model"] is None and empty["duration"] is None
    assert empty["time"] == "2026-11-18T11:06:41.000Z"


def test_lines_are_handed_over_together_once_per_batch():
    clock = Clock()
    handed: list[bytes] = []
    log = AccessLog(clock, handed.append)
    log(b"a\n")
    log(b"b\n")
    assert handed == []
    clock.advance(BATCH_SECONDS)
    assert handed == [b"a\nb\n"]
    log(b"c\n")
    clock.advance(BATCH_SECONDS / 2)
    log.flush()  # at shutdown, before the log thread stops
    assert handed == [b"a\nb\n", b"c\n"] and not clock.getDelayedCalls()
    log.flush()
    assert handed == [b"a\nb\n", b"c\n"]
