"""Which models to stop and which to start, with no I/O.

The fleet calls :func:`place` whenever something changes (a request arrives or
ends, a child finishes loading or stopping, the clock passes ``Plan.wake``) and
carries out the plan.  Placement never cuts a request: only idle, unpinned,
loaded models are stopped, and only to make room for a model that has requests
(or a preload) waiting.

Memory is counted from the moment a child starts loading until it has stopped,
so a plan never starts a model into memory that a stopping child still holds:
the model it makes room for waits for the next call, after the stop completes.

Waiting models are served in arrival order: the oldest waiter first claims the
memory it needs (from stopping children first, then free memory, then idle
models, least recently used first).  A waiter that cannot fit even after every
idle model went is blocked and nothing is stopped for it; younger waiters may
still start in free memory, but may not stop anything for themselves, since
the blocked one has first claim on whatever becomes evictable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping, Sequence

State = Literal["unloaded", "loading", "loaded", "stopping", "failed"]

HOLDING: frozenset[str] = frozenset({"loading", "loaded", "stopping"})
"""States whose child holds its memory (and a slot) until it has exited."""

STARTABLE: frozenset[str] = frozenset({"unloaded", "failed"})
"""States from which a waiting model may be started."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class ModelView:
    """What placement needs to know about one configured model, at one instant."""

    id: str
    need: int  # bytes while loaded
    state: State
    pinned: bool = False
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0  # clock seconds of its last request's end (or start)
    loaded_at: float | None = None  # when it became loaded; None counts as long ago
    waiting_since: float | None = None  # oldest waiting request (or preload) while it wants to start

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.queued > 0

    @property
    def waiting(self) -> bool:
        """Wants to start: not running, with a request or a preload waiting."""
        return self.state in STARTABLE and self.waiting_since is not None


@dataclass(frozen=True)
class Plan:
    """What to do now.

    ``stop`` and ``start`` can be carried out at once and in any order.  Every
    waiting model is either in ``start`` or in ``blocked`` (with the reason it
    waits, numbers included); ``evicted_for`` names, for each stop, the waiting
    model it makes room for.  ``wake`` is the earliest clock time at which the
    plan may change with nothing else happening (a just-loaded model's
    ``min_resident`` running out), so the fleet can place again then.
    """

    stop: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    blocked: Mapping[str, str] = field(default_factory=dict)
    evicted_for: Mapping[str, str] = field(default_factory=dict)
    wake: float | None = None


def format_bytes(n: float) -> str:
    """``6.0 GiB``, ``512 MiB``: short enough for a reason line, exact enough to compare."""
    if n < 0:
        return "-" + format_bytes(-n)
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    if n >= KiB:
        return f"{n / KiB:.0f} KiB"
    return f"{int(n)} B"


def held_bytes(models: Iterable[ModelView]) -> int:
    """Memory held by children that exist (loading, loaded or stopping): what a budget gauge shows."""
    return sum(m.need for m in models if m.state in HOLDING)


def held_count(models: Iterable[ModelView]) -> int:
    """Children that exist, counted against ``max_loaded``."""
    return sum(1 for m in models if m.state in HOLDING)


@dataclass
class _Release:
    """Memory and a slot a stopping child will give back, less what older waiters have claimed."""

    id: str
    mem: int
    slot: int = 1


def _lru_key(m: ModelView) -> tuple[float, str]:
    return (m.last_used, m.id)


def _arrival_key(m: ModelView) -> tuple[float, str]:
    assert m.waiting_since is not None
    return (m.waiting_since, m.id)


def _idle(m: ModelView) -> bool:
    """Loaded, unpinned and without requests: the only kind placement may stop."""
    return m.state == "loaded" and not m.pinned and not m.busy


def _protected(m: ModelView, min_resident: float, now: float) -> bool:
    """Still inside its minimum residency (so only an older waiter may take its place)."""
    return m.loaded_at is not None and now - m.loaded_at < min_resident


def _may_evict(m: ModelView, candidate: ModelView, min_resident: float, now: float) -> bool:
    """Idle, and either resident long enough or in the way of a request older than its load."""
    if not _idle(m):
        return False
    if not _protected(m, min_resident, now):
        return True
    assert m.loaded_at is not None and candidate.waiting_since is not None
    return candidate.waiting_since < m.loaded_at


def _choose(pool: Sequence[ModelView], mem_short: float, slot_short: float) -> list[ModelView] | None:
    """The fewest LRU-first stops covering both shortfalls, or None when even all of ``pool`` would not.

    The least recently used are taken until enough is freed; any of them a
    later, larger one made unnecessary is then kept (most recently used kept
    first), so no stop is wasted.
    """
    chosen: list[ModelView] = []
    freed = 0
    for m in pool:
        if freed >= mem_short and len(chosen) >= slot_short:
            break
        chosen.append(m)
        freed += m.need
    if freed < mem_short or len(chosen) < slot_short:
        return None
    for m in sorted(chosen[:-1], key=_lru_key, reverse=True):
        if freed - m.need >= mem_short and len(chosen) - 1 >= slot_short:
            chosen.remove(m)
            freed -= m.need
    return chosen


def _items(ms: Iterable[ModelView], label: str, describe: Callable[[ModelView], str] | None = None) -> str | None:
    names = [f"{m.id} ({describe(m)})" if describe else m.id for m in ms]
    return f"{label}: {', '.join(names)}" if names else None


