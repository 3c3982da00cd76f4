"""What a key may still do: token quotas, concurrent requests, and its priority class.

Pure bookkeeping on an injected clock, no I/O.  The counters are kept by key
id, so reloading the keys file (a new policy) keeps what each key has used.

Priority is a head start: a request of level ``n`` queues as if it had arrived
``n * ageing`` seconds earlier.  Higher classes go first, FIFO within a class,
and a request that has waited ``ageing`` seconds longer than another has
climbed one level above it: a low class is delayed, never starved.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from llamad.keys.apikey import ApiKey
from llamad.errors import ApiError

MINUTE = 60.0
DAY = 86400.0


class TokenWindow:
    """Tokens used in the last ``span`` seconds, kept in ``step``-second buckets (bounded memory)."""

    def __init__(self, span: float, step: float) -> None:
        self.span = span
        self.step = step
        self.buckets: deque[list[float]] = deque()  # [bucket start, tokens], oldest first
        self.total = 0

    def add(self, now: float, tokens: int) -> None:
        if tokens <= 0:
            return
        self.total += tokens
        buckets = self.buckets
        if buckets and now < buckets[-1][0] + self.step:
            buckets[-1][1] += tokens  # the newest bucket: most adds
        else:
            buckets.append([math.floor(now / self.step) * self.step, tokens])

    def used(self, now: float) -> int:
        """Tokens counted in the window that ends now (a bucket leaves once all of it is older than ``span``)."""
        while self.buckets and self.buckets[0][0] + self.step <= now - self.span:
            self.total -= int(self.buckets.popleft()[1])
        return self.total

    def free_in(self, now: float, limit: int) -> float:
        """Seconds until fewer than ``limit`` tokens are in the window (0: now)."""
        used = self.used(now)
        for start, tokens in self.buckets:
            if used < limit:
                break
            used -= int(tokens)
            leaves = start + self.step + self.span
            if used < limit:
                return max(0.0, leaves - now)
        return 0.0

    def kept(self, now: float) -> list[list[float]]:
        """The buckets still in the window, as [start, tokens] (what a restart must not forget)."""
        self.used(now)
        return [list(bucket) for bucket in self.buckets]

    def restore(self, buckets: list[list[float]], now: float) -> None:
        """Add saved buckets that are still in the window (a restart picks up where the last boot was)."""
        merged: dict[float, int] = {}
        for start, tokens in [*self.buckets, *buckets]:
            start = math.floor(start / self.step) * self.step
            if start + self.step > now - self.span and start <= now and tokens > 0:
                merged[start] = merged.get(start, 0) + int(tokens)
        self.buckets = deque([start, tokens] for start, tokens in sorted(merged.items()))
        self.total = sum(merged.values())


class KeyUse:
    """One key's counters."""

    def __init__(self) -> None:
        self.minute = TokenWindow(MINUTE, 1.0)
        self.day = TokenWindow(DAY, 60.0)
        self.in_flight = 0
        self.waiters: deque[defer.Deferred[None]] = deque()


