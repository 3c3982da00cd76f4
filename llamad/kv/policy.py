"""Which saved slots to restore, keep and delete: decisions on what a scan found, with no I/O.

Each saved slot is a file llama-server wrote (``<fingerprint>-<slot>-<stamp>.bin``) and a
sidecar llamad wrote once the file was complete (the same name, ``.json``).  Only a file
with a valid sidecar of the running child's fingerprint is ever restored: a file without
one was cut short (a child killed mid-save, a full disk) and restoring it could abort
llama-server.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Iterable

SUFFIX = ".bin"
SIDECAR_SUFFIX = ".json"
VERSION = 1
_NAME = re.compile(r"^([0-9a-f]+)-(\d+)-([0-9a-f]+)\.bin$")


def file_name(fingerprint: str, slot: int, stamp: int) -> str:
    """The name llama-server writes slot ``slot`` to (its own check allows letters, digits, ``-`` and ``.``)."""
    return f"{fingerprint}-{slot}-{stamp:x}{SUFFIX}"


def sidecar_name(name: str) -> str:
    return name[: -len(SUFFIX)] + SIDECAR_SUFFIX


def is_slot_file(name: str) -> bool:
    return _NAME.match(name) is not None


@dataclass(frozen=True)
class Sidecar:
    """What llamad knows of one saved slot file, written after llama-server wrote it."""

    fingerprint: str
    sha256: str
    tokens: int
    bytes: int
    saved_at: float  # wall-clock seconds
    last_used: float  # saved or last restored: the disk bound deletes the least recently used first
    slot: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Sidecar | None:
        """The sidecar in ``data``; None when it is not one (cut short, another version, wrong types)."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("version") != VERSION:
                return None
            sidecar = cls(
                fingerprint=raw["fingerprint"], sha256=raw["sha256"], tokens=raw["tokens"], bytes=raw["bytes"],
                saved_at=float(raw["saved_at"]), last_used=float(raw["last_used"]), slot=raw.get("slot", 0),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if not (isinstance(sidecar.fingerprint, str) and isinstance(sidecar.sha256, str) and len(sidecar.sha256) == 64
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                        for n in (sidecar.tokens, sidecar.bytes, sidecar.slot))):
            return None
        return sidecar


@dataclass(frozen=True)
class Entry:
    """One slot file in a model's directory, as a scan found it."""

    name: str
    size: int  # bytes on disk now
    sidecar: Sidecar | None  # None: missing or invalid

    @property
    def fingerprint(self) -> str:
        m = _NAME.match(self.name)
        return m.group(1) if m else ""

    @property
    def sealed(self) -> bool:
        """It has a valid sidecar that names it and says its size."""
        return (self.sidecar is not None and self.sidecar.fingerprint == self.fingerprint
                and self.sidecar.bytes == self.size)


def newest_first(entries: Iterable[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.sidecar.saved_at if e.sidecar else 0.0, e.name), reverse=True)


@dataclass(frozen=True)
class RestorePlan:
    """What to do with a model's directory before its fresh child serves."""

    candidates: tuple[Entry, ...]  # this fingerprint, newest first: checksum in order, restore up to ``limit``
    limit: int
    mismatched: tuple[Entry, ...]  # another fingerprint: another model file, build or layout
    corrupt: tuple[Entry, ...]  # no valid sidecar, or not the size it says


def plan_restore(entries: Iterable[Entry], fingerprint: str, parallel: int) -> RestorePlan:
    candidates, mismatched, corrupt = [], [], []
    for entry in entries:
        if entry.sidecar is None or entry.sidecar.fingerprint != entry.fingerprint:
            corrupt.append(entry)
        elif entry.fingerprint != fingerprint:
            mismatched.append(entry)
        elif entry.sidecar.bytes != entry.size:
            corrupt.append(entry)
        else:
            candidates.append(entry)
    return RestorePlan(tuple(newest_first(candidates)), max(parallel, 0), tuple(mismatched), tuple(corrupt))


def plan_prune(entries: Iterable[Entry], fingerprint: str, keep: int) -> list[Entry]:
    """After a save: this fingerprint's sealed files beyond the newest ``keep``, which no restore would pick."""
    mine = newest_first(e for e in entries if e.sealed and e.fingerprint == fingerprint)
    return mine[max(keep, 0):]


def plan_eviction(entries: Iterable[tuple[str, Entry]], limit: int) -> list[tuple[str, Entry]]:
    """The disk bound, across every model's directory: ``(model, entry)`` pairs to delete, least recently
    used first, until the sealed files take ``limit`` bytes at most.  A file being written (no sidecar
    yet) is neither counted nor deleted here: its own model's next restore deals with it."""
    sealed = [(model, e) for model, e in entries if e.sealed]
    total = sum(e.size for _, e in sealed)
    evict = []
    for model, entry in sorted(sealed, key=lambda pair: _recency(pair[1])):
        if total <= limit:
            break
        evict.append((model, entry))
        total -= entry.size
    return evict


def _recency(entry: Entry) -> tuple[float, float, str]:
    sidecar = entry.sidecar
    return (sidecar.last_used, sidecar.saved_at, entry.name) if sidecar else (0.0, 0.0, entry.name)