def _busy_detail(m: ModelView) -> str:
    parts = []
    if m.in_flight:
        parts.append(f"{m.in_flight} in flight")
    if m.queued:
        parts.append(f"{m.queued} queued")
    return ", ".join(parts)


def place(
    models: Sequence[ModelView],
    budget: int | None,
    max_loaded: int,
    min_resident: float,
    now: float,
) -> Plan:
    """Decide which idle models to stop and which waiting models to start.

    ``budget`` is bytes (None: no memory limit); ``max_loaded`` is a count of
    children (0: no limit).  Pure and deterministic: the input's order does
    not matter, and ties are broken by model id.
    """
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate model ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    by_id = sorted(models, key=lambda m: m.id)
    holding = [m for m in by_id if m.state in HOLDING]
    stopping = [m for m in holding if m.state == "stopping"]

    # Free now, and what stopping children will give back (not yet claimed by a waiter).
    mem_free: float = math.inf if budget is None else budget - held_bytes(holding)
    slots_free: float = math.inf if max_loaded <= 0 else max_loaded - len(holding)
    releasing = [_Release(m.id, m.need) for m in stopping]

    lru = sorted((m for m in holding if _idle(m)), key=_lru_key)
    gone: set[str] = set()
    stop: list[str] = []
    start: list[ModelView] = []
    blocked: dict[str, str] = {}
    evicted_for: dict[str, str] = {}
    first_blocked: ModelView | None = None  # has first claim on evictable models
    wake: float | None = None

    for c in sorted((m for m in by_id if m.waiting), key=_arrival_key):
        if budget is not None and c.need > budget:
            blocked[c.id] = f"never fits: needs {format_bytes(c.need)}, budget {format_bytes(budget)}"
            continue
        if c.need <= mem_free and slots_free >= 1:
            start.append(c)
            mem_free -= c.need
            slots_free -= 1
            continue
        pool = [] if first_blocked else [m for m in lru if m.id not in gone and _may_evict(m, c, min_resident, now)]
        chosen = _choose(
            pool,
            c.need - (mem_free + sum(r.mem for r in releasing)),
            1 - (slots_free + sum(r.slot for r in releasing)),
        )
        if chosen is None:
            blocked[c.id] = _reason(
                c, budget, max_loaded, mem_free, slots_free, holding, gone, start, pool, first_blocked,
                min_resident, now,
            )
            first_blocked = first_blocked or c
            for m in lru:
                if m.id not in gone and m not in pool and _protected(m, min_resident, now):
                    assert m.loaded_at is not None
                    until = m.loaded_at + min_resident
                    wake = until if wake is None else min(wake, until)
            continue
        for m in chosen:
            stop.append(m.id)
            gone.add(m.id)
            evicted_for[m.id] = c.id
            releasing.append(_Release(m.id, m.need))
        # Claim what stopping children give back first, so free memory stays for younger waiters.
        mem_left = c.need if budget is not None else 0
        slot_left = 1 if max_loaded > 0 else 0
        waits_for = []
        for r in releasing:
            mem, slot = min(r.mem, mem_left), min(r.slot, slot_left)
            if mem or slot:
                waits_for.append(r.id)
                r.mem, r.slot = r.mem - mem, r.slot - slot
                mem_left, slot_left = mem_left - mem, slot_left - slot
        mem_free -= mem_left
        slots_free -= slot_left
        blocked[c.id] = f"waiting for {', '.join(waits_for)} to stop" + (
            f" (needs {format_bytes(c.need)})" if budget is not None else ""
        )

    return Plan(
        stop=tuple(stop),
        start=tuple(m.id for m in start),
        blocked=blocked,
        evicted_for=evicted_for,
        wake=wake,
    )


def _reason(
    c: ModelView,
    budget: int | None,
    max_loaded: int,
    mem_free: float,
    slots_free: float,
    holding: Sequence[ModelView],
    gone: set[str],
    started: Sequence[ModelView],
    pool: Sequence[ModelView],
    first_blocked: ModelView | None,
    min_resident: float,
    now: float,
) -> str:
    """Why ``c`` waits, with the numbers and what holds the memory."""
    head = []
    if budget is not None:
        head.append(f"needs {format_bytes(c.need)}, {format_bytes(max(mem_free, 0))} free of {format_bytes(budget)}")
    if max_loaded > 0 and slots_free < 1:
        head.append(f"{max_loaded - int(slots_free)} of {max_loaded} models loaded")
    stays = [m for m in holding if m.id not in gone and _idle(m) and m not in pool and _protected(m, min_resident, now)]
    groups = [
        _items([m for m in holding if m.state == "loaded" and m.busy and not m.pinned], "busy", _busy_detail),
        _items([m for m in holding if m.pinned and m.state == "loaded"], "pinned"),
        _items([m for m in holding if m.state == "loading"] + list(started), "loading"),
        _items([m for m in holding if m.state == "stopping" or m.id in gone], "stopping"),
        _items(stays, "just loaded", lambda m: f"stays {(m.loaded_at or 0.0) + min_resident - now:.0f}s more"),
        _items([m for m in holding if m.id not in gone and _idle(m) and m not in stays], "idle"),
        f"after: {first_blocked.id} (waiting longer)" if first_blocked else None,
    ]
    return "; ".join(head + [g for g in groups if g])
