"""What each backend kind runs and how its readiness is known.

The argv is always a list handed to ``spawnProcess``: no shell ever sees a
config value.  The per-boot API key never appears on argv.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Mapping

from llamad.config import BackendConfig, python_command


@dataclass(frozen=True)
class Target:
    """Where a ready backend answers, and the key it expects ("" for none)."""

    origin: bytes
    key: str
    generation: int = 0  # which start of a supervised child answers here (0: not supervised)


@dataclass(frozen=True)
class Launch:
    """One child start: what to exec, and where it will answer."""

    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: bytes


def new_session_prefix() -> list[str]:
    """Run the child in its own session, and have the kernel kill it if llamad dies.

    Its own session gives it its own process group: a terminal's Ctrl-C then
    reaches only llamad, which drains before it stops the child, and a stop
    can signal the whole group.  util-linux ``setsid`` execs in place (the PID
    stays the child's) because a freshly spawned process is never a group
    leader.  util-linux ``setpriv --pdeathsig KILL`` sets the parent-death
    signal between fork and exec: a SIGKILLed llamad leaves no orphan
    holding the port and the GPU memory.
    """
    setsid = shutil.which("setsid")
    if not setsid:
        return []
    setpriv = shutil.which("setpriv")
    return [setsid, setpriv, "--pdeathsig", "KILL", "--"] if setpriv else [setsid]


def launch(
    backend: BackendConfig,
    port: int,
    key: str,
    key_file: str,
    base_env: Mapping[str, str] | None = None,
    prefix: list[str] | None = None,
) -> Launch:
    """The argv, environment and readiness path of one child start."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(backend.env)
    if backend.kind == "llama-server":
        argv = [
            backend.command,
            "-m", backend.model,
            "--host", "127.0.0.1",
            "--port", str(port),
            "-c", str(backend.context),
            "-ngl", str(backend.gpu_layers),
            "-np", str(backend.parallel),
            "--metrics",
            "--api-key-file", key_file,
            "--alias", backend.model_id,
        ]
        if backend.threads:
            argv += ["-t", str(backend.threads)]
        if backend.embeddings:
            # The pooling comes from the model's GGUF metadata (the demo model's says mean); set
            # --pooling in extra_args for a model that has none.
            argv.append("--embeddings")
        argv += list(backend.extra_args)
        return Launch((prefix or []) + argv, env, port, b"/health")
    if backend.kind == "llama-cpp-python":
        argv = [
            python_command(backend.command),
            "-m", "llama_cpp.server",
            "--model", backend.model,
            "--model_alias", backend.model_id,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--n_ctx", str(backend.context),
            "--n_gpu_layers", str(backend.gpu_layers),
        ]
        if backend.threads:
            argv += ["--n_threads", str(backend.threads)]
        if backend.embeddings:
            argv += ["--embedding", "true"]
        argv += list(backend.extra_args)
        # llama_cpp.server reads its settings from the environment too: the key
        # goes there so that it stays off argv, and llamad's own PORT (the API
        # port) must not override the child's --port.
        for name in ("PORT", "HOST", "CONFIG_FILE"):
            env.pop(name, None)
        env["API_KEY"] = key
        return Launch((prefix or []) + argv, env, port, b"/v1/models")
    raise ValueError(f"backend kind {backend.kind!r} has no child process")
