"""The token windows saved on the volume: loaded at start, saved when they changed, at stop, and
never half-written or overwritten by an older state."""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock

from llamad.auth import ApiKey
from llamad.policy import Policy
from llamad.tokenfile import SAVE_INTERVAL, TokenFile, read_state

QUOTA = ApiKey("team", b"t" * 32, tokens_per_day=100)


class Later:
    """Runs the thread's work when told to, as a thread would finish it some time later."""

    def __init__(self) -> None:
        self.calls: list[tuple[defer.Deferred, object, tuple]] = []

    def __call__(self, f, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((d, f, args))
        return d

    def run(self, index: int = 0) -> None:
        d, f, args = self.calls.pop(index)
        d.callback(f(*args))


def day_total(path: str) -> int:
    return sum(tokens for _, tokens in read_state(path)["team"]["day"])


def boot(tmp_path, clock: Clock, in_thread=None) -> tuple[Policy, TokenFile]:
    policy = Policy(clock)
    service = TokenFile(policy, str(tmp_path / "state" / "token_use.json"), clock,
                        **({"in_thread": in_thread} if in_thread else {}))
    service.startService()
    return policy, service


def test_a_restart_keeps_the_days_quota(tmp_path):
    clock = Clock()
    clock.advance(1_000_000)
    policy, service = boot(tmp_path, clock)
    policy.record("team", 120)
    service.stopService()
    assert json.loads((tmp_path / "state" / "token_use.json").read_text())["team"]["day"][0][1] == 120
    clock.advance(5)
    policy, service = boot(tmp_path, clock)
    refusal = policy.quota_refusal(QUOTA)
    assert refusal is not None and refusal.code == "token_quota_exceeded"


def test_saves_every_interval_in_a_thread_only_what_changed(tmp_path):
    clock = Clock()
    later = Later()
    policy, service = boot(tmp_path, clock, later)
    clock.advance(SAVE_INTERVAL)
    assert later.calls == []  # nothing used yet: nothing to write
    policy.record("team", 10)
    clock.advance(SAVE_INTERVAL)
    assert len(later.calls) == 1
    clock.advance(SAVE_INTERVAL)
    assert len(later.calls) == 1  # one write at a time
    later.run()
    assert day_total(service.path) == 10
    clock.advance(SAVE_INTERVAL)  # the minute window has emptied since: that is written too
    later.run()
    assert read_state(service.path)["team"]["minute"] == [] and day_total(service.path) == 10
    clock.advance(SAVE_INTERVAL)
    assert later.calls == []  # unchanged since the last write


def test_an_older_state_finishing_late_does_not_overwrite_a_newer_one(tmp_path):
    clock = Clock()
    later = Later()
    policy, service = boot(tmp_path, clock, later)
    policy.record("team", 10)
    clock.advance(SAVE_INTERVAL)  # a write of 10 begins in the thread
    policy.record("team", 5)
    service.stopService()  # shutdown writes 15 at once
    later.run()  # then the thread's write of 10 ends
    assert day_total(service.path) == 15


def test_a_bad_file_starts_from_zero_and_is_replaced(tmp_path):
    path = tmp_path / "state" / "token_use.json"
    path.parent.mkdir()
    for text in ("{not json", "[1, 2]", '{"team": {"day": [["x", 1]]}}'):
        path.write_text(text)
        clock = Clock()
        policy, service = boot(tmp_path, clock)
        assert policy.tokens_used("team") == (0, 0)
        policy.record("team", 3)
        service.stopService()
        assert day_total(str(path)) == 3
    assert [name for name in os.listdir(path.parent)] == ["token_use.json"]  # no temporary file left
