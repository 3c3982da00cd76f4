"""A mixed multi-model workload: llama-server's router mode against llamad, in interleaved rounds.

    PATH=$PWD/.venv/bin:$PATH .venv/bin/python bench/mixed.py [--rounds 3] [--seconds 20] [--clients 6]
                                                             [--set fleet.min_resident=0 ...]

Three copies of the demo model (``alpha``, ``beta``, ``gamma``) in one directory, room for ONE loaded
model and two slots per child.  The router runs ``llama-server --models-dir DIR --models-max 1 -np 2``;
llamad runs ``twistd -n llamad`` with ``fleet.models_dir = DIR``, ``fleet.max_loaded = 1`` and
``backend.parallel = 2``, every other key at its default; ``--set KEY=VALUE`` (repeatable) is passed on to
twistd, e.g. ``--set fleet.min_resident=0``.

The workload: ``--clients`` clients, each in a closed loop, send non-streaming ``/v1/completions`` with a
~600-token prompt (random letters and spaces: one token per character in the demo vocab, new on every
request, so no prompt cache helps) and ``max_tokens`` 4 to alpha, beta or gamma drawn with weights
0.5/0.3/0.2, for ``--seconds``.  Client c of round r draws the same models and prompts on both sides.

Per run: requests/s counts the requests that completed with 200 before the deadline, over ``--seconds``;
failed counts every request of the run that did not (status != 200, no answer, a cut body, no answer
within 300 s), those that end after the deadline included; slowest is the longest request of the run.
Rounds alternate which side goes first; the summary is the median of the per-round ratios llamad/router
of requests/s, next to each side's median requests/s, total failures and slowest request.  Each round
line shows the 1-minute load average: on a shared machine, other work moves single rounds a lot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import start_llamad, start_router, stop_all
from llamad.demo import write_demo_model
from swap import machine  # bench/ is on sys.path when this file runs

MODELS = ("alpha", "beta", "gamma")
WEIGHTS = (0.5, 0.3, 0.2)
PROMPT_CHARS = 600  # the demo vocab has one token per character
MAX_TOKENS = 4
REQUEST_TIMEOUT = 300.0  # far past any wait a sound placement causes: a slow request is measured, not cut
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def prompt(rng: random.Random) -> str:
    """About PROMPT_CHARS tokens of words, fresh each time."""
    words: list[str] = []
    size = 0
    while size < PROMPT_CHARS:
        word = "".join(rng.choices(LETTERS, k=rng.randint(2, 9)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


class Outcome:
    __slots__ = ("ok", "status", "seconds", "ended", "body")

    def __init__(self) -> None:
        self.ok = False
        self.status = 0
        self.seconds = 0.0
        self.ended = 0.0  # perf_counter at the end
        self.body = b""


async def complete(port: int, model: str, text: str) -> Outcome:
    """One POST /v1/completions on a new connection (``Connection: close``), read to EOF."""
    body = json.dumps({"model": model, "prompt": text, "max_tokens": MAX_TOKENS}).encode()
    out = Outcome()
    started = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            received = await reader.read()
        if received.startswith(b"HTTP/1.1 "):
            out.status = int(received[9:12])
        out.body = received.partition(b"\r\n\r\n")[2][:300]
        out.ok = out.status == 200 and b'"choices"' in received
    except (OSError, TimeoutError, ValueError):
        pass
    finally:
        if writer is not None:
            writer.close()
    out.ended = time.perf_counter()
    out.seconds = out.ended - started
    return out


class Run:
    """One side's run of one round."""

    def __init__(self) -> None:
        self.rps = 0.0
        self.requests = 0
        self.failed = 0
        self.slowest = 0.0
        self.why: dict[str, int] = {}
        self.example: dict[str, bytes] = {}


