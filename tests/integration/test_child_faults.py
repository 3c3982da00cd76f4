"""The child dies or hangs under load; llamad dies hard: real llama-server, real signals.

- a ``kill -9`` of the child: requests it never got are served by its restart;
- a ``kill -9`` of llamad: the kernel ends the child (parent-death signal), and
  the next boot on the same data dir stops a child an earlier one left;
- a ``kill -STOP`` of the child: health checks notice, and it is replaced.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import Stream, alive, metric, wait_for
from llamad import runfiles
from llamad.supervisor import free_port

pytestmark = pytest.mark.integration


LONG = {"prompt": "Tell a long story.", "max_tokens": 1500, "stream": True, "ignore_eos": True}


def test_kill_9_of_the_child_loses_no_queued_request(start_llamad):
    # Two streams far longer than the set-up hold both slots, so exactly they are with the child
    # at the kill; 14 short requests wait in llamad's queue.
    daemon = start_llamad({"parallel": 2, "context": 32768}, toml="[admission]\nqueue_timeout = 600\n")
    old_pid = daemon.backend_pid()
    running = [Stream(daemon.api_port, {**LONG, "max_tokens": 16000}).start() for _ in range(2)]
    for s in running:
        assert s.first_event.wait(60)
    queued = [Stream(daemon.api_port, {**LONG, "max_tokens": 32}).start() for _ in range(14)]
    streams = running + queued
    wait_for(lambda: metric(daemon, "llamad_queue_depth", {}) >= 14, 60, "14 requests queued")
    assert not any(s.done.is_set() or s.first_event.is_set() for s in queued)
    assert not any(s.done.is_set() for s in running)

    os.kill(old_pid, signal.SIGKILL)
    for s in streams:
        assert s.done.wait(300), "a stream never ended"
    for s in running:
        assert s.interrupted, s.describe()  # the child had its bytes: one error event, then the end
    failed = [s.describe() for s in queued if not s.completed]
    assert failed == [], failed  # the child never got these: all served by its restart
    new_pid = daemon.wait_state("ready")["backend"]["pid"]
    assert new_pid != old_pid
    assert metric(daemon, "llamad_backend_restarts_total", {"reason": "killed"}) == 1


def test_kill_9_of_llamad_takes_the_child_along_and_leaves_no_key(start_llamad):
    daemon = start_llamad()
    child = daemon.backend_pid()
    run_dir = Path(runfiles.runtime_dir(str(daemon.data_dir)))
    names = sorted(p.name for p in run_dir.iterdir())
    assert "llama.pid" in names and not [n for n in names if n.startswith("key-")]  # gone once the child read it
    daemon.proc.kill()
    daemon.proc.wait(30)
    wait_for(lambda: not alive(child), 10, "the kernel to end the orphaned child")

    again = start_llamad(data_dir=daemon.data_dir)  # the stale record names a dead process: ignored
    assert again.backend_pid() != child
    assert "left running by an earlier llamad" not in again.log()


def test_a_boot_stops_a_child_left_by_an_earlier_boot(start_llamad, tmp_path, demo_model, llama_server_bin):
    data_dir = tmp_path / "volume"
    data_dir.mkdir()
    run_dir = Path(runfiles.ensure_private_dir(runfiles.runtime_dir(str(data_dir))))
    key_file = run_dir / "key-left"
    key_file.write_text("secret-left-behind\n")
    # A child without the parent-death signal, as a llamad killed between fork and exec would leave.
    port = free_port()
    left = subprocess.Popen([llama_server_bin, "-m", demo_model, "--host", "127.0.0.1", "--port", str(port),
                             "--api-key-file", str(key_file)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        record = runfiles.record_for(left.pid, str(key_file))
        assert record is not None
        runfiles.write_record(str(run_dir / "llama.pid"), record)
        daemon = start_llamad(data_dir=data_dir)
        assert left.wait(60) is not None  # stopped by the new boot (SIGTERM to its group)
        assert not key_file.exists()
        assert f"found backend pid {left.pid} left running by an earlier llamad" in daemon.log()
        assert daemon.backend_pid() != left.pid
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


def test_a_stopped_child_is_noticed_and_replaced_and_waiting_requests_survive(start_llamad):
    daemon = start_llamad(
        {"parallel": 1, "context": 8192},
        toml="[supervisor]\nhealth_interval = 0.5\nhealth_timeout = 1\nhealth_failures = 2\n",
    )
    old_pid = daemon.backend_pid()
    stuck = Stream(daemon.api_port, LONG).start()
    assert stuck.first_event.wait(60)
    os.kill(old_pid, signal.SIGSTOP)
    try:
        waiting = Stream(daemon.api_port, {**LONG, "max_tokens": 16}).start()  # queued behind the stuck one
        health = wait_for(lambda: (h := daemon.health())["backend"]["pid"] not in (None, old_pid)
                          and h["state"] == "ready" and h, 120, "a new child")
        assert health["backend"]["reason"].startswith("wedged: /health failed 2 times in a row")
        assert waiting.done.wait(120) and waiting.completed, waiting.describe()
        assert stuck.done.wait(60) and not stuck.completed
        assert metric(daemon, "llamad_backend_restarts_total", {"reason": "wedged"}) == 1
        assert "wedged" in daemon.log()
        wait_for(lambda: not alive(old_pid), 30, "the wedged child to be gone")
    finally:
        if alive(old_pid):
            os.kill(old_pid, signal.SIGKILL)
