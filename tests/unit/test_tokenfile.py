"""The token windows saved on the volume: loaded at start, saved when they changed, at stop, and
never half-written or overwritten by an older state."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from llamad.keys.apikey import ApiKey
from llamad.keys.policy import Policy
from llamad.keys import tokenfile
from llamad.keys.tokenfile import SAVE_INTERVAL, TokenFile, read_state

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
    policy.reloaded({"team": QUOTA})  # the keys file, loaded before the token file
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


NOW = 1_000_000.0


def boot_with(tmp_path, text: str | bytes) -> tuple[Policy, list[str]]:
    """Boot on a token file holding ``text``; the policy and the warnings logged."""
    path = tmp_path / "state" / "token_use.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    clock = Clock()
    clock.advance(NOW)
    with capturedLogs() as events:
        policy, service = boot(tmp_path, clock)
    service.stopService()
    return policy, [formatEvent(e) for e in events if e["log_level"].name == "warn"]


def team(minute: str = "[]", day: str = "[]", **more: str) -> str:
    fields = "".join(f', "{k}": {v}' for k, v in more.items())
    return f'{{"team": {{"minute": {minute}, "day": {day}{fields}}}}}'


GOOD = f"[{NOW - 120}, 7]"


@pytest.mark.parametrize("bad, why", [
    ("[%s, Infinity]" % (NOW - 60), "tokens inf is not a whole number"),
    ("[%s, 1e999]" % (NOW - 60), "tokens inf is not a whole number"),
    ("[%s, -500]" % (NOW - 60), "tokens -500 is not a whole number"),  # no credit
    ("[%s, 0]" % (NOW - 60), "tokens 0 is not a whole number"),
    ("[%s, 2.5]" % (NOW - 60), "tokens 2.5 is not a whole number"),
    ("[%s, true]" % (NOW - 60), "tokens True is not a whole number"),
    ("[NaN, 5]", "start nan is not a finite number"),
    ("[-Infinity, 5]", "start -inf is not a finite number"),
    ("[1%s, 5]" % ("0" * 400), "is not a finite number"),
    ('["x", 5]', "start 'x' is not a finite number"),
    ("[1, 2, 3]", "[1, 2, 3] is not a [start, tokens] pair"),
    ("{}", "{} is not a [start, tokens] pair"),
])
def test_a_bad_bucket_is_dropped_with_a_warning_and_the_rest_kept(tmp_path, bad, why):
    policy, warnings = boot_with(tmp_path, team(day=f"[{bad}, {GOOD}]"))
    assert policy.tokens_used("team") == (0, 7)
    assert len(warnings) == 1 and "key team: day: dropped 1 bad bucket(s), the first: " in warnings[0], warnings
    assert why in warnings[0]


def test_a_key_that_is_not_an_object_is_skipped(tmp_path):
    policy, warnings = boot_with(tmp_path, '{"team": [1, 2]}')
    assert policy.tokens_used("team") == (0, 0)
    assert warnings == [f"token use: {tmp_path}/state/token_use.json: key team: not an object of windows "
                        "([1, 2]): skipped"]


def test_a_window_that_is_not_a_list_is_dropped(tmp_path):
    policy, warnings = boot_with(tmp_path, team(minute='"lots"', day=f"[{GOOD}]"))
    assert policy.tokens_used("team") == (0, 7)
    assert len(warnings) == 1 and "minute: not a list of [start, tokens] ('lots'): dropped" in warnings[0]


def test_a_window_with_more_buckets_than_it_holds_is_dropped_unchecked(tmp_path):
    day = "[" + ", ".join(f"[{NOW - 60 * (i % 1000)}, 1]" for i in range(tokenfile.WINDOWS["day"] + 1)) + "]"
    policy, warnings = boot_with(tmp_path, team(minute=f"[[{NOW - 1}, 3]]", day=day))
    assert policy.tokens_used("team") == (3, 0)
    assert len(warnings) == 1 and f"day: {tokenfile.WINDOWS['day'] + 1} buckets, more than the window holds" \
        in warnings[0]


def test_unknown_fields_and_keys_not_in_the_keys_file_are_dropped(tmp_path):
    text = ('{"team": {"day": [%s], "junk": [1, 2, 3]}, "ghost": {"day": [%s]}, "bad\\u001b id": {}}'
            % (GOOD, GOOD))
    policy, warnings = boot_with(tmp_path, text)
    assert policy.tokens_used("team") == (0, 7)
    assert set(policy.uses) == {"team"}  # no counters kept for keys that do not exist
    assert len(warnings) == 2, warnings
    assert "key team: unknown field(s) dropped: 'junk'" in warnings[0]
    assert "dropped the windows of 2 key(s) that are not in the keys file: 'ghost', 'bad\\x1b id'" in warnings[1]


def test_a_file_nested_too_deeply_starts_from_zero(tmp_path):
    policy, warnings = boot_with(tmp_path, "[" * 100_000)
    assert policy.tokens_used("team") == (0, 0)
    assert warnings == [f"token use: {tmp_path}/state/token_use.json cannot be read (nested too deeply); "
                        "quotas start from zero"]


def test_a_file_that_is_not_utf8_starts_from_zero(tmp_path):
    policy, warnings = boot_with(tmp_path, b'{"team\xff": {}}')
    assert policy.tokens_used("team") == (0, 0)
    assert len(warnings) == 1 and "cannot be read" in warnings[0]


def test_a_file_over_the_bound_is_ignored_unread(tmp_path, monkeypatch):
    path = tmp_path / "state" / "token_use.json"
    path.parent.mkdir()
    with open(path, "wb") as f:
        f.truncate(tokenfile.MAX_BYTES + 1)  # sparse: no time or disk spent on the test
    monkeypatch.setattr(tokenfile.json, "loads", lambda *_: pytest.fail("an oversized file was parsed"))
    clock = Clock()
    with capturedLogs() as events:
        policy, service = boot(tmp_path, clock)
    assert policy.tokens_used("team") == (0, 0)
    assert [formatEvent(e) for e in events] == [
        f"token use: {path} is larger than {tokenfile.MAX_BYTES} bytes, far more than llamad writes: it is ignored "
        "and quotas start from zero"]
