"""Files a child needs while it runs: its API key file and a record of its PID.

They live in a private runtime directory derived from the data dir, on local
disk (never the volume): the key is a secret, and PIDs mean nothing on another
machine.  The record holds the child's start time and the kernel's boot id,
so a later boot of llamad on the same data dir can stop a child that an
earlier boot left behind (llamad was SIGKILLed before its child got the
parent-death signal) without ever signalling a recycled PID.  llamad records
itself the same way (``llamad.pid``), so ``llamad keys reload`` finds the
daemon of a data dir even when several run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable


def runtime_dir(data_dir: str) -> str:
    """``$RUNTIME_DIRECTORY`` (systemd) or the temp dir, one private folder per data dir."""
    base = os.environ.get("RUNTIME_DIRECTORY") or tempfile.gettempdir()
    tag = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:12]
    return os.path.join(base, f"llamad-{os.getuid()}-{tag}")


def ensure_private_dir(path: str) -> str:
    """Create ``path`` mode 0700, or check that an existing one is ours and private."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise OSError(f"{path} exists but is not a private directory of this user") from None
    return path


def new_key() -> str:
    return secrets.token_urlsafe(32)


def write_key_file(directory: str | None, key: str | None = None) -> tuple[str, str]:
    """``key`` (or a fresh one) in a new 0600 file in ``directory``; returns (key, path)."""
    key = key or new_key()
    fd, path = tempfile.mkstemp(prefix="key-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.encode() + b"\n")
    finally:
        os.close(fd)
    return key, path


def when_read(reactor: Any, path: str, then: Callable[[], None]) -> Callable[[], None] | None:
    """Call ``then()`` once a process has opened ``path`` and closed it without writing: the child has
    read its key file (llama-server does while it parses its arguments, before it loads the model).

    Linux inotify, so whatever server or version the child is; nothing is guessed from its output.
    Returns what ends the watch, or None where files cannot be watched (a reactor without file
    descriptors, no inotify instance left): the caller's later clean-up then stays the only one.
    """
    from twisted.internet.interfaces import IReactorFDSet

    if not IReactorFDSet.providedBy(reactor):
        return None
    try:
        from twisted.internet import inotify
        from twisted.python.filepath import FilePath

        notifier = inotify.INotify(reactor)
    except Exception:  # not Linux, or the per-user inotify limit reached: no early removal, nothing worse
        return None
    ended: list[bool] = []

    def end() -> None:
        if not ended:
            ended.append(True)
            notifier.loseConnection()

    def closed(_watch: object, _path: object, mask: int) -> None:
        if mask & inotify.IN_CLOSE_NOWRITE and not ended:
            end()
            then()

    notifier.startReading()
    try:
        notifier.watch(FilePath(path), mask=inotify.IN_CLOSE_NOWRITE, callbacks=[closed])
    except Exception:
        end()
        return None
    return end


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None  # dead, only waiting to be reaped
    return int(fields[19])


@dataclass(frozen=True)
class ChildRecord:
    """What identifies a running child beyond doubt, and the files that go with it."""

    pid: int
    start_time: int
    boot_id: str
    key_file: str = ""

    def running(self) -> bool:
        """The very process this record describes still runs (not just a process with its PID)."""
        return self.boot_id == boot_id() and start_time(self.pid) == self.start_time


def record_for(pid: int, key_file: str = "") -> ChildRecord | None:
    started = start_time(pid)
    return None if started is None else ChildRecord(pid, started, boot_id(), key_file)


def write_record(path: str, record: ChildRecord) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)


def read_record(path: str) -> ChildRecord | None:
    """The record in ``path``; None when there is none or it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return ChildRecord(int(data["pid"]), int(data["start_time"]), str(data["boot_id"]),
                           str(data.get("key_file", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


DAEMON_RECORD = "llamad.pid"


def daemon_record_path(data_dir: str) -> str:
    """Where the llamad serving ``data_dir`` records itself, so ``llamad keys reload`` finds it by data dir."""
    return os.path.join(runtime_dir(data_dir), DAEMON_RECORD)


def record_daemon(data_dir: str, pid: int | None = None) -> str:
    """Record this process (or ``pid``) as the llamad of ``data_dir``; returns the record's path."""
    pid = os.getpid() if pid is None else pid
    record = record_for(pid)
    if record is None:
        raise OSError(f"process {pid} is not running")
    ensure_private_dir(runtime_dir(data_dir))
    path = daemon_record_path(data_dir)
    write_record(path, record)
    return path


def forget_daemon(data_dir: str, pid: int | None = None) -> None:
    """Remove the record at a clean stop, unless another llamad of the same data dir has replaced it."""
    path = daemon_record_path(data_dir)
    record = read_record(path)
    if record is not None and record.pid == (os.getpid() if pid is None else pid):
        remove(path)


def running_daemon(data_dir: str) -> ChildRecord | None:
    """The llamad recorded for ``data_dir`` if that very process still runs (a stale record, or a
    recycled PID, gives None)."""
    record = read_record(daemon_record_path(data_dir))
    return record if record is not None and record.running() else None


def signal_group(pid: int, sig: int) -> None:
    """Signal the child's process group (it leads its own session), else the process."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    except PermissionError:
        pass

