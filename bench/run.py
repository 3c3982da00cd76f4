"""llamad against direct llama-server and nginx, measured in one run.

    .venv/bin/python bench/run.py [--repeat 3] [--seconds 5]

Three paths to the same servers: direct, nginx (keep-alive reverse proxy,
``proxy_buffering off``, one worker), and llamad (``backend.kind =
"external"``, so all three reach the very same child process).  Prints the
medians over ``--repeat`` runs, and the ratios llamad/direct and nginx/direct.

Needs ``wrk`` and ``nginx`` (Debian: ``apt-get install wrk nginx-light``).
"""

from __future__ import annotations

import argparse
import asyncio
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

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent



def wait_port(port: int, path: str = "/health", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"port {port} did not answer 200 on {path} within {timeout} s")


# --- wrk ---------------------------------------------------------------------------

def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port: int, path: str, connections: int, seconds: int, script: str | None = None) -> dict[str, float]:
    argv = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    if script:
        argv += ["-s", script]
    out = subprocess.run(argv + [f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        result[f"p{pct}"] = _ms(re.search(rf"\s{pct}(?:\.000)?%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} error responses on port {port}:\n{out}")
    return result


# --- SSE client --------------------------------------------------------------------

async def _one_stream(port: int, path: str, body: bytes) -> tuple[int, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (path.encode(), len(body), body))
    received = b""
    first = 0.0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        if not first and b"data:" in received + chunk:
            first = time.perf_counter() - started
        received += chunk
        if received.endswith(b"0\r\n\r\n") and b"[DONE]" in received:
            break
    writer.close()
    if not received.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"stream failed on port {port}: {received[:300]!r}")
    return received.count(b"data: ") - 1, first  # minus [DONE]


async def _streams(port: int, path: str, body: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    deadline = time.perf_counter() + seconds
    events = 0
    firsts: list[float] = []

    async def worker() -> None:
        nonlocal events
        while time.perf_counter() < deadline:
            n, first = await _one_stream(port, path, body)
            events += n
            firsts.append(first)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"events_per_s": events / elapsed, "ttfb_p50": statistics.median(firsts) * 1000}


def streams(port: int, path: str, body: dict, concurrency: int, seconds: float) -> dict[str, float]:
    return asyncio.run(_streams(port, path, json.dumps(body).encode(), concurrency, seconds))


# --- the servers ---------------------------------------------------------------------

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    upstream llama {{ server 127.0.0.1:{llama}; keepalive 64; }}
    upstream sse {{ server 127.0.0.1:{sse}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{nginx_llama};
        # llama-server closes a kept-alive connection after a stream without saying so:
        # without retrying non-idempotent requests, nginx answers 502 to the next POST.
        location / {{ proxy_pass http://llama; proxy_http_version 1.1; proxy_set_header Connection "";
                     proxy_buffering off; proxy_next_upstream error timeout non_idempotent; }}
    }}
    server {{
        listen 127.0.0.1:{nginx_sse};
        location / {{ proxy_pass http://sse; proxy_http_version 1.1; proxy_set_header Connection "";
                     proxy_buffering off; }}
    }}
}}
"""


class Servers:
    def __init__(self, llama_server: str, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = {name: free_port() for name in
                     ("llama", "sse", "nginx_llama", "nginx_sse", "llamad_llama", "health_llama",
                      "llamad_sse", "health_sse")}
        model = write_demo_model(str(work / "demo.gguf"))
        self.spawn([llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(self.port["llama"]),
                    "-np", "8", "-c", "8192", "--metrics", "--alias", "demo"])
        self.spawn([sys.executable, str(HERE / "sse_backend.py"), str(self.port["sse"]), "200"])
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, **self.port))
        self.spawn(["nginx", "-p", str(work), "-c", str(conf)])
        for name, upstream, max_concurrent in (("llama", "llama", 8), ("sse", "sse", 128)):
            config = work / f"llamad-{name}.toml"
            config.write_text(
                f'data_dir = "{work}/data-{name}"\n'
                f'[api]\nlisten = "tcp:{self.port["llamad_" + name]}:interface=127.0.0.1"\n'
                f'[health]\nlisten = "tcp:{self.port["health_" + name]}:interface=127.0.0.1"\n'
                f'[backend]\nkind = "external"\nurl = "http://127.0.0.1:{self.port[upstream]}"\nparallel = 8\n'
                f'[admission]\nmax_concurrent = {max_concurrent}\nmax_queue = 1024\n'
            )
            self.spawn([str(BIN / "twistd"), "-n", "--pidfile=", "llamad", "--config", str(config)])
        for name in ("llama", "sse", "nginx_llama", "nginx_sse", "llamad_llama", "llamad_sse"):
            wait_port(self.port[name])

    def spawn(self, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "PORT_HEALTH", "MODEL_PATH", "MODEL_NAME")}
        log = open(self.work / f"{Path(argv[0]).name}-{len(self.procs)}.log", "wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the run ---------------------------------------------------------------------

def one_run(s: Servers, seconds: int) -> dict[str, float]:
    lua = str(HERE / "completions.lua")
    r: dict[str, float] = {}
    for path_name, key in (("direct", "llama"), ("nginx", "nginx_llama"), ("llamad", "llamad_llama")):
        port = s.port[key]
        one = wrk(port, "/v1/completions", 1, seconds, lua)
        eight = wrk(port, "/v1/completions", 8, seconds, lua)
        r[f"{path_name} c1 p50 ms"] = one["p50"]
        r[f"{path_name} c1 p99 ms"] = one["p99"]
        r[f"{path_name} c8 req/s"] = eight["rps"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True}
    for path_name, synthetic, real in (("direct", "sse", "llama"), ("nginx", "nginx_sse", "nginx_llama"),
                                       ("llamad", "llamad_sse", "llamad_llama")):
        for n in (8, 64):
            out = streams(s.port[synthetic], "/v1/chat/completions", chat, n, seconds)
            r[f"{path_name} synthetic sse x{n} events/s"] = out["events_per_s"]
            r[f"{path_name} synthetic sse x{n} ttfb ms"] = out["ttfb_p50"]
        out = streams(s.port[real], "/v1/chat/completions", chat, 8, seconds)
        r[f"{path_name} llama-server sse x8 events/s"] = out["events_per_s"]
        r[f"{path_name} llama-server sse x8 ttfb ms"] = out["ttfb_p50"]
    # /ping on the health port while the API port is saturated.
    load = subprocess.Popen(["wrk", "-t", "2", "-c", "8", "-d", f"{seconds + 2}s", "-s", lua,
                             f"http://127.0.0.1:{s.port['llamad_llama']}/v1/completions"],
                            stdout=subprocess.DEVNULL)
    time.sleep(1)
    ping = wrk(s.port["health_llama"], "/ping", 1, seconds)
    load.wait()
    r["health /ping under load p50 ms"] = ping["p50"]
    r["health /ping under load p99 ms"] = ping["p99"]
    return r


def report(runs: list[dict[str, float]]) -> None:
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    print(f"\nmedians of {len(runs)} run(s)\n")
    print(f"{'measure':<44}{'direct':>10}{'nginx':>10}{'llamad':>10}{'nginx/dir':>11}{'llamad/dir':>11}")
    for measure in ("c1 p50 ms", "c1 p99 ms", "c8 req/s", "synthetic sse x8 events/s", "synthetic sse x8 ttfb ms",
                    "synthetic sse x64 events/s", "synthetic sse x64 ttfb ms", "llama-server sse x8 events/s",
                    "llama-server sse x8 ttfb ms"):
        d, n, la = (med[f"{p} {measure}"] for p in ("direct", "nginx", "llamad"))
        print(f"{measure:<44}{d:>10.2f}{n:>10.2f}{la:>10.2f}{n / d:>11.2f}{la / d:>11.2f}")
    print(f"\nadded p50 at 1 connection: nginx {med['nginx c1 p50 ms'] - med['direct c1 p50 ms']:+.3f} ms, "
          f"llamad {med['llamad c1 p50 ms'] - med['direct c1 p50 ms']:+.3f} ms")
    print(f"health /ping while port 8000 is saturated: p50 {med['health /ping under load p50 ms']:.2f} ms, "
          f"p99 {med['health /ping under load p99 ms']:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server"))
    args = p.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install wrk nginx-light")
    if not args.llama_server:
        raise SystemExit("llama-server not found: run `make setup` first")
    work = Path(tempfile.mkdtemp(prefix="llamad-bench-"))
    servers = Servers(args.llama_server, work)
    try:
        runs = []
        for i in range(args.repeat):
            runs.append(one_run(servers, args.seconds))
            print(f"run {i + 1}: " + json.dumps({k: round(v, 3) for k, v in runs[-1].items()}), flush=True)
        report(runs)
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
