"""llamad against direct llama-server and nginx, measured in interleaved rounds.

    .venv/bin/python bench/run.py [--rounds 8] [--seconds 2] [--no-real-sse] [--policy]
                                  [--llamad-set api.KEY=VALUE ...] [--json PATH]
                                  [--llamad CHECKOUT] [--baseline CHECKOUT]

Three paths to the same servers: direct, nginx (keep-alive reverse proxy,
``proxy_buffering off``, one worker), and llamad (``backend.kind =
"external"``, so all three reach the very same child process).

``--baseline CHECKOUT`` adds a fourth path, llamad-old: the same twistd from
the same venv, with ``PYTHONPATH`` set to another llamad build's checkout
(e.g. ``git worktree add /tmp/llamad-old COMMIT``) and the same config, so a
code change is measured against the build before it side by side.  ``--llamad
CHECKOUT`` picks the build of the llamad path the same way (default: the
checkout this file is in), so that a clean commit can be measured from a tree
with other uncommitted work.  Each llamad process imports ``llamad.tap``
before it hands over to twistd and exits if any llamad module it loaded is not
from its checkout (the venv's editable install is on the path too, and
``llamad`` is a namespace package spread over both).

The method: ``--rounds`` rounds; in each round, for each scenario, the paths
are measured one after the other for ``--seconds`` each, and the order
rotates from round to round (round r starts at path r % n of direct, nginx,
llamad[, llamad-old]), so that a slow drift of the shared machine (another
tenant, thermal state, a cache warming up) lands on every path alike.  Each
round gives the ratios nginx/direct and llamad/direct (for latency, the added
milliseconds: path p50 - direct p50), and with ``--baseline`` also
llamad-old/direct and llamad/llamad-old, and the ratio of the two builds' CPU
per request; the report is the median of those per-round ratios, next to the
medians of the absolute values.  Scenarios:

    c8          POST /v1/completions (bench/completions.lua), wrk, 8 connections: req/s
    c1          the same at 1 connection: p50 latency, ms
    sse8        a synthetic SSE backend (bench/sse_backend.py), 8 streams: events/s
    llama-sse8  llama-server's own SSE, 8 streams: events/s (--no-real-sse skips it)

CPU per request: utime + stime from ``/proc/<pid>/stat`` (fields 14 and 15,
in clock ticks) of the process and its live descendants (nginx: the master
and its worker; llamad: the twistd process serving the scenario), read right
before and after each nginx and llamad measurement, divided by the requests
wrk completed ("N requests in") or by the SSE events relayed.  Reported as
the median over rounds, in microseconds; the 10 ms tick is fine against runs
of a couple of seconds.  Once at the end, /ping on llamad's health port is
measured while its API port is saturated.

``--policy``: every request on every path carries an API key, and llamad
checks it against a TOML keys file whose one key has every policy field (a
model glob, both token quotas, a rate, max_concurrent, a priority class),
with the key_id labels and the access log on.

``--llamad-set KEY=VALUE`` (repeatable) adds a key to every llamad config:
``admission.max_queue=64`` puts ``max_queue = 64`` in the ``[admission]`` table;
the value is a TOML literal, written verbatim.

Needs ``wrk`` and ``nginx`` (Debian: ``apt-get install wrk nginx-light``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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
import tomllib
from pathlib import Path

from llamad.demo import write_demo_model
from llamad.supervisor import free_port

HERE = Path(__file__).resolve().parent
PATHS = ["direct", "nginx", "llamad"]  # --baseline appends "llamad-old"
KEY = "bench-policy-key-0123456789"
POLICY_KEYS = f"""# --policy: one key with every policy field; nothing it sets is reached in a run
[keys.bench]
key = "{KEY}"
models = ["*"]  # the external backend's model id is its URL
rate = 1000000000
tokens_per_minute = 1000000000
tokens_per_day = 1000000000000
max_concurrent = 128
priority = "interactive"
"""
HEADERS: dict[str, str] = {}  # sent on every request to every path (--policy: the key)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A llamad process: twistd's own entry point, after importing llamad.tap (and with it the modules it
# serves with) and checking that each came from the checkout PYTHONPATH names: llamad is a namespace
# package, and the venv's editable install puts its own checkout on the path too, behind PYTHONPATH.
TWISTD = """import os, sys
import llamad.tap
checkout = os.path.realpath(sys.argv.pop(1))
files = {os.path.realpath(m.__file__) for n, m in list(sys.modules.items())
         if n.startswith("llamad.") and getattr(m, "__file__", None)}
