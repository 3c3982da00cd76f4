"""What keeping the KV cache across swaps buys: llamad against llama-server's router and against llamad
with ``kv_cache = false``, in interleaved rounds of one run.

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python bench/kv.py [--rounds 3] [--swaps 3] [--seconds 60] [--clients 8]
                                                          [--set fleet.min_resident=0 ...]

Three copies of the large demo model (``llamad demo-model --size large``, so that a 2,000-token prompt costs
real time on a CPU), ``alpha``, ``beta`` and ``gamma``, in one directory, with room for ONE loaded model and
children at ``-c 8192 -np 2`` on every side:

- router: ``llama-server --models-dir DIR --models-max 1 -c 8192 -np 2``;
- llamad: ``twistd -n llamad`` with ``fleet.models_dir = DIR``, ``fleet.max_loaded = 1``, ``backend.context =
  8192``, ``backend.parallel = 2``, every other key at its default (``kv_cache = true``);
- kv off: the same llamad with ``backend.kv_cache = false``.

``--set KEY=VALUE`` (repeatable) is passed on to both llamads.  Each round measures, the sides in an order
that rotates from round to round:

1. The swap back (``--swaps`` times per side, the sides taking turns): a new ~2,000-token prefix; alpha
   with the prefix and a short question, then beta (``Hello``: a swap), then alpha again with the same
   prefix and another question, streamed: its time to first token (the first event), with the prompt
   tokens the child evaluated (``timings.prompt_n``) and those it reused (``cached_tokens``), and the new
   child's own spawn-to-ready (its ``listening on`` log stamp).  The first alpha request's
   ``timings.prompt_ms`` is what the whole prefix costs the child.
2. A mixed workload: ``--clients`` closed-loop clients send non-streaming ``/v1/completions`` to alpha, beta
   or gamma drawn with weights 0.5/0.3/0.2, each request its model's prefix (~2,000 tokens, one per model,
   new each round) and a short question (new each request), ``max_tokens`` 8, for ``--seconds``: the
   requests completed with 200 before the deadline per second; failed counts every request of the run that
   did not complete (status != 200, no answer, a cut body, none within 300 s), those that end after the
   deadline included; slowest is the longest request of the run.  Client c of round r draws the same models
   and questions on every side.

The summary gives each side's median and the median of the per-round ratios (llamad/router, llamad/kv off);
a round's time to first token is the median of its swaps.  Each round line shows the 1-minute load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import start_llamad, start_router, stop_all, stop_on_signals
from llamad.demo import write_demo_model
from swap import STAMP, machine, stamp_seconds  # bench/ is on sys.path when this file runs

MODELS = ("alpha", "beta", "gamma")
WEIGHTS = (0.5, 0.3, 0.2)
SIDES = ("router", "llamad", "kv off")
CONTEXT, PARALLEL = 8192, 2
PREFIX_CHARS = 2000  # the demo vocab has one token per character
MAX_TOKENS = 8
REQUEST_TIMEOUT = 300.0  # far past any wait a sound placement causes: a slow request is measured, not cut
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TTFT_GOAL = 0.2  # llamad's swap-back time to first token, at most this fraction of the others'
RPS_GOAL = 2.0  # llamad's completed requests/s in the mixed workload, at least this multiple of the router's


def words(rng: random.Random, chars: int) -> str:
    """About ``chars`` tokens of random words."""
    out: list[str] = []
    size = 0
    while size < chars:
        word = "".join(rng.choices(LETTERS, k=rng.randint(2, 9)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def question(rng: random.Random) -> str:
    return "\nQuestion: " + words(rng, 20) + "?\nAnswer:"


# --- the client ------------------------------------------------------------------------

class Outcome:
    __slots__ = ("ok", "status", "first_token", "seconds", "ended", "body", "prompt_n", "prompt_ms", "cached")

    def __init__(self) -> None:
        self.ok = False
        self.status = 0
        self.first_token = 0.0  # seconds to the first event of a stream
        self.seconds = 0.0
        self.ended = 0.0  # perf_counter at the end
        self.body = b""
        self.prompt_n = -1  # prompt tokens the child evaluated (timings.prompt_n)
        self.prompt_ms = 0.0
        self.cached = -1  # prompt tokens it reused (usage.prompt_tokens_details.cached_tokens)


def dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


def read_stats(out: Outcome, doc: dict[str, Any]) -> None:
    timings, usage = doc.get("timings"), doc.get("usage")
    if isinstance(timings, dict):
        out.prompt_n = int(timings.get("prompt_n", -1))
        out.prompt_ms = float(timings.get("prompt_ms", 0.0))
    if isinstance(usage, dict):
        out.cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", -1))


async def complete(port: int, model: str, prompt: str, max_tokens: int, stream: bool) -> Outcome:
    """One POST /v1/completions on a new connection (``Connection: close``), read to EOF."""
    payload: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    if stream:
        payload.update(stream=True, stream_options={"include_usage": True})
    body = json.dumps(payload).encode()
    out = Outcome()
    started = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            received = b""
            while chunk := await reader.read(65536):
                received += chunk
                if stream and not out.first_token and b"data: {" in received.partition(b"\r\n\r\n")[2]:
                    out.first_token = time.perf_counter() - started
        head, _, raw = received.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 "):
            out.status = int(head[9:12])
        data = dechunk(raw) if b"transfer-encoding: chunked" in head.lower() else raw
        out.body = data[:300]
        if stream:
            events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: {")]
            out.ok = out.status == 200 and bool(events) and b"data: [DONE]" in data
            for event in events:
                read_stats(out, json.loads(event))
        else:
            doc = json.loads(data) if out.status == 200 else {}
            out.ok = out.status == 200 and bool(doc.get("choices"))
            read_stats(out, doc)
    except (OSError, TimeoutError, ValueError):
        pass
    finally:
        if writer is not None:
            writer.close()
    out.ended = time.perf_counter()
    out.seconds = out.ended - started
    return out


def get_text(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return (dechunk(body) if b"transfer-encoding: chunked" in head.lower() else body).decode("utf-8", "replace")


# --- the sides ------------------------------------------------------------------------

class Side:
    def __init__(self, name: str, port: int, work: Path) -> None:
        self.name = name
        self.port = port
        self.work = work
        self.stem = name.replace(" ", "-")  # its files under work: STEM.log, STEM-data/

    def log_of(self, model: str) -> Path:
        if self.name == "router":
            return self.work / "router.log"
        return self.work / f"{self.stem}-data" / "logs" / "llama" / model / "latest.txt"

    def mark(self, model: str) -> int:
        """Where the log of ``model``'s next start will begin."""
        path = self.log_of(model)
        return path.stat().st_size if path.exists() else 0

    def child_ready(self, model: str, mark: int) -> float | None:
        """The child's own spawn-to-ready (its ``listening on`` stamp) of the start of ``model`` after ``mark``."""
        deadline = time.monotonic() + 2
        while True:
            path = self.log_of(model)
            text = b""
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(mark)
                    text = f.read()
            if self.name == "router":
                spawned = re.search(rb"spawning server instance with name=%s on port (\d+)" % model.encode(), text)
                ready = spawned and re.search(rb"^\[%s\] %s" % (spawned.group(1), STAMP), text[spawned.end():],
                                              re.MULTILINE)
            else:
                ready = re.search(rb"^\S+Z %s" % STAMP, text, re.MULTILINE)
            if ready:
                return stamp_seconds(ready.groups())
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def loads(self) -> int:
        """Model loads so far: the router's log lines; llamad's start-duration histograms."""
        if self.name == "router":
            return (self.work / "router.log").read_bytes().count(b"spawning server instance with name=")
        text = get_text(self.port, "/metrics")
        return sum(int(float(v)) for v in
                   re.findall(r"^llamad_backend_start_duration_seconds_count\{[^}]*\} (\S+)$", text, re.MULTILINE))


