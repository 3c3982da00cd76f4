"""llama-server's slot API, as llamad uses it: list the slots, save each to a file, restore files into a fresh child.

The HTTP calls are injected (``get(port, path, timeout)`` and ``post(port, path, body, timeout)``, each
firing with ``(status, body bytes)``), as the supervisor's probe is: this layer cannot import the
gateway's client, and tests answer in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

Get = Callable[[int, bytes, float], "defer.Deferred[tuple[int, bytes]]"]
Post = Callable[[int, bytes, Mapping[str, Any], float], "defer.Deferred[tuple[int, bytes]]"]

LIST_TIMEOUT = 5.0  # seconds for GET /slots
RESTORE_TIMEOUT = 120.0  # seconds for one restore: a large cache read from a slow disk


@dataclass(frozen=True)
class Saved:
    slot: int
    filename: str
    tokens: int
    bytes: int  # what the child says it wrote


@dataclass(frozen=True)
class SaveReport:
    saved: tuple[Saved, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (file, why): anything it left is no save
    empty: tuple[str, ...] = ()  # files of slots that held nothing after all
    abandoned: bool = False  # the budget ran out first


@dataclass(frozen=True)
class Restored:
    slot: int
    filename: str
    tokens: int


@dataclass(frozen=True)
class RestoreReport:
    restored: tuple[Restored, ...] = ()
    refused: tuple[str, str] | None = None  # (file, why): the child's cache may be broken now


def holds_prompt(slot: Mapping[str, Any]) -> bool:
    """A slot worth saving: idle, with tokens (``n_prompt_tokens`` in current builds, ``prompt`` in older)."""
    if slot.get("is_processing"):
        return False
    tokens = slot.get("n_prompt_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        return tokens > 0
    return bool(slot.get("prompt") or slot.get("tokens"))


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


@dataclass(frozen=True)
class Unanswered:
    """A call that got no HTTP answer: the connection failed, or the time ran out."""

    why: str

    @classmethod
    def of(cls, failure: Failure) -> Unanswered:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            return cls("no answer in time")
        return cls(failure.getErrorMessage() or str(failure.type.__name__))


def _why(result: tuple[int, bytes] | Unanswered) -> str:
    if isinstance(result, Unanswered):
        return result.why
    status, body = result
    answer = _json(body)
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message", "") if isinstance(error, dict) else ""
    return f"HTTP {status}" + (f": {message}" if message else "")


class SlotClient:
    """One model's children, through their slot API."""

    def __init__(self, clock: IReactorTime, get: Get, post: Post, restore_timeout: float = RESTORE_TIMEOUT) -> None:
        self.clock = clock
        self.get = get
        self.post = post
        self.restore_timeout = restore_timeout

    @defer.inlineCallbacks
    def save_all(self, port: int, budget: float, name_for: Callable[[int], str],
                 slots: int) -> Generator[Any, Any, SaveReport]:
        """Save every slot that holds a prompt, one after another, until ``budget`` seconds are spent.

        The slots come from ``GET /slots``; if it does not answer (``--no-slots``), each of the
        ``slots`` ids is tried and the empty ones dropped.  Never fails.
        """
        deadline = self.clock.seconds() + budget
        listed = yield self._timed(self.get, port, b"/slots", min(LIST_TIMEOUT, budget))
        if isinstance(listed, Unanswered) and self.clock.seconds() >= deadline:
            return SaveReport(abandoned=True)
        body = _json(listed[1]) if not isinstance(listed, Unanswered) and listed[0] == 200 else None
        if isinstance(body, list):
            ids = [s["id"] for s in body if isinstance(s, dict) and isinstance(s.get("id"), int) and holds_prompt(s)]
        else:
            ids = list(range(slots))
        saved: list[Saved] = []
        failed: list[tuple[str, str]] = []
        empty: list[str] = []
        for slot in ids:
            left = deadline - self.clock.seconds()
            if left <= 0:
                return SaveReport(tuple(saved), tuple(failed), tuple(empty), abandoned=True)
            name = name_for(slot)
            result = yield self._timed(self.post, port, b"/slots/%d?action=save" % slot, {"filename": name}, left)
            answer = _json(result[1]) if not isinstance(result, Unanswered) and result[0] == 200 else None
            if not isinstance(answer, dict):
                failed.append((name, _why(result)))
                if isinstance(result, Unanswered) and self.clock.seconds() >= deadline:
                    return SaveReport(tuple(saved), tuple(failed), tuple(empty), abandoned=True)
                continue
            tokens, written = answer.get("n_saved"), answer.get("n_written")
            if not isinstance(tokens, int) or not isinstance(written, int):
                failed.append((name, "an answer without n_saved and n_written"))
            elif tokens == 0:
                empty.append(name)
            else:
                saved.append(Saved(slot, name, tokens, written))
        return SaveReport(tuple(saved), tuple(failed), tuple(empty))

    @defer.inlineCallbacks
    def restore(self, port: int, files: list[str]) -> Generator[Any, Any, RestoreReport]:
        """Restore ``files`` into slots 0, 1, ... of a fresh child, in order; stop at the first refusal.

        Never fails: a refusal, an error or no answer in time is reported as ``refused``.
        """
        restored: list[Restored] = []
        for slot, name in enumerate(files):
            result = yield self._timed(self.post, port, b"/slots/%d?action=restore" % slot, {"filename": name},
                                       self.restore_timeout)
            answer = _json(result[1]) if not isinstance(result, Unanswered) and result[0] == 200 else None
            if not isinstance(answer, dict):
                return RestoreReport(tuple(restored), (name, _why(result)))
            tokens = answer.get("n_restored")
            restored.append(Restored(slot, name, tokens if isinstance(tokens, int) else 0))
        return RestoreReport(tuple(restored))

    def _timed(self, call: Callable[..., defer.Deferred[tuple[int, bytes]]],
               *args: Any) -> defer.Deferred[tuple[int, bytes] | Unanswered]:
        """``call(*args)`` within its timeout (the last argument) by this clock, whatever the call does with
        it; a failure comes as :class:`Unanswered`: the callers report failures, they never raise them."""
        d = defer.maybeDeferred(call, *args)
        d.addTimeout(args[-1], self.clock)
        return d.addErrback(Unanswered.of)
