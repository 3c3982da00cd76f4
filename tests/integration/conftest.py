"""Real processes: ``twistd -n llamad`` subprocesses serving the real llama-server.

Every daemon a test starts is stopped at teardown, and any backend child it
left behind (found by parent PID in /proc) is killed by PID and reported.
Plain helpers are in helpers.py; test modules import them from there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from helpers import TWISTD, Daemon, alive, wait_for
from llamad import config as llamad_config
from llamad.demo import write_demo_model
from llamad.supervisor import free_port


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    path = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
    if not path:
        pytest.fail("llama-server not found on PATH: run the tests with `make test`")
    return path


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_demo_model(str(tmp_path_factory.mktemp("models") / "demo.gguf"))


@pytest.fixture
def start_llamad(tmp_path: Path, demo_model: str, llama_server_bin: str) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(backend: dict[str, Any] | None = None, toml: str = "", env: dict[str, str] | None = None,
              wait: str = "ready", data_dir: Path | None = None) -> Daemon:
        """Start a daemon; ``backend`` adds [backend] keys, ``toml`` other sections."""
        api_port, health_port = free_port(), free_port()
        data_dir = data_dir or tmp_path / f"data{len(daemons)}"
        data_dir.mkdir(exist_ok=True)
        config = tmp_path / f"llamad{len(daemons)}.toml"
        keys = {"model": demo_model, "command": llama_server_bin, "parallel": 2, **(backend or {})}
        config.write_text(
            f"data_dir = {json.dumps(str(data_dir))}\n[backend]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            + toml
        )
        log_path = tmp_path / f"twistd{len(daemons)}.log"
        full_env = {
            **{k: v for k, v in os.environ.items()
               if k not in ("PORT", "PORT_HEALTH", "MODEL_PATH", "MODEL_NAME", "LLAMA_SERVER_BIN")
               and k not in (*llamad_config.ENV_NAMES, *llamad_config.IGNORED_ENV, "INSTANCE_ID")},
            "PORT": str(api_port),
            "PORT_HEALTH": str(health_port),
            **(env or {}),
        }
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "llamad", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path,
            )
        daemon = Daemon(proc, api_port, health_port, data_dir, log_path)
        daemons.append(daemon)

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"twistd exited with {proc.returncode}:\n{daemon.log()}")
            try:
                return daemon.request("GET", "/livez", port="health", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(listening, 30, "the health port")
        if wait == "ready":
            daemon.wait_state("ready")
            daemon.backend_pid()
        return daemon

    yield start

    leaked = []
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.children()
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(30)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait(10)
        for pid in daemon.seen_children:
            if alive(pid) and b"llama" in Path(f"/proc/{pid}/cmdline").read_bytes():
                leaked.append(pid)
                os.kill(pid, signal.SIGKILL)
    assert not leaked, f"backend processes left behind: {leaked}"