strays = sorted(f for f in files if not f.startswith(checkout + os.sep))
print(f"bench: {len(files)} llamad modules from {checkout}", flush=True)
if strays:
    sys.exit(f"bench: llamad modules from outside {checkout}: {strays}")
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""


def wait_port(port: int, path: str = "/health", timeout: float = 60,
              proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise SystemExit(f"{proc.args[0]} exited ({proc.returncode}) before port {port} answered:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"port {port} did not answer 200 on {path} within {timeout} s")


# --- CPU from /proc -----------------------------------------------------------------

def _ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return int(fields[11]) + int(fields[12])  # fields 14 and 15


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live descendants (nginx: master + worker)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _ticks(p)
        todo += _children(p)
    return total / CLK_TCK


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
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
              "requests": float(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]
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
    extra = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode()
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"%sConnection: close\r\n\r\n%s" % (path.encode(), len(body), extra, body))
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
    return {"events_per_s": events / elapsed, "events": float(events), "ttfb_p50": statistics.median(firsts) * 1000}


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


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """``["admission.max_queue=64"]`` -> ``{"admission": {"max_queue": "64"}}`` (values: TOML literals)."""
    extra: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SystemExit(f"--llamad-set wants KEY=VALUE, got {item!r}")
        table, _, name = key.strip().rpartition(".")
        extra.setdefault(table, {})[name] = value.strip()
    return extra


def llamad_toml(tables: dict[str, dict[str, str]], extra: dict[str, dict[str, str]]) -> str:
    """Top-level keys (table ``""``) first, then every table, ``extra`` merged in; checked with tomllib."""
    merged = {table: dict(keys) for table, keys in tables.items()}
    for table, keys in extra.items():
        merged.setdefault(table, {}).update(keys)
    lines = [f"{k} = {v}" for k, v in merged.pop("", {}).items()]
    for table, keys in merged.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
    text = "\n".join(lines) + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"--llamad-set makes invalid TOML ({e}):\n{text}")
    return text


