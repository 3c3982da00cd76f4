"""Plain helpers shared by the integration tests: processes in /proc, waiting on an outcome, the daemon
a test started, raw HTTP on port 8000, streams read in a thread, and a migrated deployment's volume.

Fixtures live in conftest.py; test modules import these from here, never from one another.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

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


# --- port 8000, raw and streamed ---------------------------------------------------------------


def raw(daemon, data: bytes, read_timeout: float = 10) -> bytes:
    """Send raw bytes; return everything the server sends until it closes (or the timeout)."""
    sock = socket.create_connection(("127.0.0.1", daemon.api_port), timeout=read_timeout)
    try:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
        return received
    finally:
        sock.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


@dataclass
class Stream:
    """One streaming completion on its own connection, read in a thread."""

    port: int
    body: dict
    status: int = 0
    events: list[bytes] = field(default_factory=list)
    first_event: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""

    def start(self) -> Stream:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(self.body),
                         headers={"content-type": "application/json"})
            response = conn.getresponse()
            self.status = response.status
            for line in response:
                if line.startswith(b"data: "):
                    self.events.append(line.strip())
                    self.first_event.set()
        except Exception as e:  # noqa: BLE001 - recorded for the assertion message
            self.error = repr(e)
        finally:
            conn.close()
            self.first_event.set()
            self.done.set()

    @property
    def completed(self) -> bool:
        return self.status == 200 and bool(self.events) and self.events[-1] == b"data: [DONE]"

    @property
    def interrupted(self) -> bool:
        return any(b"stream_interrupted" in e for e in self.events)

    def describe(self) -> str:
        return f"status {self.status}, {len(self.events)} events, last {self.events[-1:]!r}, error {self.error!r}"


def metric(daemon, name: str, labels: dict[str, str]) -> float:
    _, body, _ = daemon.request("GET", "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# --- a llama-gguf-inference volume ---------------------------------------------------------------

# Lines in the format of its docs' keys file example (key_id:api_key).
PRODUCTION = "sk-prod-abc123def456ghi789"
TESTING = "sk-test-1234567890abcdef"
KEYS = f"# /data/api_keys.txt\nproduction:{PRODUCTION}\ntesting:{TESTING}\n"


def volume(tmp_path: Path, keys: str | None = KEYS) -> Path:
    """A data volume as the old image left it: models elsewhere, maybe a keys file at the default place."""
    data = tmp_path / "volume"
    data.mkdir(parents=True)
    if keys is not None:
        (data / "api_keys.txt").write_text(keys)
    return data
