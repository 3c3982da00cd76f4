"""The keys file (llama-gguf-inference's ``key_id:api_key`` format), key checks, rate limits and the atomic writer."""

from __future__ import annotations

import os
import stat
from datetime import datetime, timezone

import pytest

from llamad.keys.auth import Denied, KeyStore, presented_key
from llamad.keys.apikey import ApiKey, parse_line, read_key_file, write_key_file

SECRET = "s" * 20
OTHER = "o" * 20
UTC = timezone.utc
NOW = datetime(2029, 6, 1, tzinfo=UTC)


def key_of(line: str) -> ApiKey:
    parsed = parse_line(line)
    assert parsed is not None
    assert parsed[1] == SECRET
    return parsed[0]


# --- format ---------------------------------------------------------------------


def test_id_and_key_only():
    key = key_of(f"alice:{SECRET}")
    assert (key.key_id, key.rate_limit, key.expires) == ("alice", None, None)


def test_rate_limit():
    assert key_of(f"alice:{SECRET}:60").rate_limit == 60


def test_rate_limit_and_utc_expiry():
    key = key_of(f"alice:{SECRET}:60:2030-01-01T00:00:00Z")
    assert key.rate_limit == 60 and key.expires == datetime(2030, 1, 1, tzinfo=UTC)


def test_empty_rate_and_offset_expiry_is_converted_to_utc():
    key = key_of(f"alice:{SECRET}::2030-01-01T00:00:00+02:00")
    assert key.rate_limit is None and key.expires == datetime(2029, 12, 31, 22, tzinfo=UTC)
    assert key.expires.utcoffset().total_seconds() == 0


def test_expiry_without_rate_naive_means_utc():
    key = key_of(f"alice:{SECRET}:2030-01-01T00:00:00")
    assert key.rate_limit is None and key.expires == datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("line", ["", "   ", "# a comment", "  # indented comment"])
def test_blank_and_comment_lines_are_nothing(line):
    assert parse_line(line) is None


def test_trailing_comment_is_ignored():
    assert key_of(f"alice:{SECRET}:5  # five a minute").rate_limit == 5


@pytest.mark.parametrize(
    "line, problem",
    [
        (f"bad id:{SECRET}", "key_id"),
        (f"b@d:{SECRET}", "key_id"),
        ("alice:" + "k" * 15, "api_key"),
        ("alice:" + "k" * 129, "api_key"),
        ("alice:" + "k" * 15 + "!", "api_key"),
        (f"alice:{SECRET}:60:not-a-date", "expiry"),
        (f"alice:{SECRET}:2030-13-01T00:00:00", "expiry"),
        (f"alice:{SECRET}:0", "rate limit"),
        (f"alice:{SECRET}:0:2030-01-01T00:00:00Z", "rate limit"),
        ("alice-without-key", "expected"),
    ],
)
def test_invalid_lines_raise_naming_the_problem(line, problem):
    with pytest.raises(ValueError, match=problem):
        parse_line(line)


def test_key_length_bounds_are_inclusive():
    assert parse_line("a:" + "k" * 16) is not None
    assert parse_line("a:" + "k" * 128) is not None