async def workload(port: int, clients: int, seconds: float, seed: int) -> Run:
    run = Run()
    deadline = time.perf_counter() + seconds
    in_time = 0

    async def client(c: int) -> None:
        nonlocal in_time
        rng = random.Random(seed * 1000 + c)
        while time.perf_counter() < deadline:
            model = rng.choices(MODELS, WEIGHTS)[0]
            out = await complete(port, model, prompt(rng))
            run.requests += 1
            run.slowest = max(run.slowest, out.seconds)
            if out.ok:
                in_time += out.ended <= deadline
            else:
                run.failed += 1
                why = f"HTTP {out.status}" if out.status else "no answer"
                run.why[why] = run.why.get(why, 0) + 1
                run.example.setdefault(why, out.body)

    await asyncio.gather(*(client(c) for c in range(clients)))
    run.rps = in_time / seconds
    return run


# --- the report ------------------------------------------------------------------------

def line(name: str, run: Run) -> str:
    why = "" if not run.why else " (" + ", ".join(f"{n} {k}" for k, n in sorted(run.why.items())) + ")"
    return (f"  {name:<7} {run.rps:6.2f} req/s  {run.requests:4d} requests  {run.failed} failed{why}  "
            f"slowest {run.slowest:6.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per run")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for llamad (twistd's --set), repeatable")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server"))
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args()
    if not args.llama_server:
        raise SystemExit("no llama-server: put the venv's bin on PATH (make setup builds it)")
    work = Path(tempfile.mkdtemp(prefix="llamad-mixed-"))
    models = work / "models"
    models.mkdir()
    for m in MODELS:
        write_demo_model(str(models / f"{m}.gguf"))
    procs: list[subprocess.Popen[bytes]] = []
    settings = " ".join(args.overrides) or "defaults"
    print(f"machine: {machine()}; {args.clients} clients, {args.seconds:g} s per run, "
          f"{PROMPT_CHARS}-token prompts, max_tokens {MAX_TOKENS}, models "
          + "/".join(f"{m} {w:g}" for m, w in zip(MODELS, WEIGHTS)) + f"; llamad: {settings}", flush=True)
    try:
        ports = {"router": start_router(work, procs, args.llama_server, models),
                 "llamad": start_llamad(work, procs, args.llama_server, models, args.overrides)}
        for port in ports.values():  # warm-up: every model loaded once, untimed
            for m in MODELS:
                warm = asyncio.run(complete(port, m, "Hello"))
                if not warm.ok:
                    raise SystemExit(f"warm-up request to {m} on port {port} failed: {warm.status} {warm.body!r}")
        runs: dict[str, list[Run]] = {"router": [], "llamad": []}
        ratios: list[float] = []
        for rnd in range(args.rounds):
            order = ["router", "llamad"] if rnd % 2 == 0 else ["llamad", "router"]
            for name in order:
                runs[name].append(asyncio.run(workload(ports[name], args.clients, args.seconds, rnd)))
            router, llamad = runs["router"][-1], runs["llamad"][-1]
            ratio = llamad.rps / router.rps if router.rps else float("nan")
            ratios.append(ratio)
            print(f"round {rnd + 1}/{args.rounds} ({order[0]} first): llamad/router {ratio:.2f}  "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
            for name in ("router", "llamad"):
                print(line(name, runs[name][-1]), flush=True)
        print(f"summary over {args.rounds} rounds: median llamad/router of req/s {statistics.median(ratios):.2f}")
        for name in ("router", "llamad"):
            rs = runs[name]
            print(f"  {name:<7} median {statistics.median(r.rps for r in rs):6.2f} req/s  "
                  f"{sum(r.failed for r in rs)} failed of {sum(r.requests for r in rs)}  "
                  f"slowest {max(r.slowest for r in rs):6.2f} s")
        sys.stdout.flush()
        for name in ("router", "llamad"):
            examples: dict[str, bytes] = {}
            for r in runs[name]:
                for why, body in r.example.items():
                    examples.setdefault(why, body)
            for why, body in examples.items():
                print(f"{name}, {why}, first body: {body!r}", file=sys.stderr)
    finally:
        stop_all(procs)
        if args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
