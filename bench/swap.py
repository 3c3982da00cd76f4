"""Model swaps: llama-server's router mode against llamad, in one run.

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python bench/swap.py [--rounds 5] [--swaps 6] [--seconds 4] [--clients 4]

The same demo models (two copies, ``alpha`` and ``beta``) behind both, with room
for ONE loaded model: the router runs ``llama-server --models-dir DIR
--models-max 1``; llamad runs a fleet config whose ``memory_budget`` fits one
model (``memory = "1GiB"`` each, budget 1500 MiB, ``min_resident = 0``).  Both
start their children with ``-c 4096 -np 4``.  Rounds interleave the two sides,
the order rotating, and each round measures:

1. swap time to first byte: a request to the unloaded model while the other is
   loaded (a non-streaming ``/v1/completions`` with ``max_tokens`` 1, then a
   streaming one, the model alternating, ``--swaps`` of each), and the swap
   overhead: that time less the new child's own spawn-to-ready (the stamp of
   its ``listening on`` log line; for llamad also less ``last_start_seconds``
   from ``GET /health``, llamad's own spawn-to-ready);
2. requests/s with requests alternating between the two models (every one a
   swap when sequential), from 1 client and from ``--clients`` concurrent
   clients, half non-streaming and half streaming; every failed or cut
   request (status != 200, a stream without ``[DONE]``, a time-out) is counted.

Prints a markdown table.  Times are medians and p90s over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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

BIN = Path(sys.executable).parent
MODELS = ("alpha", "beta")
REQUEST_TIMEOUT = 60.0
# llama.cpp stamps each line with the time since its start: MM.SS.mmm.uuu
STAMP = rb"(\d+)\.(\d+)\.(\d+)\.(\d+) [^\n]*llama_server: listening on"


def stamp_seconds(groups: tuple[bytes, ...]) -> float:
    minutes, seconds, millis, micros = (int(x) for x in groups)
    return minutes * 60 + seconds + millis / 1e3 + micros / 1e6


# --- the client ------------------------------------------------------------------------

class Result:
    __slots__ = ("status", "ok", "first_byte", "first_event", "total", "body")

    def __init__(self) -> None:
        self.status = 0
        self.ok = False
        self.first_byte = 0.0
        self.first_event = 0.0
        self.total = 0.0
        self.body = b""


async def request(port: int, model: str, stream: bool) -> Result:
    """One POST /v1/completions on a new connection (``Connection: close``)."""
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1, "stream": stream}).encode()
    result = Result()
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return result
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        received = b""
        deadline = started + REQUEST_TIMEOUT
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.001, deadline - time.perf_counter()))
            if not chunk:
                break
            now = time.perf_counter() - started
            if not received:
                result.first_byte = now
            received += chunk
            if not result.first_event and b"\r\n\r\n" in received:
                if b"data:" in received.partition(b"\r\n\r\n")[2]:
                    result.first_event = now
            if b"[DONE]" in received and received.endswith(b"0\r\n\r\n"):
                break
        result.total = time.perf_counter() - started
        if received.startswith(b"HTTP/1.1 "):
            result.status = int(received[9:12])
        body_bytes = received.partition(b"\r\n\r\n")[2]
        result.body = body_bytes[:300]
        result.ok = result.status == 200 and (b"data: [DONE]" in body_bytes if stream else b'"choices"' in body_bytes)
    except (OSError, asyncio.TimeoutError, ValueError):
        pass
    finally:
        writer.close()
    return result


def get_json(port: int, path: str) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return json.loads(body)


def wait_up(port: int, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get_json(port, path)
            return
        except (OSError, ValueError):
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not answer {path} within {timeout} s")


# --- the two sides ------------------------------------------------------------------------

class Side:
    name = ""
    port = 0

    def __init__(self, work: Path, procs: list[subprocess.Popen[bytes]]) -> None:
        self.work = work
        self.procs = procs

    def spawn(self, argv: list[str], log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "PORT_HEALTH", "MODEL_PATH", "MODEL_NAME")}
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.work))

    def mark(self, model: str) -> int:
        """Where the log of ``model``'s next start will begin."""
        path = self.log_of(model)
        return path.stat().st_size if path.exists() else 0

    def log_of(self, model: str) -> Path:
        raise NotImplementedError

    def child_ready(self, model: str, mark: int, timeout: float = 3.0) -> float | None:
        """The child's own spawn-to-ready of the start of ``model`` logged after ``mark``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._find_ready(model, mark)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    def _find_ready(self, model: str, mark: int) -> float | None:
        raise NotImplementedError

    def spawn_to_ready(self, model: str) -> float | None:
        return None


class Router(Side):
    name = "llama-server router"

    def __init__(self, work: Path, procs: list[subprocess.Popen[bytes]], llama_server: str, models: Path) -> None:
        super().__init__(work, procs)
        self.port = free_port()
        self.log = work / "router.log"
        self.spawn([llama_server, "--models-dir", str(models), "--models-max", "1", "--host", "127.0.0.1",
                    "--port", str(self.port), "-c", "4096", "-np", "4"], self.log)
        wait_up(self.port, "/models")

    def log_of(self, model: str) -> Path:
        return self.log

    def _find_ready(self, model: str, mark: int) -> float | None:
        with open(self.log, "rb") as f:
            f.seek(mark)
            text = f.read()
        spawned = re.search(rb"spawning server instance with name=%s on port (\d+)" % model.encode(), text)
        if not spawned:
            return None
        port = spawned.group(1)
        ready = re.search(rb"^\[%s\] %s" % (port, STAMP), text[spawned.end():], re.MULTILINE)
        return stamp_seconds(ready.groups()) if ready else None


class Llamad(Side):
    name = "llamad"

    def __init__(self, work: Path, procs: list[subprocess.Popen[bytes]], llama_server: str, models: Path) -> None:
        super().__init__(work, procs)
        self.port, health = free_port(), free_port()
        self.data = work / "llamad-data"
        config = work / "llamad.toml"
        config.write_text(
            f'data_dir = "{self.data}"\n'
            f'[api]\nlisten = "tcp:{self.port}:interface=127.0.0.1"\n'
            f'[health]\nlisten = "tcp:{health}:interface=127.0.0.1"\n'
            f'[backend]\ncommand = "{llama_server}"\ncontext = 4096\nparallel = 4\n'
            f'[admission]\nmax_queue = 1024\n'
            f'[fleet]\nmemory_budget = "1500MiB"\nmin_resident = 0\n'
            + "".join(f'[models.{m}]\nmodel = "{models / (m + ".gguf")}"\nmemory = "1GiB"\n' for m in MODELS))
        self.spawn([str(BIN / "twistd"), "-n", "--pidfile=", "llamad", "--config", str(config)],
                   work / "llamad.log")
        wait_up(self.port, "/health")

    def log_of(self, model: str) -> Path:
        return self.data / "logs" / "llama" / model / "latest.txt"

    def _find_ready(self, model: str, mark: int) -> float | None:
        path = self.log_of(model)
        if not path.exists():
            return None
        with open(path, "rb") as f:
            f.seek(mark)
            text = f.read()
        ready = re.search(rb"^\S+Z %s" % STAMP, text, re.MULTILINE)
        return stamp_seconds(ready.groups()) if ready else None

    def spawn_to_ready(self, model: str) -> float | None:
        return get_json(self.port, "/health")["models"][model]["last_start_seconds"]


# --- the measures ------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.ttfb: dict[str, list[float]] = {"plain": [], "stream": [], "stream_event": []}
        self.child: list[float] = []  # the child's own spawn-to-ready (its log stamp)
        self.over_child: list[float] = []  # TTFB less that
        self.spawn_ready: list[float] = []  # llamad's last_start_seconds
        self.over_spawn: list[float] = []  # TTFB less that
        self.rps: dict[int, list[float]] = {}
        self.requests = 0
        self.failed = 0
        self.slowest = 0.0  # the longest request of the throughput runs
        self.why: dict[str, int] = {}  # failures by kind
        self.example: dict[str, bytes] = {}  # the first body of each kind

    def fail(self, r: Result, stream: bool, where: str) -> None:
        self.failed += 1
        what = (f"HTTP {r.status}" if r.status not in (0, 200) else "no response" if not r.first_byte
                else "stream without [DONE]" if stream else "cut response")
        key = f"{what} ({where})"
        self.why[key] = self.why.get(key, 0) + 1
        self.example.setdefault(key, r.body)


def swaps(side: Side, tally: Tally, n: int) -> None:
    asyncio.run(request(side.port, MODELS[0], False))  # MODELS[0] loaded, untimed
    loaded = 0
    for i in range(2 * n):
        model = MODELS[1 - loaded]
        stream = bool(i % 2)
        mark = side.mark(model)
        r = asyncio.run(request(side.port, model, stream))
        loaded = 1 - loaded
        tally.requests += 1
        if not r.ok:
            tally.fail(r, stream, "swap")
            continue
        tally.ttfb["stream" if stream else "plain"].append(r.first_byte)
        if stream:
            tally.ttfb["stream_event"].append(r.first_event)
        answered = r.first_event if stream else r.first_byte  # the first byte of the answer itself
        child = side.child_ready(model, mark)
        if child is not None:
            tally.child.append(child)
            tally.over_child.append(answered - child)
        spawn = side.spawn_to_ready(model)
        if spawn is not None:
            tally.spawn_ready.append(spawn)
            tally.over_spawn.append(answered - spawn)


async def alternating(port: int, tally: Tally, clients: int, seconds: float) -> tuple[int, float]:
    """Requests alternating between the models from ``clients`` clients: (ok, seconds)."""
    deadline = time.perf_counter() + seconds
    ok = 0

    async def client(c: int) -> None:
        nonlocal ok
        i = c
        while time.perf_counter() < deadline:
            stream = bool((i // 2) % 2)
            r = await request(port, MODELS[i % 2], stream)
            i += 1
            tally.requests += 1
            tally.slowest = max(tally.slowest, r.total)
            if r.ok:
                ok += 1
            else:
                tally.fail(r, stream, f"{clients} client{'s' if clients > 1 else ''}")

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return ok, time.perf_counter() - started


def throughput(side: Side, tally: Tally, clients: int, seconds: float) -> None:
    for n in sorted({1, clients}):
        ok, elapsed = asyncio.run(alternating(side.port, tally, n, seconds))
        tally.rps.setdefault(n, []).append(ok / elapsed)


# --- the report ------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def ms(values: list[float], p90: bool = True) -> str:
    if not values:
        return "-"
    text = f"{statistics.median(values) * 1000:.1f}"
    return text + (f" / {pct(values, 0.9) * 1000:.1f} ms" if p90 else " ms")


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b or not statistics.median(a):
        return ""
    return f"{statistics.median(b) / statistics.median(a):.2f}"


def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{len(os.sched_getaffinity(0))} CPUs (nproc), {model}"


def report(router: Tally, llamad: Tally, args: argparse.Namespace) -> str:
    r, l = router, llamad
    rows = [
        ("swap, non-streaming: first byte, p50 / p90", ms(r.ttfb["plain"]), ms(l.ttfb["plain"]),
         ratio(r.ttfb["plain"], l.ttfb["plain"])),
        ("swap, streaming: first byte, p50 / p90", ms(r.ttfb["stream"]), ms(l.ttfb["stream"]),
         ratio(r.ttfb["stream"], l.ttfb["stream"])),
        ("swap, streaming: first event, p50 / p90", ms(r.ttfb["stream_event"]), ms(l.ttfb["stream_event"]),
         ratio(r.ttfb["stream_event"], l.ttfb["stream_event"])),
        ("new child's own spawn-to-ready (its log stamp), p50 / p90", ms(r.child), ms(l.child), ""),
        ("first byte of the answer (streaming: first event) less the child's own spawn-to-ready, p50 / p90", ms(r.over_child), ms(l.over_child),
         ratio(r.over_child, l.over_child)),
        ("llamad's spawn-to-ready (`last_start_seconds`), p50 / p90", "", ms(l.spawn_ready), ""),
        ("first byte of the answer less `last_start_seconds`, p50 / p90 (target <= 25 ms)", "", ms(l.over_spawn), ""),
    ]
    for n, label in ((1, "1 client"), (args.clients, f"{args.clients} concurrent clients")):
        if n in r.rps:
            rows.append((f"req/s alternating two models, {label} (median of rounds)",
                         f"{statistics.median(r.rps[n]):.1f}", f"{statistics.median(l.rps[n]):.1f}",
                         ratio(r.rps[n], l.rps[n])))
    rows.append(("slowest request of the throughput runs", ms([r.slowest], False), ms([l.slowest], False), ""))
    rows.append(("failed or cut requests (status != 200, stream without [DONE])",
                 f"{r.failed} of {r.requests}", f"{l.failed} of {l.requests}", ""))
    lines = [f"machine: {machine()}; {args.rounds} rounds, {2 * args.swaps} swaps per side per round, "
             f"{args.seconds:g} s per throughput run", "",
             "| measure | llama-server router | llamad | llamad/router |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    for tally, name in ((r, "router"), (l, "llamad")):
        if tally.why:
            lines.append(f"\n{name} failures: " + ", ".join(f"{n} {k}" for k, n in sorted(tally.why.items())))
            for k, body in sorted(tally.example.items()):
                print(f"{name}, {k}, first body: {body!r}", file=sys.stderr)
    return "\n".join(lines)


# --- processes ------------------------------------------------------------------------

def descendants(pids: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    kids = descendants([p.pid for p in procs if p.poll() is None])
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in kids:  # the children they started, should one outlive its parent
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--swaps", type=int, default=6, help="timed swaps of each kind per side per round")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per throughput run")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args()
    if not args.llama_server:
        raise SystemExit("no llama-server: put the venv's bin on PATH (make setup builds it)")
    work = Path(tempfile.mkdtemp(prefix="llamad-swap-"))
    models = work / "models"
    models.mkdir()
    for m in MODELS:
        write_demo_model(str(models / f"{m}.gguf"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sides: list[Side] = [Router(work, procs, args.llama_server, models),
                             Llamad(work, procs, args.llama_server, models)]
        tallies = {side.name: Tally() for side in sides}
        for side in sides:  # warm-up: every model loaded once, untimed
            for m in MODELS + MODELS:
                asyncio.run(request(side.port, m, False))
        for rnd in range(args.rounds):
            order = sides[rnd % 2:] + sides[:rnd % 2]
            for side in order:
                swaps(side, tallies[side.name], args.swaps)
            for side in order[::-1]:
                throughput(side, tallies[side.name], args.clients, args.seconds)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        print(report(tallies[sides[0].name], tallies[sides[1].name], args))
    finally:
        stop(procs)
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