def test_read_key_file_skips_invalid_lines_with_path_and_line_number(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(
        "# llamad keys\n"
        "\n"
        f"alice:{SECRET}\n"
        f"bad id:{SECRET}\n"
        f"bob:{OTHER}:60:2030-01-01T00:00:00Z\n"
        "carol:short\n"
        f"dave:{SECRET}:0\n"
    )
    lines, warnings = read_key_file(str(path))
    assert [line.key.key_id for line in lines if line.key] == ["alice", "bob"]
    assert len(lines) == 7 and lines[3].key is None and lines[3].text == f"bad id:{SECRET}"
    assert [w.split(": ", 1)[0] for w in warnings] == [f"{path}:4", f"{path}:6", f"{path}:7"]
    assert all("skipped" in w for w in warnings)


# --- KeyStore.check ---------------------------------------------------------------


def store_with(tmp_path, *lines: str) -> KeyStore:
    path = tmp_path / "api_keys"
    path.write_text("".join(line + "\n" for line in lines))
    store = KeyStore()
    assert store.load(str(path)) == []
    return store


def test_missing_and_wrong_keys_are_401(tmp_path):
    store = store_with(tmp_path, f"alice:{SECRET}")
    for presented in (None, ""):
        denied = store.check(presented, 0, NOW)
        assert isinstance(denied, Denied) and denied.status == 401 and denied.code == "invalid_api_key"
    denied = store.check(OTHER, 0, NOW)
    assert isinstance(denied, Denied) and (denied.status, denied.message) == (401, "Invalid API key")
    assert store.check(SECRET, 0, NOW).key_id == "alice"


@pytest.mark.parametrize("expiry", ["2030-01-01T00:00:00", "2030-01-01T00:00:00Z", "2030-01-01T02:00:00+02:00"])
def test_expired_keys_are_401_aware_or_naive(tmp_path, expiry):
    store = store_with(tmp_path, f"alice:{SECRET}:{expiry}")
    assert isinstance(store.check(SECRET, 0, datetime(2029, 12, 31, 23, 59, 59, tzinfo=UTC)), ApiKey)
    denied = store.check(SECRET, 0, datetime(2030, 1, 1, tzinfo=UTC))
    assert isinstance(denied, Denied) and (denied.status, denied.message) == (401, "API key has expired")


def test_rate_limit_is_a_sliding_window_of_60_seconds(tmp_path):
    store = store_with(tmp_path, f"alice:{SECRET}:2")
    assert isinstance(store.check(SECRET, 1000.0, NOW), ApiKey)
    assert isinstance(store.check(SECRET, 1010.0, NOW), ApiKey)
    denied = store.check(SECRET, 1020.0, NOW)
    assert isinstance(denied, Denied) and denied.status == 429 and denied.retry_after == 40
    denied = store.check(SECRET, 1059.5, NOW)
    assert isinstance(denied, Denied) and denied.retry_after == 1  # never 0
    assert isinstance(store.check(SECRET, 1060.0, NOW), ApiKey)  # the one at 1000 left the window
    denied = store.check(SECRET, 1065.0, NOW)
    assert isinstance(denied, Denied) and denied.retry_after == 5  # oldest is now the one at 1010


def test_an_uncounted_check_takes_no_rate_limit_slot_but_sees_a_full_window(tmp_path):
    store = store_with(tmp_path, f"alice:{SECRET}:1")
    assert all(isinstance(store.check(SECRET, 0, NOW, count=False), ApiKey) for _ in range(5))
    assert isinstance(store.check(SECRET, 0, NOW), ApiKey)  # the one counted check
    denied = store.check(SECRET, 1, NOW, count=False)
    assert isinstance(denied, Denied) and denied.status == 429
    assert len(store.windows["alice"]) == 1


def test_rate_limits_are_per_key_and_unlimited_keys_never_429(tmp_path):
    store = store_with(tmp_path, f"alice:{SECRET}:1", f"bob:{OTHER}")
    assert isinstance(store.check(SECRET, 0, NOW), ApiKey)
    assert isinstance(store.check(SECRET, 1, NOW), Denied)
    assert all(isinstance(store.check(OTHER, 1, NOW), ApiKey) for _ in range(100))


# --- presented_key ------------------------------------------------------------------


@pytest.mark.parametrize("header", [b"Bearer abc", b"bearer abc", b"BEARER   abc ", b"  Bearer abc"])
def test_bearer_scheme_is_case_insensitive(header):
    assert presented_key(header, None) == "abc"


def test_x_api_key_and_other_schemes():
    assert presented_key(None, b" abc ") == "abc"
    assert presented_key(b"Basic dXNlcg==", b"abc") == "abc"
    assert presented_key(b"Basic dXNlcg==", None) is None
    assert presented_key(b"Bearer ", None) is None
    assert presented_key(b"Bearer one", b"two") == "one"
    assert presented_key(None, None) is None and presented_key(None, b"") is None


# --- files ---------------------------------------------------------------------------


def test_write_key_file_is_atomic_mode_0600_and_preserves_lines(tmp_path):
    path = tmp_path / "keys" / "api_keys"
    original = ["# mine", "", f"alice:{SECRET}:60", "broken line kept as is"]
    write_key_file(str(path), original)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().splitlines() == original
    before = os.stat(path).st_ino
    write_key_file(str(path), original + [f"bob:{OTHER}"])
    assert os.stat(path).st_ino != before  # replaced, not rewritten in place
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [line.text for line in read_key_file(str(path))[0]] == original + [f"bob:{OTHER}"]
    assert os.listdir(path.parent) == ["api_keys"]  # no temporary file left behind


def test_reload_follows_the_file_and_a_missing_file_means_no_keys(tmp_path):
    path = tmp_path / "api_keys"
    store = KeyStore()
    assert store.load(str(path)) == [f"{path}: not found"] and len(store) == 0
    assert isinstance(store.check(SECRET, 0, NOW), Denied)
    write_key_file(str(path), [f"alice:{SECRET}"])
    store.load(str(path))
    assert store.check(SECRET, 0, NOW).key_id == "alice"
    write_key_file(str(path), [f"bob:{OTHER}"])
    store.load(str(path))
    assert isinstance(store.check(SECRET, 0, NOW), Denied) and store.check(OTHER, 0, NOW).key_id == "bob"
    path.unlink()
    store.load(str(path))
    assert len(store) == 0 and isinstance(store.check(OTHER, 0, NOW), Denied)


def test_reload_keeps_the_rate_window_of_a_key_that_stays(tmp_path):
    path = tmp_path / "api_keys"
    write_key_file(str(path), [f"alice:{SECRET}:1"])
    store = KeyStore()
    store.load(str(path))
    assert isinstance(store.check(SECRET, 0, NOW), ApiKey)
    store.load(str(path))
    assert isinstance(store.check(SECRET, 1, NOW), Denied)


# --- a keys file that is not all UTF-8, or cannot be read ------------------------------


def test_a_line_that_is_not_utf8_is_skipped_with_its_line_number_and_the_rest_loads(tmp_path):
    path = tmp_path / "api_keys"
    path.write_bytes(f"alice:{SECRET}\n".encode() + b"# caf\xe9\n" + f"bob:{OTHER}\n".encode())
    lines, warnings = read_key_file(str(path))
    assert [line.key.key_id for line in lines if line.key] == ["alice", "bob"]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}:2: skipped: not UTF-8")


