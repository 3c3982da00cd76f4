"""llama-server's slot API as llamad uses it, on a Clock and answers the test gives: the save budget, the restores."""

from __future__ import annotations

import json
from typing import Any, Mapping

from twisted.internet import defer
from twisted.internet.task import Clock

from llamad.kv.slots import RESTORE_TIMEOUT, Restored, Saved, SlotClient, holds_prompt

PORT = 4321
EMPTY = {"id": 0, "n_ctx": 4096, "speculative": False, "is_processing": False}


def used(slot: int, tokens: int = 1200, processing: bool = False) -> dict[str, Any]:
    return {"id": slot, "n_ctx": 4096, "is_processing": processing, "id_task": 3, "n_prompt_tokens": tokens}


def saved(filename: str, tokens: int = 1200, written: int = 600_000) -> tuple[int, bytes]:
    return 200, json.dumps({"filename": filename, "n_saved": tokens, "n_written": written,
                            "timings": {"save_ms": 0.9}}).encode()


class Child:
    """The child's slot API: each call waits until the test answers it (or answers at once, from ``auto``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, Any, float]] = []
        self.pending: list[defer.Deferred[tuple[int, bytes]]] = []
        self.cancelled = 0
        self.auto: list[tuple[int, bytes]] = []

    def get(self, port: int, path: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        assert port == PORT
        return self._call("GET", path, None, timeout)

    def post(self, port: int, path: bytes, body: Mapping[str, Any],
             timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        assert port == PORT
        return self._call("POST", path, dict(body), timeout)

    def _call(self, method: str, path: bytes, body: Any, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        self.calls.append((method, path, body, timeout))
        if self.auto:
            return defer.succeed(self.auto.pop(0))

        def cancelled(d: defer.Deferred[Any]) -> None:
            self.cancelled += 1

        d: defer.Deferred[tuple[int, bytes]] = defer.Deferred(cancelled)
        self.pending.append(d)
        return d

    def answer(self, result: tuple[int, bytes]) -> None:
        self.pending.pop(0).callback(result)

    def paths(self) -> list[bytes]:
        return [path for _, path, _, _ in self.calls]


def client() -> tuple[SlotClient, Child, Clock]:
    clock = Clock()
    child = Child()
    return SlotClient(clock, child.get, child.post), child, clock


def name_for(slot: int) -> str:
    return f"fp-{slot}-1.bin"


def test_a_slot_holds_a_prompt_when_idle_with_tokens() -> None:
    assert holds_prompt(used(1)) and not holds_prompt(EMPTY)
    assert not holds_prompt(used(1, processing=True)) and not holds_prompt(used(1, tokens=0))
    assert holds_prompt({"id": 0, "prompt": "hello"}) and not holds_prompt({"id": 0, "prompt": ""})  # older builds


def test_save_all_saves_each_slot_holding_a_prompt_one_after_another() -> None:
    slots, child, clock = client()
    d = slots.save_all(PORT, 10.0, name_for, slots=4)
    assert child.paths() == [b"/slots"]
    child.answer((200, json.dumps([EMPTY, used(1), used(2, processing=True), used(3, tokens=40)]).encode()))
    assert child.calls[1] == ("POST", b"/slots/1?action=save", {"filename": "fp-1-1.bin"}, 10.0)
    assert len(child.calls) == 2  # the next save waits for this one's answer
    clock.advance(1.5)
    child.answer(saved("fp-1-1.bin"))
    assert child.calls[2][:3] == ("POST", b"/slots/3?action=save", {"filename": "fp-3-1.bin"})
    assert child.calls[2][3] == 8.5  # what is left of the budget
    child.answer(saved("fp-3-1.bin", tokens=40, written=20_000))
    report = d.result
    assert report.saved == (Saved(1, "fp-1-1.bin", 1200, 600_000), Saved(3, "fp-3-1.bin", 40, 20_000))
    assert not report.abandoned and report.failed == ()


def test_a_slow_save_is_abandoned_when_the_budget_runs_out() -> None:
    slots, child, clock = client()
    d = slots.save_all(PORT, 2.0, name_for, slots=2)
    child.answer((200, json.dumps([used(0), used(1)]).encode()))
    clock.advance(0.5)
    child.answer(saved("fp-0-1.bin"))
    clock.advance(1.49)
    assert not d.called  # slot 1's save is still running
    clock.advance(0.01)
    assert d.called and child.cancelled == 1  # its request is dropped: the stop goes on
    report = d.result
    assert report.abandoned and [s.slot for s in report.saved] == [0]
    assert report.failed == (("fp-1-1.bin", "no answer in time"),)  # whatever it left is no save
    assert len(child.calls) == 3


def test_a_slow_listing_is_abandoned_too() -> None:
    slots, child, clock = client()
    d = slots.save_all(PORT, 1.0, name_for, slots=2)
    clock.advance(1.0)
    assert d.called and d.result.abandoned and d.result.saved == ()
    assert child.paths() == [b"/slots"]


def test_without_a_slot_listing_each_slot_is_tried_and_empty_ones_dropped() -> None:
    slots, child, clock = client()
    child.auto = [(501, b'{"error": {"message": "This server does not support slots endpoint."}}'),
                  (200, json.dumps({"n_saved": 0, "n_written": 40}).encode()), saved("fp-1-1.bin")]
    report = slots.save_all(PORT, 10.0, name_for, slots=2).result
    assert child.paths() == [b"/slots", b"/slots/0?action=save", b"/slots/1?action=save"]
    assert report.empty == ("fp-0-1.bin",) and [s.slot for s in report.saved] == [1]


def test_a_refused_save_is_reported_and_the_next_slot_still_saved() -> None:
    slots, child, clock = client()
    child.auto = [(200, json.dumps([used(0), used(1)]).encode()),
                  (500, b'{"error": {"code": 500, "message": "Unable to save slot"}}'), saved("fp-1-1.bin")]
    report = slots.save_all(PORT, 10.0, name_for, slots=2).result
    assert report.failed == (("fp-0-1.bin", "HTTP 500: Unable to save slot"),)
    assert [s.slot for s in report.saved] == [1] and not report.abandoned


def test_restore_puts_each_file_in_its_own_slot() -> None:
    slots, child, clock = client()
    child.auto = [(200, b'{"id_slot": 0, "n_restored": 1200, "n_read": 600000}'),
                  (200, b'{"id_slot": 1, "n_restored": 40, "n_read": 20000}')]
    report = slots.restore(PORT, ["new.bin", "old.bin"]).result
    assert child.calls == [("POST", b"/slots/0?action=restore", {"filename": "new.bin"}, RESTORE_TIMEOUT),
                           ("POST", b"/slots/1?action=restore", {"filename": "old.bin"}, RESTORE_TIMEOUT)]
    assert report.restored == (Restored(0, "new.bin", 1200), Restored(1, "old.bin", 40)) and report.refused is None


def test_restore_stops_at_the_first_refusal() -> None:
    slots, child, clock = client()
    child.auto = [(200, b'{"n_restored": 1200}'),
                  (400, b'{"error": {"message": "Unable to restore slot: invalid slot save file"}}')]
    report = slots.restore(PORT, ["a.bin", "b.bin", "c.bin"]).result
    assert len(child.calls) == 2
    assert [r.filename for r in report.restored] == ["a.bin"]
    assert report.refused == ("b.bin", "HTTP 400: Unable to restore slot: invalid slot save file")


def test_a_restore_with_no_answer_counts_as_refused() -> None:
    slots, child, clock = client()
    d = slots.restore(PORT, ["a.bin"])
    clock.advance(RESTORE_TIMEOUT)
    assert d.result.refused == ("a.bin", "no answer in time") and child.cancelled == 1