class Servers:
    def __init__(self, llama_server: str, work: Path, extra: dict[str, dict[str, str]] | None = None,
                 builds: dict[str, Path] | None = None) -> None:
        """``builds``: the checkout each llamad path imports llamad from (``llamad``, and ``llamad-old``)."""
        self.work = work
        self.builds = builds or {"llamad": HERE.parent}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proc: dict[str, subprocess.Popen[bytes]] = {}  # by port name
        self.logs: dict[str, Path] = {}
        self.port = {name: free_port() for name in
                     ("llama", "sse", "nginx_llama", "nginx_sse", "llamad_llama", "health_llama",
                      "llamad_sse", "health_sse")}
        if "llamad-old" in self.builds:
            self.port.update({name: free_port() for name in
                              ("old_llama", "old_health_llama", "old_sse", "old_health_sse")})
        try:
            self._start(llama_server, extra or {})
        except BaseException:
            self.stop()
            raise

    def _start(self, llama_server: str, extra: dict[str, dict[str, str]]) -> None:
        work = self.work
        model = write_demo_model(str(work / "demo.gguf"))
        self.spawn("llama", [llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(self.port["llama"]),
                             "-np", "8", "-c", "8192", "--metrics", "--alias", "demo"])
        self.spawn("sse", [sys.executable, str(HERE / "sse_backend.py"), str(self.port["sse"]), "200"])
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, **self.port))
        self.spawn("nginx", ["nginx", "-p", str(work), "-c", str(conf)])
        self.proc["nginx_llama"] = self.proc["nginx_sse"] = self.proc["nginx"]
        self.logs["nginx_llama"] = self.logs["nginx_sse"] = self.logs["nginx"]
        # only keys that older builds know too, so that two builds run the very same config
        for build, checkout in self.builds.items():
            api, health = ("llamad_", "health_") if build == "llamad" else ("old_", "old_health_")
            for name, upstream, max_concurrent in (("llama", "llama", 8), ("sse", "sse", 128)):
                config = work / f"{build}-{name}.toml"
                config.write_text(llamad_toml({
                    "": {"data_dir": f'"{work}/data-{build}-{name}"'},
                    "api": {"listen": f'"tcp:{self.port[api + name]}:interface=127.0.0.1"'},
                    "health": {"listen": f'"tcp:{self.port[health + name]}:interface=127.0.0.1"'},
                    "backend": {"kind": '"external"', "url": f'"http://127.0.0.1:{self.port[upstream]}"',
                                "parallel": "8"},
                    "admission": {"max_concurrent": str(max_concurrent), "max_queue": "1024"},
                }, extra))
                self.spawn(api + name, [sys.executable, "-c", TWISTD, str(checkout),
                                        "-n", "--pidfile=", "llamad", "--config", str(config)],
                           pythonpath=checkout)
        for name in self.proc:
            if name in self.port:
                wait_port(self.port[name], proc=self.proc[name], log=self.logs[name])

    def imported_from(self, name: str) -> str:
        """The llamad process's own line on where its modules came from."""
        return next(line for line in self.logs[name].read_text(errors="replace").splitlines()
                    if line.startswith("bench: ") and "llamad modules from" in line)

    def spawn(self, name: str, argv: list[str], pythonpath: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "PORT_HEALTH", "MODEL_PATH", "MODEL_NAME")}
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
        path = self.work / f"{name}-{len(self.procs)}.log"
        with open(path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work)
        self.procs.append(proc)
        self.proc[name] = proc
        self.logs[name] = path

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

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True}

# scenario -> the port (by name in Servers.port) each path is measured on; for nginx and
# llamad, also the process whose CPU is read (Servers.proc)
SCENARIOS = {
    "c8": {"direct": "llama", "nginx": "nginx_llama", "llamad": "llamad_llama", "llamad-old": "old_llama"},
    "c1": {"direct": "llama", "nginx": "nginx_llama", "llamad": "llamad_llama", "llamad-old": "old_llama"},
    "sse8": {"direct": "sse", "nginx": "nginx_sse", "llamad": "llamad_sse", "llamad-old": "old_sse"},
    "llama-sse8": {"direct": "llama", "nginx": "nginx_llama", "llamad": "llamad_llama", "llamad-old": "old_llama"},
}


LUA = [str(HERE / "completions.lua")]  # --policy: a copy that sends the key


def measure(scenario: str, port: int, seconds: int) -> tuple[float, float]:
    """(the value, the number of requests or events it took)."""
    lua = LUA[0]
    if scenario == "c8":
        out = wrk(port, "/v1/completions", 8, seconds, lua)
        return out["rps"], out["requests"]
    if scenario == "c1":
        out = wrk(port, "/v1/completions", 1, seconds, lua)
        return out["p50"], out["requests"]
    out = streams(port, "/v1/chat/completions", CHAT, 8, seconds)
    return out["events_per_s"], out["events"]


def _ratio(a: float, b: float) -> float:
    """a / b; a measurement a stalled machine left at 0 makes its round an outlier, not a crash."""
    return a / b if b else math.inf


