"""Time to first byte of a streamed completion: through llamad, and direct to llama-server.

Both run in this one run on the same demo model, so the ratio is meaningful.
Also reports llamad's spawn-to-ready time for its child.

    .venv/bin/python bench/ttfb.py [--requests 50]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llamad.demo import write_demo_model
from llamad.supervisor import free_port

BODY = json.dumps({"prompt": "Hello", "max_tokens": 16, "stream": True}).encode()



def wait_http(port: int, path: str, headers: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            if response.status == 200 and b'"starting"' not in body:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"port {port} not ready within {timeout} s")


def ttfb(port: int, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed request to its first SSE bytes.

    llama-server closes the connection after a stream, so every request
    connects anew, on both paths.
    """
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=BODY, headers={"content-type": "application/json", **headers})
    response = conn.getresponse()
    first = response.read1(65536)
    elapsed = time.perf_counter() - start
    assert response.status == 200 and first, (response.status, first)
    response.read()
    conn.close()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server"))
    args = p.parse_args()
    if not args.llama_server:
        raise SystemExit("llama-server not found: run `make setup` first")

    work = Path(tempfile.mkdtemp(prefix="llamad-bench-"))
    model = write_demo_model(str(work / "demo.gguf"))
    key_file = work / "key"
    key_file.write_text("bench-key\n")
    key_file.chmod(0o600)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        direct_port = free_port()
        procs.append(subprocess.Popen(
            [args.llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(direct_port), "-np", "4",
             "-c", "4096", "--metrics", "--api-key-file", str(key_file), "--alias", "demo"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        api, health = free_port(), free_port()
        env = {**os.environ, "PORT": str(api), "PORT_HEALTH": str(health), "MODEL_PATH": model,
               "DATA_DIR": str(work / "data"), "LLAMA_SERVER_BIN": args.llama_server}
        twistd = str(Path(sys.executable).parent / "twistd")
        procs.append(subprocess.Popen([twistd, "-n", "--pidfile=", "llamad"], env=env, cwd=work,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        auth = {"authorization": "Bearer bench-key"}
        wait_http(direct_port, "/health", auth)
        wait_http(api, "/health", {})
        conn = http.client.HTTPConnection("127.0.0.1", api, timeout=5)
        conn.request("GET", "/health")
        spawn_to_ready = json.loads(conn.getresponse().read())["backend"]["last_start_seconds"]
        conn.close()

        direct, through = [], []
        for i in range(args.requests + 3):  # alternate, so drift hits both alike
            d, t = ttfb(direct_port, auth), ttfb(api, {})
            if i >= 3:  # warm-up
                direct.append(d)
                through.append(t)
        d50, l50 = statistics.median(direct), statistics.median(through)
        print(f"spawn to ready (llamad's child, demo model): {spawn_to_ready * 1000:.1f} ms")
        print(f"streamed /v1/completions time to first byte, median of {args.requests}:")
        print(f"  direct llama-server: {d50 * 1000:.2f} ms")
        print(f"  through llamad:      {l50 * 1000:.2f} ms  (+{(l50 - d50) * 1000:.2f} ms, ratio {l50 / d50:.2f})")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
