"""Files that others can write, and a SIGKILL at the worst moment, against a real ``twistd -n llamad``:
a hostile token-use file still boots, a bad config file is one line and exit 2, text from files reaches
both logs escaped, and a child's key file is gone once the child has read it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TWISTD, alive, children_of, wait_for
from llamad import runfiles
from llamad.keys.tokenfile import MAX_BYTES

pytestmark = pytest.mark.integration

LLAMAD = str(Path(sys.executable).parent / "llamad")
SECRET = "s3cret-team-a-0123456789"


def reading_child(tmp_path: Path) -> str:
    """A backend that reads its key file at once, as llama-server does while it parses its arguments,
    then "loads a model" for a minute (never ready)."""
    script = tmp_path / "reading-child"
    script.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --api-key-file ] && cat "$2" >/dev/null; '
                      "shift; done\nexec sleep 60\n")
    script.chmod(0o755)
    return str(script)


def boot_log(data_dir: Path) -> str:
    return Path((data_dir / "logs" / "_boot" / "latest.txt").read_text().strip()).read_text(errors="replace")


@pytest.mark.parametrize("content", ["values", "nested", "oversized"])
def test_a_hostile_token_use_file_does_not_stop_the_boot(start_llamad, tmp_path, content):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"team:{SECRET}\n")
    data = tmp_path / "data0"
    state = data / "state" / "token_use.json"
    state.parent.mkdir(parents=True)
    if content == "values":
        state.write_text('{"team": {"minute": [[1e999, 5], [NaN, 5]], "day": [[1, Infinity], [2, -1000000], '
                         '[3, 1e999]], "junk": ' + "[" * 500 + "]" * 500 + '}, "ghost": {"day": [[1, 1]]}}')
        expected = "token use: %s: key team: day: dropped 3 bad bucket(s)" % state
    elif content == "nested":
        state.write_text("[" * 100_000)
        expected = f"token use: {state} cannot be read (nested too deeply)"
    else:
        with open(state, "wb") as f:
            f.truncate(MAX_BYTES + 1)
        expected = f"token use: {state} is larger than {MAX_BYTES} bytes"
    daemon = start_llamad({"command": reading_child(tmp_path)}, wait="listening", data_dir=data,
                          toml=f'[auth]\nenabled = true\nkeys_file = "{keys}"\n')
    status, _, _ = daemon.request("GET", "/readyz", port="health")
    assert status == 503  # up and answering, its child still "loading"
    wait_for(lambda: expected in daemon.log(), 10, "the warning")
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.parametrize("data, problem", [
    (b'[api]\nlisten = "tcp:8000"\n# caf\xe9\n', "not UTF-8 (byte 0xe9 at line 3, offset 31)"),
    (("a = " + "[" * 100_000).encode(), "a value is nested too deeply"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, data, problem):
    config = tmp_path / "llamad.toml"
    config.write_bytes(data)
    line = f"llamad: config error: config: {config} is not valid TOML: {problem}\n"
    for argv in ([TWISTD, "-n", "--pidfile=", "llamad", "--config", str(config)],
                 [LLAMAD, "check-config", "--config", str(config)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", line), argv


def test_text_from_files_reaches_stdout_and_the_boot_log_escaped(start_llamad, tmp_path, demo_model):
    model = tmp_path / "demo\n\x1b[31mred\x85.gguf"
    model.symlink_to(demo_model)
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys."x\\n\\u001b[31m"]\nkey = "{SECRET}"\n\n[keys.team]\nkey = "{SECRET}-b"\n')
    daemon = start_llamad({"command": reading_child(tmp_path), "model": str(model)}, wait="listening",
                          toml=f'[auth]\nenabled = true\nkeys_file = "{keys}"\n')
    shown = "demo\\n\\x1b[31mred\\x85.gguf"
    wait_for(lambda: "backend start: pid" in daemon.log(), 10, "the child's start in the log")
    assert daemon.stop() == 0
    for where, text in (("stdout", daemon.log_path.read_bytes().decode()), ("boot log", boot_log(daemon.data_dir))):
        assert "\x1b" not in text and "\x85" not in text, where
        assert f"model {tmp_path}/{shown} via llama-server" in text, where
        assert '[keys."x\\n\\u001b[31m"] skipped' in text, where
        forged = [line for line in text.split("\n") if line.startswith("[31m")]
        assert forged == [], where


def test_the_key_file_is_gone_once_read_and_a_sigkill_leaves_none(start_llamad, tmp_path):
    daemon = start_llamad({"command": reading_child(tmp_path)}, wait="listening")
    run_dir = Path(runfiles.runtime_dir(str(daemon.data_dir)))

    def key_files() -> list[str]:
        return [name for name in os.listdir(run_dir) if name.startswith("key-")]

    pid = wait_for(lambda: daemon.health()["backend"].get("pid"), 10, "the child")
    wait_for(lambda: not key_files(), 10, "the key file to go once the child read it")
    assert daemon.health()["state"] == "starting"  # long before the model would have loaded
    record = json.loads((run_dir / "llama.pid").read_text())
    assert record["pid"] == pid and not os.path.exists(record["key_file"])
    children = children_of(daemon.proc.pid)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    try:
        wait_for(lambda: not any(alive(child) for child in children), 10, "the child to die with llamad")
    finally:
        for child in children:
            if alive(child):
                os.kill(child, signal.SIGKILL)
    assert key_files() == []