def one_round(s: Servers, r: int, seconds: int, scenarios: list[str]) -> dict:
    n = len(PATHS)
    order = PATHS[r % n:] + PATHS[:r % n]
    row: dict = {"round": r + 1, "order": "/".join(order)}
    cpu: dict[str, float] = {}
    for scenario in scenarios:
        value: dict[str, float] = {}
        for path in order:
            name = SCENARIOS[scenario][path]
            pid = s.proc[name].pid if path != "direct" else None
            before = cpu_seconds(pid) if pid else 0.0
            value[path], count = measure(scenario, s.port[name], seconds)
            if pid:
                cpu[f"{scenario} cpu_us {path}"] = (cpu_seconds(pid) - before) * 1e6 / max(count, 1)
        for path in PATHS:
            row[f"{scenario} {path}"] = value[path]
        for path in PATHS[1:]:
            row[f"{scenario} {path}/direct"] = (value[path] - value["direct"] if scenario == "c1"
                                                else _ratio(value[path], value["direct"]))
        if "llamad-old" in PATHS:
            row[f"{scenario} llamad/llamad-old"] = (value["llamad"] - value["llamad-old"] if scenario == "c1"
                                                    else _ratio(value["llamad"], value["llamad-old"]))
            cpu[f"{scenario} cpu llamad/llamad-old"] = _ratio(cpu[f"{scenario} cpu_us llamad"],
                                                              cpu[f"{scenario} cpu_us llamad-old"])
    return {**row, **cpu}


def ping_under_load(s: Servers, seconds: int) -> dict[str, float]:
    """/ping on the health port while the API port is saturated."""
    load = subprocess.Popen(["wrk", "-t", "2", "-c", "8", "-d", f"{seconds + 2}s", "-s", LUA[0],
                             f"http://127.0.0.1:{s.port['llamad_llama']}/v1/completions"],
                            stdout=subprocess.DEVNULL)
    try:
        time.sleep(1)
        ping = wrk(s.port["health_llama"], "/ping", 1, seconds)
        load.wait()
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    return {"health /ping under load p50 ms": ping["p50"], "health /ping under load p99 ms": ping["p99"]}


TITLES = {
    "c8": "POST /v1/completions req/s, c=8",
    "c1": "p50 at c=1 (ms; ratio column: added ms)",
    "sse8": "SSE events/s, synthetic, 8 streams",
    "llama-sse8": "SSE events/s, llama-server, 8 streams",
}


