"""Cold-start overhead: what llamad adds on top of the child's own load time.

For each of ``--runs`` cold starts: the time from sending a streamed request to
an unloaded llamad until its first byte, minus the child's own time from spawn
to ready (llama.cpp stamps each log line with the time since its start; the
``listening on`` line marks ready).  Reports the median.

    .venv/bin/python bench/coldstart.py [--runs 10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llamad.demo import write_demo_model
from llamad.supervisor import free_port

STAMP = re.compile(rb"^\S+Z (\d+)\.(\d+)\.(\d+)\.(\d+) .*llama_server: listening on", re.MULTILINE)



def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/health")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def wait(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.02)


def child_ready_seconds(log: Path) -> float:
    """The child's own spawn-to-ready time, from the last 'listening on' line of its log."""
    m = STAMP.findall(log.read_bytes())[-1]
    minutes, seconds, millis, micros = (int(x) for x in m)
    return minutes * 60 + seconds + millis / 1e3 + micros / 1e6


def first_byte(port: int) -> float:
    body = json.dumps({"prompt": "Hello", "max_tokens": 4, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    sock.recv(1)
    elapsed = time.perf_counter() - started
    while sock.recv(65536):
        pass
    sock.close()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llamad-cold-"))
    api, health_port = free_port(), free_port()
    model = write_demo_model(str(work / "demo.gguf"))
    config = work / "llamad.toml"
    config.write_text(f'data_dir = "{work}/data"\n[api]\nlisten = "tcp:{api}:interface=127.0.0.1"\n'
                      f'[health]\nlisten = "tcp:{health_port}:interface=127.0.0.1"\n'
                      f'[backend]\nmodel = "{model}"\ncommand = "{args.llama_server}"\nstart = "lazy"\n'
                      f'[idle]\ntimeout = 0.5\naction = "unload"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "PORT_HEALTH", "MODEL_PATH", "MODEL_NAME")}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "llamad",
                             "--config", str(config)], env=env, cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    overheads, ttfbs, readies = [], [], []
    try:
        wait(lambda: _up(api))
        for _ in range(args.runs):
            wait(lambda: health(api)["state"] == "stopped")
            ttfb = first_byte(api)
            ready = child_ready_seconds(work / "data/logs/llama/latest.txt")
            ttfbs.append(ttfb * 1000)
            readies.append(ready * 1000)
            overheads.append((ttfb - ready) * 1000)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"cold start, median of {args.runs}: first byte {statistics.median(ttfbs):.1f} ms, "
          f"child's own spawn-to-ready {statistics.median(readies):.1f} ms, "
          f"llamad's overhead {statistics.median(overheads):.1f} ms")


def _up(port: int) -> bool:
    try:
        return health(port)["state"] in ("stopped", "ready")
    except OSError:
        return False


if __name__ == "__main__":
    main()