class Policy:
    """Each key's quotas, concurrency and priority, applied to inference requests."""

    def __init__(self, clock: IReactorTime, priorities: Mapping[str, int] | None = None,
                 ageing: float = 30.0) -> None:
        self.clock = clock
        self.priorities = dict(priorities or {})
        self.ageing = ageing
        self.uses: dict[str, KeyUse] = {}
        self.limits: dict[str, int | None] = {}  # max_concurrent by key id, as the latest keys file says

    def use(self, key_id: str) -> KeyUse:
        use = self.uses.get(key_id)
        if use is None:
            use = self.uses[key_id] = KeyUse()
        return use

    def head_start(self, key: ApiKey | None) -> float:
        """Seconds a request of ``key`` queues ahead of one of level 0 that arrived at the same time."""
        if key is None or not key.priority:
            return 0.0
        return self.priorities.get(key.priority, 0) * self.ageing

    # --- token quotas -------------------------------------------------------------------------

    def quota_refusal(self, key: ApiKey) -> ApiError | None:
        """A 429 while a token quota of ``key`` is used up: a request already running finishes, the
        next one waits until the window has room again (``Retry-After``)."""
        if key.tokens_per_minute is None and key.tokens_per_day is None:
            return None
        use = self.uses.get(key.key_id)
        if use is None:
            return None
        now = self.clock.seconds()
        for limit, window, name in ((key.tokens_per_minute, use.minute, "minute"),
                                    (key.tokens_per_day, use.day, "day")):
            if limit is not None and window.used(now) >= limit:
                retry = max(1, math.ceil(window.free_in(now, limit)))
                return ApiError(429, f"token quota of {limit} tokens per {name} used up for key {key.key_id}",
                                "token_quota_exceeded", {b"retry-after": b"%d" % retry})
        return None

    def record(self, key_id: str, tokens: int) -> None:
        """Tokens a finished request of ``key_id`` used (prompt + completion)."""
        if tokens > 0:
            now = self.clock.seconds()
            use = self.use(key_id)
            use.minute.add(now, tokens)
            use.day.add(now, tokens)

    def tokens_used(self, key_id: str) -> tuple[int, int]:
        """(last minute, last day)."""
        use = self.uses.get(key_id)
        if use is None:
            return 0, 0
        now = self.clock.seconds()
        return use.minute.used(now), use.day.used(now)

    def token_state(self) -> dict[str, dict[str, list[list[float]]]]:
        """Each key's token windows, for a state file that outlives this process."""
        now = self.clock.seconds()
        state = {key_id: {"minute": use.minute.kept(now), "day": use.day.kept(now)}
                 for key_id, use in self.uses.items()}
        return {key_id: windows for key_id, windows in state.items() if windows["day"]}

    def restore_tokens(self, state: Mapping[str, Mapping[str, list[list[float]]]]) -> None:
        """Counts from :meth:`token_state` of an earlier boot, added to what this one counted."""
        now = self.clock.seconds()
        for key_id, windows in state.items():
            use = self.use(key_id)
            use.minute.restore(windows.get("minute", []), now)
            use.day.restore(windows.get("day", []), now)

    # --- concurrency --------------------------------------------------------------------------

    def enter(self, key: ApiKey) -> bool:
        """Take one of the key's ``max_concurrent`` places now, if one is free and nobody of this key waits."""
        use = self.use(key.key_id)
        limit = self.limits.setdefault(key.key_id, key.max_concurrent)
        if limit is None or (use.in_flight < limit and not use.waiters):
            use.in_flight += 1
            return True
        return False

    def wait(self, key: ApiKey) -> defer.Deferred[None]:
        """Fires when the key has a place (taken for the caller); cancelling it leaves the line."""
        use = self.use(key.key_id)
        d: defer.Deferred[None] = defer.Deferred(lambda d: _discard(use.waiters, d))
        use.waiters.append(d)
        self._hand_over(key.key_id)
        return d

    def leave(self, key: ApiKey) -> None:
        """A request of ``key`` ended: its place goes to the next one of the key that waits."""
        use = self.use(key.key_id)
        use.in_flight -= 1
        self._hand_over(key.key_id)

    def _hand_over(self, key_id: str) -> None:
        use, limit = self.uses[key_id], self.limits.get(key_id)
        while use.waiters and (limit is None or use.in_flight < limit):
            use.in_flight += 1
            use.waiters.popleft().callback(None)

    def reloaded(self, keys: Mapping[str, ApiKey]) -> None:
        """A new policy: the counters stay (a key revoked and added back keeps what it used); waiters
        of a raised limit go on now."""
        self.limits = {key_id: key.max_concurrent for key_id, key in keys.items()}
        for key_id in self.uses:
            self._hand_over(key_id)


def _discard(waiters: deque[defer.Deferred[None]], d: defer.Deferred[None]) -> None:
    try:
        waiters.remove(d)
    except ValueError:
        pass