def report(rows: list[dict], scenarios: list[str], seconds: int, ping: dict[str, float]) -> dict[str, float]:
    keys = [k for k in rows[0] if k not in ("round", "order")]
    med = {k: statistics.median(row[k] for row in rows) for k in keys}
    print(f"\ninterleaved: {len(rows)} rounds of {seconds} s, order rotating, medians of per-round ratios to direct")
    print(f"{'measure':<42}{'direct':>11}{'nginx':>11}{'llamad':>11}{'nginx/dir':>11}{'llamad/dir':>12}")
    for sc in scenarios:
        d, n, la = (med[f"{sc} {p}"] for p in PATHS[:3])
        rn, rl = med[f"{sc} nginx/direct"], med[f"{sc} llamad/direct"]
        ratio = "{:>+11.3f}{:>+12.3f}" if sc == "c1" else "{:>11.3f}{:>12.3f}"
        print(f"{TITLES[sc]:<42}{d:>11.2f}{n:>11.2f}{la:>11.2f}" + ratio.format(rn, rl))
    cpu_titles = (("c8", "CPU per request, c=8 (us)"), ("sse8", "CPU per SSE event, synthetic (us)"))
    for sc, title in cpu_titles:
        if sc in scenarios:
            print(f"{title:<42}{'':>11}{med[f'{sc} cpu_us nginx']:>11.1f}{med[f'{sc} cpu_us llamad']:>11.1f}")
    if "llamad-old" in PATHS:
        print("\nllamad against llamad-old (the --baseline build), the same rounds: medians of per-round ratios")
        print(f"{'measure':<42}{'llamad':>11}{'old':>11}{'llamad/dir':>12}{'old/dir':>11}{'llamad/old':>12}")
        for sc in scenarios:
            new, old = med[f"{sc} llamad"], med[f"{sc} llamad-old"]
            ratios = (med[f"{sc} llamad/direct"], med[f"{sc} llamad-old/direct"], med[f"{sc} llamad/llamad-old"])
            ratio = "{:>+12.3f}{:>+11.3f}{:>+12.3f}" if sc == "c1" else "{:>12.3f}{:>11.3f}{:>12.3f}"
            print(f"{TITLES[sc]:<42}{new:>11.2f}{old:>11.2f}" + ratio.format(*ratios))
        for sc, title in cpu_titles:
            if sc in scenarios:
                print(f"{title:<42}{med[f'{sc} cpu_us llamad']:>11.1f}{med[f'{sc} cpu_us llamad-old']:>11.1f}"
                      f"{'':>12}{'':>11}{med[f'{sc} cpu llamad/llamad-old']:>12.3f}")
    print(f"\nhealth /ping while llamad's API port is saturated: p50 {ping['health /ping under load p50 ms']:.2f} ms, "
          f"p99 {ping['health /ping under load p99 ms']:.2f} ms")
    return {**med, **ping}


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=int, default=2)
    p.add_argument("--no-real-sse", action="store_true", help="skip the llama-server SSE scenario")
    p.add_argument("--llamad-set", action="append", default=[], metavar="KEY=VALUE",
                   help="add a TOML key to both llamad configs, e.g. admission.max_queue=64 (repeatable)")
    p.add_argument("--json", metavar="PATH", help="write the final medians as JSON")
    p.add_argument("--policy", action="store_true",
                   help="every request carries an API key with a whole policy (a model glob, token quotas, a rate, "
                        "max_concurrent, a priority class) that llamad checks; llamad writes its access log")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server"))
    p.add_argument("--llamad", metavar="CHECKOUT", type=Path, default=HERE.parent,
                   help="the llamad build to measure: a checkout put first on PYTHONPATH (default: this one)")
    p.add_argument("--baseline", metavar="CHECKOUT", type=Path,
                   help="another llamad build's checkout, measured as a fourth path, llamad-old, in every round")
    args = p.parse_args()
    if args.rounds < 1 or args.seconds < 1:
        raise SystemExit("--rounds and --seconds must be at least 1")
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install wrk nginx-light")
    if not args.llama_server:
        raise SystemExit("llama-server not found: run `make setup` first")
    builds = {"llamad": args.llamad.resolve()}
    if args.baseline:
        builds["llamad-old"] = args.baseline.resolve()
        PATHS.append("llamad-old")
    for checkout in builds.values():
        if not (checkout / "llamad" / "tap.py").is_file():
            raise SystemExit(f"{checkout} is no llamad checkout (no llamad/tap.py)")
    extra = parse_sets(args.llamad_set)
    scenarios = [sc for sc in SCENARIOS if not (sc == "llama-sse8" and args.no_real_sse)]
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="llamad-bench-"))
    if args.policy:
        (work / "keys.toml").write_text(POLICY_KEYS)
        auth = extra.setdefault("auth", {})
        auth.update({"enabled": "true", "keys_file": json.dumps(str(work / "keys.toml")),
                     "priorities": "{interactive = 1}"})
        HEADERS["Authorization"] = f"Bearer {KEY}"
        LUA[0] = str(work / "completions-key.lua")
        Path(LUA[0]).write_text((HERE / "completions.lua").read_text()
                                + f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
    try:
        servers = Servers(args.llama_server, work, extra, builds)
        try:
            for build in builds:
                print(f"{build}: {servers.imported_from(SCENARIOS['c8'][build])}", flush=True)
            rows = []
            for r in range(args.rounds):
                rows.append(one_round(servers, r, args.seconds, scenarios))
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      flush=True)
            ping = ping_under_load(servers, args.seconds)
            med = report(rows, scenarios, args.seconds, ping)
            if args.json:
                Path(args.json).write_text(json.dumps({
                    "method": "interleaved", "rounds": args.rounds, "seconds": args.seconds,
                    "llamad_set": args.llamad_set, "builds": {k: str(v) for k, v in builds.items()},
                    "medians": med}, indent=2) + "\n")
        finally:
            servers.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
