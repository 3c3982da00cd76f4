"""What a child uses and what the machine has: GPU memory per process (``nvidia-smi``), RSS, the budget.

Measured use corrects a model's estimated need once it has run; the budget
(``fleet.memory_budget = "auto"``) is read once, at boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Callable

from twisted.internet import defer

from llamad.fleet.placement import GiB, KiB, MiB

def parse_compute_apps(csv_text: str) -> dict[int, int]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`` as bytes per pid.

    A process on several GPUs has its uses summed; ``[N/A]`` and other
    unparsable lines are skipped (the pid is then unknown, not zero).
    """
    used: dict[int, int] = {}
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            pid, mib = int(parts[0]), float(parts[1])
        except ValueError:
            continue
        if mib < 0:
            continue
        used[pid] = used.get(pid, 0) + int(mib * MiB)
    return used


ProcessRunner = Callable[..., "defer.Deferred[tuple[bytes, bytes, int]]"]


def _get_process_output_and_value(executable: str, args: tuple[str, ...], env: dict[str, str],
                                  reactor: Any) -> defer.Deferred[tuple[bytes, bytes, int]]:
    from twisted.internet.utils import getProcessOutputAndValue

    return getProcessOutputAndValue(executable, args, env=env, reactor=reactor)


def gpu_memory_by_pid(
    reactor: Any,
    timeout: float = 10.0,
    run: ProcessRunner | None = None,
    nvidia_smi: str | None = None,
) -> defer.Deferred[dict[int, int] | None]:
    """GPU memory per pid from ``nvidia-smi``, without blocking the reactor.

    Fires with None when there is no nvidia-smi, it fails, or it takes longer
    than ``timeout`` (a hung one is abandoned, not killed: poll one at a time).
    Inside a container without the host's pid namespace nvidia-smi may list
    host pids or none, so a pid missing from the answer means "unknown".
    ``run`` replaces ``getProcessOutputAndValue`` (tests).
    """
    executable = nvidia_smi or shutil.which("nvidia-smi")
    if executable is None:
        return defer.succeed(None)
    runner = run or _get_process_output_and_value
    args = ("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")

    def done(result: tuple[bytes, bytes, int]) -> dict[int, int] | None:
        out, _err, code = result
        if code != 0:
            return None
        return parse_compute_apps(out.decode("utf-8", errors="replace"))

    d: defer.Deferred[Any] = defer.maybeDeferred(runner, executable, args, dict(os.environ), reactor)
    d.addTimeout(timeout, reactor)
    d.addCallback(done)
    d.addErrback(lambda _failure: None)
    return d