def test_a_bad_byte_in_an_edit_still_applies_the_revocation_in_it(tmp_path):
    path = tmp_path / "api_keys"
    write_key_file(str(path), [f"alice:{SECRET}", f"bob:{OTHER}"])
    store = KeyStore()
    store.load(str(path))
    assert store.check(SECRET, 0, NOW).key_id == "alice"
    path.write_bytes(b"# revoked alice \xff\n" + f"bob:{OTHER}\n".encode())
    assert store.load(str(path)) == [f"{path}:1: skipped: not UTF-8 (byte 0xff at offset 16)"]
    assert isinstance(store.check(SECRET, 0, NOW), Denied)
    assert store.check(OTHER, 0, NOW).key_id == "bob"


def test_a_rewrite_keeps_a_line_that_is_not_utf8_byte_for_byte(tmp_path):
    path = tmp_path / "api_keys"
    path.write_bytes(b"# \xff\xfe mine\n" + f"alice:{SECRET}\n".encode())
    lines, _ = read_key_file(str(path))
    write_key_file(str(path), [line.text for line in lines] + [f"bob:{OTHER}"])
    assert path.read_bytes() == b"# \xff\xfe mine\n" + f"alice:{SECRET}\nbob:{OTHER}\n".encode()


def test_an_unreadable_keys_file_fails_closed_without_raising(tmp_path):
    path = tmp_path / "api_keys"
    write_key_file(str(path), [f"alice:{SECRET}"])
    store = KeyStore()
    store.load(str(path))
    path.unlink()
    path.mkdir()  # any read failure: a directory, permission denied, an I/O error
    assert store.load(str(path)) == [f"{path}: cannot read: Is a directory"]
    assert store.error == f"{path}: cannot read: Is a directory"
    assert len(store) == 0 and isinstance(store.check(SECRET, 0, NOW), Denied)
    path.rmdir()
    write_key_file(str(path), [f"alice:{SECRET}"])
    assert store.load(str(path)) == [] and store.error == ""
    assert store.check(SECRET, 0, NOW).key_id == "alice"


def test_a_new_secret_never_starts_like_an_option(monkeypatch):
    """One token in 64 starts with '-': ``llamad keys reload --key KEY`` would read it as an option."""
    from llamad.keys import apikey

    drawn = iter(["-looks-like-an-option-0123456789abcdef", "-again-0123456789abcdefghijklmnop",
                  "fine-0123456789abcdefghijklmnopqrst"])
    monkeypatch.setattr(apikey.secrets, "token_urlsafe", lambda n: next(drawn))
    assert apikey.new_secret() == "fine-0123456789abcdefghijklmnopqrst"
