"""Log files on the volume, in the seed's layout.

``llama/latest.txt`` carries the child's output, one timestamped line per line,
rotated by size.  ``_boot/<UTC ts>_boot_<instance>.log`` carries llamad's own
log for this boot, and ``_boot/latest.txt`` names it.
"""

from __future__ import annotations

import os
import socket
import time
from typing import IO

from twisted.logger import FileLogObserver, ILogObserver, formatEventAsClassicLogText
from twisted.python.logfile import LogFile


def utc_stamp(seconds: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))


def instance_name() -> str:
    """Which worker this is: RunPod's pod id when present, else the host name."""
    return os.environ.get("RUNPOD_POD_ID") or socket.gethostname() or "llamad"


class ChildLog:
    """The child's stdout and stderr as timestamped lines in ``llama/latest.txt``."""

    def __init__(self, logs_dir: str, max_bytes: int, keep: int) -> None:
        directory = os.path.join(logs_dir, "llama")
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "latest.txt")
        self.file = LogFile("latest.txt", directory, rotateLength=max_bytes, maxRotatedFiles=keep)

    def child_line(self, line: bytes) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()).encode()
        self.file.write(stamp + b"Z " + line + b"\n")

    def close(self) -> None:
        self.file.close()


def open_boot_log(logs_dir: str) -> tuple[str, IO[str]]:
    """Create this boot's log file and point ``_boot/latest.txt`` at it."""
    directory = os.path.join(logs_dir, "_boot")
    os.makedirs(directory, exist_ok=True)
    path = os.path.abspath(os.path.join(directory, f"{utc_stamp()}_boot_{instance_name()}.log"))
    stream = open(path, "a", buffering=1, encoding="utf-8")
    pointer = os.path.join(directory, "latest.txt")
    with open(pointer + ".tmp", "w", encoding="utf-8") as f:
        f.write(path + "\n")
    os.replace(pointer + ".tmp", pointer)
    return path, stream


def boot_observer(stream: IO[str]) -> ILogObserver:
    return FileLogObserver(stream, lambda event: formatEventAsClassicLogText(event))