class Tally:
    """One side's figures, by round."""

    def __init__(self) -> None:
        self.ttft: list[list[float]] = []  # the swap back's time to first token, per round
        self.evaluated: list[int] = []  # its prompt tokens evaluated
        self.cached: list[int] = []  # its prompt tokens reused
        self.child: list[float] = []  # the swap back's new child: its own spawn-to-ready
        self.prefix_ms: list[float] = []  # the first request's timings.prompt_ms (whole prefix)
        self.prefix_n: list[int] = []
        self.rps: list[float] = []
        self.requests = 0
        self.failed = 0
        self.slowest = 0.0
        self.loads: list[int] = []  # model loads per mixed run
        self.why: dict[str, int] = {}
        self.example: dict[str, bytes] = {}

    def fail(self, out: Outcome, where: str) -> None:
        self.failed += 1
        why = f"{f'HTTP {out.status}' if out.status else 'no answer'} ({where})"
        self.why[why] = self.why.get(why, 0) + 1
        self.example.setdefault(why, out.body)


def swap_back(side: Side, tally: Tally, seed: int) -> None:
    """alpha with a new prefix, beta, alpha again with the same prefix: the last one's TTFT."""
    rng = random.Random(seed)
    prefix = words(rng, PREFIX_CHARS)
    q1, q2 = question(rng), question(rng)
    first = asyncio.run(complete(side.port, MODELS[0], prefix + q1, MAX_TOKENS, True))
    other = asyncio.run(complete(side.port, MODELS[1], "Hello", 1, False))
    mark = side.mark(MODELS[0])
    back = asyncio.run(complete(side.port, MODELS[0], prefix + q2, MAX_TOKENS, True))
    tally.requests += 3
    for out, where in ((first, "swap back, first"), (other, "swap back, other model"), (back, "swap back")):
        if not out.ok:
            tally.fail(out, where)
    if first.ok and first.prompt_n > 0:
        tally.prefix_ms.append(first.prompt_ms)
        tally.prefix_n.append(first.prompt_n)
    if back.ok:
        tally.ttft[-1].append(back.first_token)
        tally.evaluated.append(back.prompt_n)
        tally.cached.append(back.cached)
        child = side.child_ready(MODELS[0], mark)
        if child is not None:
            tally.child.append(child)


