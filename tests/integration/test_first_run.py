"""A new user's first runs, with real processes: llama-server beside llamad but not on PATH, keys made on a
running llamad, a second `make run` on busy ports, the boot log, and a fleet's line in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import TWISTD, wait_for

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
LLAMAD = str(BIN / "llamad")
ROOT = Path(__file__).resolve().parents[2]
# A PATH a systemd unit or a container has: no venv on it.
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture
def linked_server() -> Path:
    """llama-server linked into the venv as `make setup` does, and not on the bare PATH."""
    server = BIN / "llama-server"
    if not os.access(server, os.X_OK):
        pytest.skip(f"no llama-server in {BIN} (`make setup` links it there)")
    if any(os.access(os.path.join(d, "llama-server"), os.X_OK) for d in BARE_PATH.split(":")):
        pytest.skip("llama-server is on the bare PATH too")
    return server


def boot_log(data_dir: Path) -> Path:
    return Path((data_dir / "logs" / "_boot" / "latest.txt").read_text().strip())


def test_check_config_finds_llama_server_beside_llamad_and_says_so(linked_server: Path, tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k not in ("LLAMA_SERVER_BIN", "DATA_DIR")},
           "PATH": BARE_PATH, "MODEL_PATH": str(tmp_path / "m.gguf")}
    (tmp_path / "m.gguf").touch()
    done = subprocess.run([LLAMAD, "check-config", "--config", str(ROOT / "etc" / "llamad.toml")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert tomllib.loads(done.stdout)["backend"]["command"] == str(linked_server)
    line = next(line for line in done.stdout.splitlines() if line.startswith("command ="))
    assert line.endswith(f"not on PATH: found beside llamad in {linked_server.parent}")


def test_twistd_without_the_venv_on_path_runs_the_linked_llama_server(linked_server: Path, start_llamad) -> None:
    daemon = start_llamad({"command": "llama-server"}, env={"PATH": BARE_PATH})
    assert daemon.request("POST", "/v1/chat/completions", body=CHAT)[0] == 200
    assert f'command = "{linked_server}"' in boot_log(daemon.data_dir).read_text()
    assert daemon.stop() == 0


def test_a_key_generated_and_reloaded_on_a_running_llamad_turns_auth_on(start_llamad) -> None:
    daemon = start_llamad()  # no keys file: auth is off
    assert daemon.request("POST", "/v1/chat/completions", body=CHAT)[0] == 200
    env = {**os.environ, "DATA_DIR": str(daemon.data_dir)}
    generated = subprocess.run([LLAMAD, "keys", "generate", "alice"], env=env, capture_output=True, text=True,
                               timeout=60)
    assert generated.returncode == 0 and "turns auth on" in generated.stderr
    key = generated.stdout.strip()
    reloaded = subprocess.run([LLAMAD, "keys", "reload"], env=env, capture_output=True, text=True, timeout=60)
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for(lambda: "auth enabled: " in daemon.log() and "now holds keys" in daemon.log(), 30, "auth turned on")
    status, body, _ = daemon.request("POST", "/v1/chat/completions", body=CHAT)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert daemon.request("POST", "/v1/chat/completions", body=CHAT,
                          headers={"authorization": f"Bearer {key}"})[0] == 200
    assert daemon.request("GET", "/health")[0] == 200  # still needs no key
    assert daemon.stop() == 0


def test_a_second_daemon_on_busy_ports_leaves_the_pointer_and_the_boot_log_has_each_line_once(
    start_llamad, tmp_path: Path, demo_model: str, llama_server_bin: str,
) -> None:
    first = start_llamad()
    pointer = first.data_dir / "logs" / "_boot" / "latest.txt"
    wait_for(pointer.exists, 10, "the first daemon's pointer")
    first_log = boot_log(first.data_dir)
    config = tmp_path / "second.toml"
    config.write_text(f"data_dir = {json.dumps(str(first.data_dir))}\n[backend]\nmodel = {json.dumps(demo_model)}\n"
                      f"command = {json.dumps(llama_server_bin)}\n")
    env = {**{k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "MODEL_PATH")},
           "PORT": str(first.api_port), "PORT_HEALTH": str(first.health_port)}
    second = subprocess.run([TWISTD, "-n", "--pidfile=", "llamad", "--config", str(config)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "cannot listen on" in second.stderr
    assert boot_log(first.data_dir) == first_log  # `cat logs/_boot/latest.txt | xargs cat`: the serving daemon
    failed = [p for p in pointer.parent.glob("*.log") if p != first_log]
    assert len(failed) == 1 and "config error: " in failed[0].read_text()  # the failed boot keeps its own log
    assert first.request("POST", "/v1/chat/completions", body=CHAT)[0] == 200

    text = first_log.read_text()
    for once in ("llamad boot log: ", "effective config (llamad check-config shows the same):", "GPUs: ",
                 " via llama-server; api ", f"starting on {first.api_port}", f"starting on {first.health_port}",
                 "[backend]\n"):
        assert text.count(once) == 1, once
    stamped = [line for line in text.splitlines() if line[:4].isdigit()]
    assert len(stamped) == len(set(stamped))
    assert first.stop() == 0


def test_a_fleets_boot_line_names_its_models(start_llamad, demo_model: str) -> None:
    fleet = (f"[models.alpha]\nmodel = {json.dumps(demo_model)}\n"
             f"[models.beta]\nmodel = {json.dumps(demo_model)}\nstart = \"lazy\"\n")
    daemon = start_llamad(toml=fleet, wait="listening")
    wait_for(lambda: (daemon.data_dir / "logs" / "_boot" / "latest.txt").exists(), 10, "the pointer")
    assert "2 models: alpha, beta via llama-server; api " in boot_log(daemon.data_dir).read_text()
    assert "model  via" not in daemon.log()
    assert daemon.stop() == 0
