"""The TOML keys file: parsing, the store loading it, both formats converted, and text edits that keep comments."""

from __future__ import annotations

import hashlib
import tomllib
from datetime import datetime, timezone

import pytest

from llamad.keys import keysfile
from llamad.keys.auth import KeyStore
from llamad.keys.apikey import EVERY_ROLE, ApiKey, read_key_file

SECRET = "s3cret-team-a-0123456789"
OTHER = "s3cret-team-b-0123456789"

FILE = f"""# keys for the shared host
[keys.team-a]
key = "{SECRET}"
models = ["qwen-*", "llama"]
role = "inference"
rate = 120
tokens_per_minute = 2000
tokens_per_day = 100000
max_concurrent = 2
priority = "interactive"
expires = 2027-01-01T00:00:00Z

# the operators
[keys.ops]
key_sha256 = "{hashlib.sha256(OTHER.encode()).hexdigest()}"
role = ["admin"]
"""


def test_every_field_is_read():
    entries, warnings = keysfile.parse_toml_keys(FILE, "keys.toml", {"interactive": 1})
    assert warnings == []
    a, ops = (e.key for e in entries)
    assert (a.key_id, a.models, a.roles, a.rate_limit, a.tokens_per_minute, a.tokens_per_day, a.max_concurrent,
            a.priority) == ("team-a", ("qwen-*", "llama"), frozenset({"inference"}), 120, 2000, 100000, 2,
                            "interactive")
    assert a.expires == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert a.may_use("qwen-7b") and a.may_use("llama") and not a.may_use("llama-70b")
    assert ops.roles == frozenset({"admin"}) and ops.digest == hashlib.sha256(OTHER.encode()).digest()
    assert entries[1].secret == ""


@pytest.mark.parametrize("table, problem", [
    ('key = "short"', "bad key"),
    (f'key = "{SECRET}"\nkey_sha256 = "{"0" * 64}"', "exactly one of key and key_sha256"),
    ('key_sha256 = "xyz"', "bad key_sha256"),
    (f'key = "{SECRET}"\nrate = 0', "rate must be an integer > 0"),
    (f'key = "{SECRET}"\nmax_concurrent = true', "max_concurrent must be an integer > 0"),
    (f'key = "{SECRET}"\nrole = "root"', "role must be one of"),
    (f'key = "{SECRET}"\npriority = "vip"', "priority 'vip' is not a class"),
    (f'key = "{SECRET}"\nmodels = []', "allows no model"),
    (f'key = "{SECRET}"\nexpires = "soon"', "bad expires"),
    (f'key = "{SECRET}"\nmodel = ["a"]', "unknown field 'model'"),
])
def test_a_bad_table_is_skipped_with_a_warning_naming_it(table, problem):
    text = f"[keys.bad]\n{table}\n\n[keys.good]\nkey = \"{OTHER}\"\n"
    entries, warnings = keysfile.parse_toml_keys(text, "keys.toml", {"interactive": 1})
    assert [e.key.key_id for e in entries] == ["good"]
    assert len(warnings) == 1 and "[keys.bad]" in warnings[0] and problem in warnings[0]


def test_the_same_secret_twice_keeps_the_first():
    text = f'[keys.a]\nkey = "{SECRET}"\n[keys.b]\nkey = "{SECRET}"\n'
    entries, warnings = keysfile.parse_toml_keys(text, "k.toml")
    assert [e.key.key_id for e in entries] == ["a"] and "the same key as [keys.a]" in warnings[0]


def test_the_store_loads_a_toml_file_and_fails_closed_on_bad_toml(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(FILE)
    store = KeyStore(priorities={"interactive": 1})
    assert store.load(str(path)) == [] and sorted(store.by_id) == ["ops", "team-a"]
    path.write_text(FILE + "\n[keys.broken\n")
    warnings = store.load(str(path))
    assert len(store) == 0 and "not valid TOML" in store.error and warnings == [store.error]


def lines_file(tmp_path, text: str):
    path = tmp_path / "api_keys.txt"
    path.write_text(text)
    return read_key_file(str(path))


def test_line_keys_may_do_everything(tmp_path):
    lines, _ = lines_file(tmp_path, "a:" + SECRET + ":60\n")
    assert lines[0].key.roles is EVERY_ROLE and lines[0].key.models == () and not lines[0].key.has_policy


def test_lines_convert_to_toml_and_back_unchanged(tmp_path):
    text = f"# a comment\nalice:{SECRET}\nbob:{OTHER}:60:2027-01-01T00:00:00Z\n"
    lines, _ = lines_file(tmp_path, text)
    toml = keysfile.lines_to_toml(lines)
    entries, warnings = keysfile.parse_toml_keys(toml, "converted.toml")
    assert warnings == [] and [e.key for e in entries] == [line.key for line in lines if line.key]
    assert keysfile.toml_to_lines(entries) == [f"alice:{SECRET}", f"bob:{OTHER}:60:2027-01-01T00:00:00Z"]


def test_toml_with_policy_does_not_convert_to_lines():
    entries, _ = keysfile.parse_toml_keys(FILE, "k.toml")
    with pytest.raises(ValueError, match="key team-a has a policy"):
        keysfile.toml_to_lines(entries)
    with pytest.raises(ValueError, match="key_sha256 only"):
        keysfile.toml_to_lines([keysfile.KeyEntry(ApiKey("ops", entries[1].key.digest))])


def test_a_written_table_reads_back_as_the_same_key():
    entries, _ = keysfile.parse_toml_keys(FILE, "k.toml")
    for entry in entries:
        again, warnings = keysfile.parse_toml_keys(keysfile.toml_table(entry), "k.toml")
        assert warnings == [] and again[0].key == entry.key
    hashed, _ = keysfile.parse_toml_keys(keysfile.toml_table(entries[0], hash_only=True), "k.toml")
    assert hashed[0].key == entries[0].key and hashed[0].secret == ""


def test_edits_keep_the_rest_of_the_file():
    table = keysfile.toml_table(keysfile.new_entry("new", "n" * 20, models=["qwen"], max_concurrent=1))
    added = keysfile.append_table(FILE, table)
    assert added.startswith(FILE.rstrip("\n")) and "# the operators" in added
    removed = keysfile.remove_table(added, "team-a")
    assert removed is not None and "team-a" not in removed and "# keys for the shared host" in removed
    assert "# the operators" in removed and sorted(tomllib.loads(removed)["keys"]) == ["new", "ops"]
    rotated = keysfile.replace_secret(FILE, "team-a", "r" * 20, hash_only=False)
    assert rotated is not None
    table_a = tomllib.loads(rotated)["keys"]["team-a"]
    assert table_a["key"] == "r" * 20 and table_a["max_concurrent"] == 2 and "key_sha256" not in table_a
    assert keysfile.remove_table(FILE, "nobody") is None
