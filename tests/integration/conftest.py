"""Real processes: ``twistd -n llamad`` subprocesses serving the real llama-server.

Every daemon a test starts is stopped at teardown, and any backend child it
left behind (found by parent PID in /proc) is killed by PID and reported.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from llamad import config as llamad_config
from llamad.demo import write_demo_model
from llamad.supervisor import free_port

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")



def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    path = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
    if not path:
        pytest.fail("llama-server not found on PATH: run the tests with `make test`")
    return path


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_demo_model(str(tmp_path_factory.mktemp("models") / "demo.gguf"))


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    api_port: int
    health_port: int
    data_dir: Path
    log_path: Path
    seen_children: set[int] = field(default_factory=set)

    def request(self, method: str, path: str, port: str = "api", body: Any = None,
                headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:
        number = self.api_port if port == "api" else self.health_port
        conn = http.client.HTTPConnection("127.0.0.1", number, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            hdrs = {"content-type": "application/json"} if data else {}
            conn.request(method, path, body=data, headers={**hdrs, **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def health(self) -> dict[str, Any]:
        status, body, _ = self.request("GET", "/health")
        return dict(json.loads(body))

    def backend_pid(self) -> int | None:
        pid = self.health()["backend"].get("pid")
        if pid:
            self.seen_children.add(pid)
        return pid

    def wait_state(self, state: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: (h := self.health())["state"] == state and h, timeout, f"state {state}")

    def children(self) -> list[int]:
        pids = children_of(self.proc.pid)
        self.seen_children.update(pids)
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.children()
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


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