async def workload(port: int, tally: Tally, clients: int, seconds: float, seed: int) -> float:
    """The mixed workload; its completed requests/s."""
    prng = random.Random(seed)
    prefixes = {m: words(prng, PREFIX_CHARS) for m in MODELS}
    deadline = time.perf_counter() + seconds
    in_time = 0

    async def client(c: int) -> None:
        nonlocal in_time
        rng = random.Random(seed * 1000 + c)
        while time.perf_counter() < deadline:
            model = rng.choices(MODELS, WEIGHTS)[0]
            out = await complete(port, model, prefixes[model] + question(rng), MAX_TOKENS, False)
            tally.requests += 1
            tally.slowest = max(tally.slowest, out.seconds)
            if out.ok:
                in_time += out.ended <= deadline
            else:
                tally.fail(out, "mixed")

    await asyncio.gather(*(client(c) for c in range(clients)))
    return in_time / seconds


def mixed(side: Side, tally: Tally, clients: int, seconds: float, seed: int) -> None:
    before = side.loads()
    tally.rps.append(asyncio.run(workload(side.port, tally, clients, seconds, seed)))
    tally.loads.append(side.loads() - before)


# --- the report ------------------------------------------------------------------------

def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b) if y and x == x and y == y]


def report(tallies: dict[str, Tally], args: argparse.Namespace) -> str:
    router, llamad, off = (tallies[s] for s in SIDES)
    round_ttft = {s: [med(t) for t in tallies[s].ttft] for s in SIDES}
    ttft_router = med(ratios(round_ttft["llamad"], round_ttft["router"]))
    ttft_off = med(ratios(round_ttft["llamad"], round_ttft["kv off"]))
    rps_router = med(ratios(llamad.rps, router.rps))
    rps_off = med(ratios(llamad.rps, off.rps))
    all_ttft = {s: [x for t in tallies[s].ttft for x in t] for s in SIDES}

    def ms(values: list[float]) -> str:
        return f"{med(values) * 1000:.0f} ms" if values else "-"

    def tokens(t: Tally) -> str:
        return f"{med(t.evaluated):.0f} / {med(t.cached):.0f}" if t.evaluated else "-"

    def prefix(t: Tally) -> str:
        return f"{med(t.prefix_ms) / 1000:.2f} s ({med(t.prefix_n):.0f} tokens)" if t.prefix_ms else "-"

    rows = [
        ("swap back: time to first token, median", *(ms(all_ttft[s]) for s in SIDES),
         f"{ttft_router:.3f}", f"{ttft_off:.3f}"),
        ("swap back: of which the new child's own spawn-to-ready (its log stamp), median",
         *(ms(tallies[s].child) for s in SIDES), "", ""),
        ("swap back: prompt tokens evaluated / reused, median", *(tokens(tallies[s]) for s in SIDES), "", ""),
        ("a new prefix: the child's prompt time, median", *(prefix(tallies[s]) for s in SIDES), "", ""),
        ("mixed: completed requests/s, median of rounds", *(f"{med(tallies[s].rps):.2f}" for s in SIDES),
         f"{rps_router:.2f}", f"{rps_off:.2f}"),
        ("mixed: model loads per run, median", *(f"{med(tallies[s].loads):.0f}" for s in SIDES), "", ""),
        ("mixed: slowest request", *(f"{tallies[s].slowest:.2f} s" for s in SIDES), "", ""),
        ("failed requests (all parts)", *(f"{tallies[s].failed} of {tallies[s].requests}" for s in SIDES), "", ""),
    ]
    settings = " ".join(args.overrides) or "defaults"
    lines = [f"machine: {machine()}; {args.rounds} rounds, {args.swaps} swaps back per side per round, "
             f"mixed: {args.clients} clients x {args.seconds:g} s per side per round; llamad: {settings}", "",
             "| measure | router | llamad | kv off | llamad/router | llamad/kv off |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("\nratios: medians of the per-round ratios (a round's time to first token: the median of its swaps)")
    lines.append(f"goal, swap back: llamad/router <= {TTFT_GOAL} and llamad/kv off <= {TTFT_GOAL}: "
                 + ("met" if ttft_router <= TTFT_GOAL and ttft_off <= TTFT_GOAL else "NOT met"))
    lines.append(f"goal, mixed: llamad/router >= {RPS_GOAL:g} with none failed: "
                 + ("met" if rps_router >= RPS_GOAL and not llamad.failed else "NOT met"))
    for name in SIDES:
        t = tallies[name]
        if t.why:
            lines.append(f"{name} failures: " + ", ".join(f"{n} {w}" for w, n in sorted(t.why.items())))
            for w, body in sorted(t.example.items()):
                print(f"{name}, {w}, first body: {body!r}", file=sys.stderr)
    return "\n".join(lines)


def round_line(rnd: int, args: argparse.Namespace, order: list[str], tallies: dict[str, Tally]) -> str:
    parts = []
    for s in SIDES:
        t = tallies[s]
        parts.append(f"{s}: ttft {med(t.ttft[-1]) * 1000:.0f} ms, {t.rps[-1]:.2f} req/s, {t.loads[-1]} loads")
    return (f"round {rnd + 1}/{args.rounds} ({' > '.join(order)}; load average {os.getloadavg()[0]:.1f}): "
            + "; ".join(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--swaps", type=int, default=3, help="timed swaps back per side per round")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of the mixed workload per side per round")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both llamads (twistd's --set), repeatable")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args()
    if not args.llama_server:
        raise SystemExit("no llama-server: put the venv's bin on PATH (make setup builds it)")
    stop_on_signals()
    work = Path(tempfile.mkdtemp(prefix="llamad-kv-"))
    models = work / "models"
    models.mkdir()
    for m in MODELS:
        write_demo_model(str(models / f"{m}.gguf"), size="large")
    procs: list[subprocess.Popen[bytes]] = []
    child = {"context": CONTEXT, "parallel": PARALLEL}
    print(f"machine: {machine()}; large demo model, ~{PREFIX_CHARS}-token prefixes, -c {CONTEXT} -np {PARALLEL}, "
          f"room for one model", flush=True)
    try:
        ports = {
            "router": start_router(work, procs, args.llama_server, models,
                                   ["-c", str(CONTEXT), "-np", str(PARALLEL)]),
            "llamad": start_llamad(work, procs, args.llama_server, models, args.overrides, "llamad", child),
            "kv off": start_llamad(work, procs, args.llama_server, models, args.overrides, "kv-off",
                                   {**child, "kv_cache": False}),
        }
        sides = {name: Side(name, port, work) for name, port in ports.items()}
        for side in sides.values():  # warm-up: every model loaded once, untimed
            for m in MODELS:
                warm = asyncio.run(complete(side.port, m, "Hello", 1, False))
                if not warm.ok:
                    raise SystemExit(f"warm-up request to {m} on {side.name} failed: {warm.status} {warm.body!r}")
        tallies = {s: Tally() for s in SIDES}
        for rnd in range(args.rounds):
            order = list(SIDES[rnd % 3:] + SIDES[:rnd % 3])
            for name in order:
                tallies[name].ttft.append([])
            for i in range(args.swaps):  # side by side, so that the machine's drift reaches all three alike
                for name in order:
                    swap_back(sides[name], tallies[name], rnd * 100 + i)
            for name in order:
                mixed(sides[name], tallies[name], args.clients, args.seconds, rnd)
            print(round_line(rnd, args, order, tallies), flush=True)
        print(report(tallies, args))
    except KeyboardInterrupt as e:
        raise SystemExit(f"interrupted ({str(e) or 'SIGINT'}): stopping what was started") from None
    finally:
        stop_all(procs)
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
