"""Which models to stop and which to start, with no I/O.

The fleet calls :func:`place` whenever something changes (a request arrives or
ends, a child finishes loading or stopping, the clock passes ``Plan.wake``) and
carries out the plan.  Placement never cuts a request.

Placement is work-conserving: a loaded model with nothing in flight or queued
never keeps memory from a model whose requests wait.  Idle models are stopped
at once (least recently used first) to make room.  A model that still has work
keeps its memory while its requests run, up to ``swap_quantum`` seconds after
another model started waiting and at least ``min_resident`` seconds after it
loaded; then it is drained (it takes no new request, its queued requests wait
for its next turn) and stopped once its running requests are done.  Models that
wait for room get it in arrival order, so no model waits forever.

Memory is counted from the moment a child starts loading until it has stopped,
so a plan never starts a model into memory that a stopping child still holds:
the model it makes room for waits for the next call, after the stop completes.

Waiting models are served in arrival order: the oldest waiter first claims the
memory it needs (from stopping and draining children first, then free memory,
then idle models, then models whose turn is over).  A waiter that cannot fit
even after all those went is blocked and nothing is stopped for it; younger
waiters may still start in free memory, but may not stop anything for
themselves, since the blocked one has first claim on whatever becomes free.
"""

from __future__ import annotations

import math
import re
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

    ``stop``, ``drain`` and ``start`` can be carried out at once and in any
    order.  A drained model takes no new request (its queued requests stay
    queued) and is stopped by a later plan once nothing of it runs.  Every
    waiting model is either in ``start`` or in ``blocked`` (with the reason it
    waits, numbers included); ``evicted_for`` names, for each stop and drain,
    the waiting model it makes room for.  ``wake`` is the earliest clock time
    at which the plan may change with nothing else happening (a model's turn
    running out), so the fleet can place again then.
    """

    stop: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    blocked: Mapping[str, str] = field(default_factory=dict)
    evicted_for: Mapping[str, str] = field(default_factory=dict)
    wake: float | None = None
    drain: tuple[str, ...] = ()


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
    """Loaded, unpinned and without requests: stopped at once when a waiter needs its room."""
    return m.state == "loaded" and not m.pinned and not m.busy


def _turn_ends(m: ModelView, c: ModelView, min_resident: float, swap_quantum: float) -> float:
    """When busy ``m`` must give way to waiter ``c``: ``swap_quantum`` after ``c`` began to wait,
    and never before ``m`` ran ``min_resident`` (so a model loaded for waiting requests runs them)."""
    assert c.waiting_since is not None
    loaded_at = -math.inf if m.loaded_at is None else m.loaded_at
    return max(c.waiting_since + swap_quantum, loaded_at + min_resident)


def _preemptible(m: ModelView, c: ModelView, min_resident: float, swap_quantum: float, now: float) -> bool:
    """Busy, unpinned, and its turn against ``c`` is over."""
    return (m.state == "loaded" and not m.pinned and m.busy
            and now >= _turn_ends(m, c, min_resident, swap_quantum))


def _choose(pool: Sequence[ModelView], mem_short: float, slot_short: float) -> list[ModelView] | None:
    """The fewest stops, in ``pool``'s order of preference, covering both shortfalls; None when even
    all of ``pool`` would not.

    Models are taken in order until enough is freed; any of them a later,
    larger one made unnecessary is then kept (the least preferred kept first),
    so no stop is wasted.
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
    for m in reversed(chosen[:-1]):
        if freed - m.need >= mem_short and len(chosen) - 1 >= slot_short:
            chosen.remove(m)
            freed -= m.need
    return chosen


def _items(ms: Iterable[ModelView], label: str, describe: Callable[[ModelView], str] | None = None) -> str | None:
    names = [f"{m.id} ({describe(m)})" if describe else m.id for m in ms]
    return f"{label}: {', '.join(names)}" if names else None


_COUNTS = re.compile(r" \((?:\d+ in flight|\d+ queued)(?:, \d+ queued)?\)")


def without_counts(reason: str) -> str:
    """A wait's reason without the in-flight and queued counts, which change with every request: the
    fleet logs a wait again only when this changes."""
    return _COUNTS.sub("", reason)


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
    *,
    swap_quantum: float,
) -> Plan:
    """Decide which models to stop or drain and which waiting models to start.

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

    idle = sorted((m for m in holding if _idle(m)), key=_lru_key)
    # Busy models, the longest loaded first: the first to give way once their turn is over.
    busy = sorted((m for m in holding if m.state == "loaded" and not m.pinned and m.busy),
                  key=lambda m: (-math.inf if m.loaded_at is None else m.loaded_at, m.id))
    gone: set[str] = set()
    stop: list[str] = []
    drain: list[str] = []
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
        pool = [] if first_blocked else (
            [m for m in idle if m.id not in gone]
            + [m for m in busy if m.id not in gone and _preemptible(m, c, min_resident, swap_quantum, now)])
        chosen = _choose(
            pool,
            c.need - (mem_free + sum(r.mem for r in releasing)),
            1 - (slots_free + sum(r.slot for r in releasing)),
        )
        if chosen is None:
            blocked[c.id] = _reason(c, budget, max_loaded, mem_free, slots_free, holding, gone, start, first_blocked)
            if first_blocked is None:
                for m in busy:
                    if m.id not in gone and m not in pool:
                        until = _turn_ends(m, c, min_resident, swap_quantum)
                        wake = until if wake is None else min(wake, until)
            first_blocked = first_blocked or c
            continue
        for m in chosen:
            (drain if m.in_flight else stop).append(m.id)
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
        drain=tuple(drain),
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
    first_blocked: ModelView | None,
) -> str:
    """Why ``c`` waits, with the numbers and what holds the memory."""
    head = []
    if budget is not None:
        head.append(f"needs {format_bytes(c.need)}, {format_bytes(max(mem_free, 0))} free of {format_bytes(budget)}")
    if max_loaded > 0 and slots_free < 1:
        head.append(f"{max_loaded - int(slots_free)} of {max_loaded} models loaded")
    groups = [
        _items([m for m in holding if m.state == "loaded" and m.busy and not m.pinned and m.id not in gone],
               "busy", _busy_detail),
        _items([m for m in holding if m.pinned and m.state == "loaded"], "pinned"),
        _items([m for m in holding if m.state == "loading"] + list(started), "loading"),
        _items([m for m in holding if m.state == "stopping" or m.id in gone], "stopping"),
        _items([m for m in holding if m.id not in gone and _idle(m)], "idle"),
        f"after: {first_blocked.id} (waiting longer)" if first_blocked else None,
    ]
    return "; ".join(head + [g for g in groups if g])