def parse_vmrss(status_text: str) -> int | None:
    """Resident memory in bytes from a ``/proc/PID/status`` text; None if absent (a kernel thread, a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            fields = line.split()
            try:
                value = int(fields[1])
            except (IndexError, ValueError):
                return None
            unit = fields[2].lower() if len(fields) > 2 else "kb"
            return value * {"kb": KiB, "mb": MiB, "gb": GiB}.get(unit, KiB)
    return None


def rss_bytes(pid: int, proc: str = "/proc") -> int | None:
    """A process's resident memory (VmRSS); None if it is gone.  One small file read: fine on the reactor.

    VmRSS counts the mmap'd model pages the process has touched, which the
    page cache may share with other processes mapping the same file.
    """
    try:
        with open(f"{proc}/{pid}/status", encoding="utf-8", errors="replace") as f:
            return parse_vmrss(f.read())
    except OSError:
        return None


def parse_ppid(stat_text: str) -> int | None:
    """The parent pid from a ``/proc/PID/stat`` text (field 4, after the parenthesised command name)."""
    _, sep, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 2:
        return None
    try:
        return int(fields[1])
    except ValueError:
        return None


def process_tree_pids(pid: int, proc: str = "/proc") -> list[int]:
    """``pid`` and its descendants, parents first; empty if ``pid`` is gone.

    llama-server runs as ``setsid setpriv ... llama-server``, which exec in
    place, so its pid is the server itself; this is for a child started under
    a wrapper that forks.  It reads every ``/proc/*/stat``: fine now and
    then, not in a tight loop.
    """
    if not os.path.exists(f"{proc}/{pid}"):
        return []
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return [pid]
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", encoding="utf-8", errors="replace") as f:
                ppid = parse_ppid(f.read())
        except OSError:
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry))
    tree = [pid]
    seen = {pid}
    i = 0
    while i < len(tree):
        for child in sorted(children.get(tree[i], ())):
            if child not in seen:
                seen.add(child)
                tree.append(child)
        i += 1
    return tree


def parse_gpu_totals(csv_text: str) -> list[int]:
    """``nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits`` as bytes per GPU (``[N/A]`` skipped)."""
    totals: list[int] = []
    for line in csv_text.splitlines():
        try:
            mib = float(line.strip())
        except ValueError:
            continue
        if mib > 0:
            totals.append(int(mib * MiB))
    return totals


def parse_meminfo_total(meminfo_text: str) -> int | None:
    """MemTotal in bytes from a ``/proc/meminfo`` text."""
    for line in meminfo_text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            try:
                return int(fields[1]) * KiB
            except (IndexError, ValueError):
                return None
    return None


def parse_cgroup_limit(text: str) -> int | None:
    """A cgroup memory limit file's value in bytes; None for "max" or an unlimited v1 value."""
    value = text.strip()
    if not value or value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        return None
    return limit if 0 < limit < 1 << 60 else None  # v1 writes a huge page-rounded number for "no limit"


def total_gpu_memory(timeout: float = 5.0) -> int | None:
    """Memory of all GPUs together per nvidia-smi; None without one.  Boot/config time only: it blocks."""
    found = gpu_totals(timeout)
    return sum(found) if found else None


def gpu_totals(timeout: float) -> list[int]:
    """Each GPU's memory per nvidia-smi; empty without one.  Boot/config time only: it blocks."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        out = subprocess.run(
            [executable, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return parse_gpu_totals(out.stdout)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _system_memory(proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """Host memory and where the figure came from: the cgroup limit when lower than MemTotal."""
    text = _read(f"{proc}/meminfo")
    total = parse_meminfo_total(text) if text is not None else None
    if total is None:
        raise OSError(f"cannot read MemTotal from {proc}/meminfo")
    source = "/proc/meminfo"
    for path in (f"{cgroup}/memory.max", f"{cgroup}/memory/memory.limit_in_bytes"):
        limit_text = _read(path)
        limit = parse_cgroup_limit(limit_text) if limit_text is not None else None
        if limit is not None and limit < total:
            total, source = limit, "cgroup limit"
            break
    return total, source


def total_system_memory() -> int:
    """Host memory: MemTotal, or the container's cgroup limit when lower.  Boot/config time only."""
    return _system_memory()[0]


def auto_budget(reserve: int, timeout: float = 5.0, gpus: list[int] | None = None) -> tuple[int, str]:
    """The memory to place models in, and how it was found.  Boot/config time only: it runs nvidia-smi.

    All GPUs' memory when nvidia-smi answers, else the host's; ``reserve``
    is kept back (the budget is never negative).  ``gpus``: the totals, when
    the caller asked nvidia-smi already.
    """
    gpus = gpu_totals(timeout) if gpus is None else gpus
    if gpus:
        total = sum(gpus)
        where = "nvidia-smi" if len(gpus) == 1 else f"{len(gpus)} GPUs, nvidia-smi"
        kind = "GPU memory"
    else:
        total, where = _system_memory()
        where += ", no GPU"
        kind = "system memory"
    budget = max(total - reserve, 0)
    return budget, f"{kind} {total / GiB:.1f} GiB ({where}) minus reserve {reserve / GiB:.1f} GiB"
