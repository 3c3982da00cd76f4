"""A child that takes a request and closes the connection unanswered, with the timing forced.

A fake ``llama-server`` (a few lines of Python) stands in for a dying child:
it accepts a chat completion, closes the connection without a byte of
response, then exits.  llamad sends such a request once more, to the next
child; a request that meets two such closes in a row fails with the reason;
a child that closes unanswered and lives on gets a 502, not a hang.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Callable

import pytest

from helpers import Daemon

pytestmark = pytest.mark.integration

FAKE_CHILD = '''\
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])
counter = os.path.join(os.path.dirname(os.path.abspath(__file__)), "starts")
with open(counter, "a") as f:
    f.write("x")
generation = os.path.getsize(counter)
with open(os.path.join(os.path.dirname(counter), "mode")) as f:
    mode = f.read()  # "first-dies": only the first child; "all-die"; "lives"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if mode == "lives" or mode == "all-die" or generation == 1:
            self.close_connection = True
            self.connection.close()  # taken, never answered
            if mode != "lives":
                time.sleep(0.2)
                os._exit(1)  # and then the child is gone
            return
        body = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": f"from child {generation}"}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def fake_child(tmp_path: Path) -> str:
    path = tmp_path / "fake-llama-server"
    path.write_text(f"#!{sys.executable}\n" + FAKE_CHILD)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def start(start_llamad: Callable[..., Daemon], tmp_path: Path, mode: str) -> Daemon:
    (tmp_path / "mode").write_text(mode)
    return start_llamad(backend={"command": fake_child(tmp_path)},
                        toml="[supervisor]\nbackoff_initial = 0.1\nbackoff_max = 0.2\n")


def test_a_request_a_dying_child_closed_unanswered_is_answered_by_the_next_child(start_llamad, tmp_path):
    daemon = start(start_llamad, tmp_path, "first-dies")
    status, body, _ = daemon.request("POST", "/v1/chat/completions", body=CHAT)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "from child 2"
    assert "closed /v1/chat/completions unanswered" in daemon.log()


def test_a_request_closed_unanswered_by_two_children_in_a_row_fails_with_the_reason(start_llamad, tmp_path):
    daemon = start(start_llamad, tmp_path, "all-die")
    status, body, _ = daemon.request("POST", "/v1/chat/completions", body=CHAT)
    assert status == 502, body
    assert json.loads(body)["error"]["code"] == "backend_unreachable"
    assert daemon.log().count("closed /v1/chat/completions unanswered") == 1  # the next child's close ends it


def test_a_live_child_that_closes_unanswered_gets_a_502_not_a_wait(start_llamad, tmp_path):
    daemon = start(start_llamad, tmp_path, "lives")
    status, body, _ = daemon.request("POST", "/v1/chat/completions", body=CHAT)
    assert status == 502, body
    assert json.loads(body)["error"]["code"] == "backend_unreachable"
    assert (tmp_path / "starts").read_text() == "x"
