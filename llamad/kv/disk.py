"""The saved slots on disk: scans, checksums, sidecars written atomically, deletes.

Every function here blocks on the file system: :class:`llamad.kv.store.Store` runs
them in a thread, never on the reactor.  They raise OSError; nothing here decides.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace

from llamad.kv.policy import SUFFIX, Entry, Sidecar, is_slot_file, sidecar_name

CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


class CutShort(Exception):
    """The file is not what the child said it wrote (a full disk, a child killed mid-save)."""


def model_dir(root: str, model_id: str) -> str:
    """``root/<model id>``; an id a file name made (one model, named after its GGUF) is made safe first."""
    name = _UNSAFE.sub("_", model_id) or "_"
    if name.startswith("."):
        name = "_" + name
    return os.path.join(root, name)


def ensure_dir(path: str) -> int:
    """Make ``path`` (private to llamad), check it is writable; returns the bytes free there."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(13, "not writable", path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class Listing:
    """One model's directory: its slot files, and leftovers of llamad's own that belong to none."""

    entries: list[Entry] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)  # a sidecar without its file, a temporary file


def scan(path: str) -> Listing:
    """Every slot file in ``path`` with its sidecar, if valid; a missing directory is an empty one."""
    listing = Listing()
    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return listing
    for name in sorted(names):
        full = os.path.join(path, name)
        if is_slot_file(name):
            try:
                size = os.stat(full).st_size
            except FileNotFoundError:
                continue  # deleted meanwhile
            listing.entries.append(Entry(name, size, _read_sidecar(os.path.join(path, sidecar_name(name)))))
        elif name.endswith(".tmp") and name.startswith("."):
            listing.strays.append(name)
        elif name.endswith(".json") and is_slot_file(name[:-5] + SUFFIX) and name[:-5] + SUFFIX not in names:
            listing.strays.append(name)
    return listing


def scan_all(root: str) -> list[tuple[str, Entry]]:
    """``(directory name, entry)`` for every model's directory under ``root``."""
    try:
        dirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    except FileNotFoundError:
        return []
    return [(d, entry) for d in dirs for entry in scan(os.path.join(root, d)).entries]


def _read_sidecar(path: str) -> Sidecar | None:
    try:
        with open(path, "rb") as f:
            return Sidecar.from_json(f.read(1 << 16))
    except OSError:
        return None


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def seal(path: str, name: str, fingerprint: str, slot: int, tokens: int, written: int, now: float) -> Entry:
    """Checksum the file the child just wrote and write its sidecar: from now on it may be restored.

    Raises :class:`CutShort` when the file is not the size the child reported.
    """
    full = os.path.join(path, name)
    size = os.stat(full).st_size
    if size != written:
        raise CutShort(f"{name}: {size} bytes on disk, the child wrote {written}")
    sidecar = Sidecar(fingerprint, sha256_file(full), tokens, size, now, now, slot)
    write_atomic(os.path.join(path, sidecar_name(name)), sidecar.to_json())
    return Entry(name, size, sidecar)


def verify(path: str, entry: Entry) -> bool:
    """The file is still the one its sidecar describes (a bad sector, a copy cut short, an edit)."""
    if entry.sidecar is None:
        return False
    full = os.path.join(path, entry.name)
    return os.stat(full).st_size == entry.sidecar.bytes and sha256_file(full) == entry.sidecar.sha256


def touch(path: str, entry: Entry, now: float) -> Entry:
    """Note that ``entry`` was just restored: the disk bound keeps the recently used."""
    assert entry.sidecar is not None
    sidecar = replace(entry.sidecar, last_used=now)
    write_atomic(os.path.join(path, sidecar_name(entry.name)), sidecar.to_json())
    return replace(entry, sidecar=sidecar)


def remove(path: str, names: list[str]) -> None:
    """Delete each slot file and its sidecar (the sidecar first: a file never looks sealed half-deleted)."""
    for name in names:
        targets = [sidecar_name(name), name] if name.endswith(SUFFIX) else [name]
        for target in targets:
            try:
                os.unlink(os.path.join(path, target))
            except FileNotFoundError:
                pass


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once or not at all: a temporary file, flushed, then renamed."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
