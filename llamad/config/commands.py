"""Where the child's command is: on PATH, or beside llamad's own executables (a venv's ``bin``)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any


def own_bin_dirs() -> list[str]:
    """Where llamad's own executables are: the interpreter's directory and the running console script's
    (``twistd``, ``llamad``), a venv's ``bin`` where ``make setup`` links ``llama-server``."""
    dirs: list[str] = []
    for executable in (sys.executable, sys.argv[0] if sys.argv else ""):
        if executable and os.path.isfile(executable):
            directory = os.path.dirname(os.path.abspath(executable))
            if directory not in dirs:
                dirs.append(directory)
    return dirs


def beside_llamad(command: str) -> str | None:
    """A bare command that is not on PATH, found beside llamad's own executables; None otherwise.

    A systemd unit or a container that runs ``.venv/bin/twistd`` seldom puts the venv on PATH,
    yet ``make setup`` linked ``llama-server`` there.
    """
    if not command or os.sep in command or shutil.which(command) is not None:
        return None
    for directory in own_bin_dirs():
        found = shutil.which(command, path=directory)
        if found is not None:
            return os.path.abspath(found)
    return None


def find_command(vals: dict[str, Any], srcs: dict[str, str], command_key: str, kind_key: str) -> None:
    """Run a kind llama-server command found beside llamad by its path; its source says where it was found.

    Only where files are checked: without, the config may be for another machine."""
    found = beside_llamad(vals[command_key]) if vals[kind_key] == "llama-server" else None
    if found is not None:
        vals[command_key] = found
        srcs[command_key] += f", not on PATH: found beside llamad in {os.path.dirname(found)}"


def command_missing(command: str) -> str:
    """Why a command cannot run, saying where a bare name was looked for."""
    if os.sep in command:
        return f"{command!r} not found or not executable (set LLAMA_SERVER_BIN)"
    return (f"{command!r} not found or not executable: not on PATH, nor beside llamad in "
            f"{', '.join(own_bin_dirs()) or '(unknown)'} (set LLAMA_SERVER_BIN)")


def python_command(command: str) -> str:
    """The interpreter for the llama-cpp-python backend: ours unless configured."""
    return sys.executable if command in ("", "llama-server") else command
