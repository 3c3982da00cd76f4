"""Starting llama-server's router and llamad side by side for the multi-model benchmarks, and stopping them.

Every process goes into ``procs`` the moment it is spawned, so that a benchmark's ``finally: stop(procs)``
ends it, and its children, whatever went wrong.  Each runs in its own session: Ctrl-C reaches only the
benchmark, which then stops them in order (llamad drains and saves its KV cache) instead of leaving each
to the signal's race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from llamad.supervisor import free_port
from swap import stop, wait_up  # bench/ is on sys.path when a benchmark runs

BIN = Path(sys.executable).parent
__all__ = ["spawn", "start_router", "start_llamad", "stop", "stop_all", "stop_on_signals", "wait_up"]


def spawn(argv: list[str], log: Path, work: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "PORT_HEALTH", "MODEL_PATH", "MODEL_NAME")}
    with open(log, "wb") as out:
        procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work,
                                      start_new_session=True))


def start_router(work: Path, procs: list[subprocess.Popen[bytes]], llama_server: str, models: Path,
                 child_args: Iterable[str] = ("-np", "2"), name: str = "router") -> int:
    """``llama-server --models-dir MODELS --models-max 1`` with ``child_args`` for its children; its port."""
    port = free_port()
    spawn([llama_server, "--models-dir", str(models), "--models-max", "1", *child_args,
           "--host", "127.0.0.1", "--port", str(port)], work / f"{name}.log", work, procs)
    wait_up(port, "/models")
    return port


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # ints, and strings as TOML basic strings


def start_llamad(work: Path, procs: list[subprocess.Popen[bytes]], llama_server: str, models: Path,
                 overrides: Iterable[str] = (), name: str = "llamad",
                 backend: dict[str, Any] | None = None) -> int:
    """``twistd -n llamad`` serving ``models`` with room for one (``fleet.max_loaded = 1``); its port.

    ``backend`` holds ``[backend]`` keys (default ``parallel = 2``); ``overrides`` are twistd's ``--set``.
    Files go under ``work`` by ``name``, so that several can run side by side.
    """
    port, health = free_port(), free_port()
    keys = {"command": llama_server, **(backend if backend is not None else {"parallel": 2})}
    config = work / f"{name}.toml"
    config.write_text(
        f'data_dir = "{work / (name + "-data")}"\n'
        f'[api]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f'[health]\nlisten = "tcp:{health}:interface=127.0.0.1"\n'
        "[backend]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
        + f'[fleet]\nmodels_dir = "{models}"\nmax_loaded = 1\n')
    argv = [str(BIN / "twistd"), "-n", "--pidfile=", "llamad", "--config", str(config)]
    for assignment in overrides:
        argv += ["--set", assignment]
    spawn(argv, work / f"{name}.log", work, procs)
    wait_up(port, "/health")
    return port


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the benchmark as Ctrl-C does, so its ``finally`` stops what it started."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """``stop`` with further Ctrl-Cs ignored: a second one must not leave the children running."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    stop(procs)
