"""``llamad keys`` edits of a TOML keys file laid out by hand: comments, blank lines, keys in an
unusual order, inline tables and tables out of order all stay as they were, only the lines of the
key being changed change, and what llamad reads back is what was written."""

from __future__ import annotations

import copy
import difflib
import hashlib
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fakes import clean_config_env
from hypothesis import given, settings
from hypothesis import strategies as st

from llamad import cli
from llamad.keys import apikey, auth, keysfile

OPS = "ops-key-0123456789abcdef"
OPS_SHA256 = hashlib.sha256(OPS.encode()).hexdigest()
TEAM_A = "team-a-key-0123456789"
INLINE = "inline-key-0123456789"

# The lines of [keys."team-a"], its header included (what revoking it removes).
TEAM_A_TABLE = f'''[keys."team-a"]
rate = 120                       # per minute
key = "{TEAM_A}"    # rotated every quarter
models = [
    "qwen-*",   # the small ones
    "llama",
]
expires = 2027-01-01T00:00:00Z
'''

FILE = f'''# llamad keys for the lab
#   (llamad keys edits this file; these lines stay)

[keys]
# keys written inline stay inline
inline = {{ key = "{INLINE}", role = "admin" }}   # the robot

# team A: the chat front end
{TEAM_A_TABLE}

# not a key: llamad warns and skips it
[notes]
owner = {{ name = "ops", mail = "ops@example.com" }}

  # indented comment above an indented header
  [keys.ops]
  role = ["admin", "inference"]
  key_sha256 = "{OPS_SHA256}"

# end of the keys
'''


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    clean_config_env(tmp_path, monkeypatch)
    return tmp_path


@pytest.fixture
def path(tmp_path: Path) -> Path:
    keys = tmp_path / "keys.toml"
    keys.write_text(FILE)
    return keys


def keys(path: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["keys", "-f", str(path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def changes(before: str, after: str) -> list[tuple[str, list[str], list[str]]]:
    """Each run of lines that differ: (what difflib calls it, the old lines, the new lines)."""
    old, new = before.splitlines(), after.splitlines()
    return [(tag, old[i1:i2], new[j1:j2])
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
            if tag != "equal"]


def comments(text: str) -> list[str]:
    """Every comment of the file, on a line of its own or after a value, in order."""
    return [line[line.index("#"):] for line in text.splitlines() if "#" in line and '"#' not in line]


def ids(path: Path) -> list[str]:
    entries, _ = keysfile.read_toml_keys(str(path))
    return [entry.key.key_id for entry in entries]


def test_the_file_reads_as_its_three_keys_and_a_warning() -> None:
    entries, warnings = keysfile.parse_toml_keys(FILE, "keys.toml")
    assert [e.key.key_id for e in entries] == ["inline", "team-a", "ops"]
    assert warnings == ["keys.toml: ignored: 'notes' (each key is a [keys.<id>] table)"]


def test_generate_only_adds_the_new_table_and_it_reads_back(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = keys(path, "generate", "new", "--models", "qwen-*", "--max-concurrent", "3",
                        "--expires", "2030-06-01T00:00:00Z", capsys=capsys)
    assert code == 0
    secret = out.strip()
    text = path.read_text()
    [(tag, removed, added)] = changes(FILE, text)
    assert tag == "insert" and removed == []
    entries, _ = keysfile.read_toml_keys(str(path))
    new = entries[-1]
    assert added == [""] + keysfile.toml_table(new).splitlines()
    assert (new.key.key_id, new.secret, new.key.models, new.key.max_concurrent) == ("new", secret, ("qwen-*",), 3)
    assert new.key.expires == datetime(2030, 6, 1, tzinfo=timezone.utc)
    expected = tomllib.loads(FILE)
    expected["keys"]["new"] = {"key": secret, "models": ["qwen-*"], "role": "inference", "max_concurrent": 3,
                               "expires": datetime(2030, 6, 1, tzinfo=timezone.utc)}
    assert tomllib.loads(text) == expected
    store = auth.KeyStore()
    assert store.load(str(path)) == [f"{path}: ignored: 'notes' (each key is a [keys.<id>] table)"]
    found = store.check(secret, 0.0, datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert isinstance(found, apikey.ApiKey) and found.key_id == "new"


def test_rotate_changes_the_secret_and_expiry_lines_only(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = keys(path, "rotate", "team-a", "--expires", "2030-01-01T00:00:00Z", capsys=capsys)
    assert code == 0
    secret = out.strip()
    text = path.read_text()
    assert changes(FILE, text) == [
        ("replace", [f'key = "{TEAM_A}"    # rotated every quarter'], [f'key = "{secret}"    # rotated every quarter']),
        ("replace", ["expires = 2027-01-01T00:00:00Z"], ["expires = 2030-01-01T00:00:00Z"]),
    ]
    entries, _ = keysfile.read_toml_keys(str(path))
    team_a = next(e for e in entries if e.key.key_id == "team-a")
    assert team_a.secret == secret and team_a.key.rate_limit == 120 and team_a.key.models == ("qwen-*", "llama")
    assert team_a.key.expires == datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_rotating_a_hashed_key_changes_its_hash_line_only(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = keys(path, "rotate", "ops", capsys=capsys)
    assert code == 0
    digest = hashlib.sha256(out.strip().encode()).hexdigest()
    assert changes(FILE, path.read_text()) == [
        ("replace", [f'  key_sha256 = "{OPS_SHA256}"'], [f'  key_sha256 = "{digest}"'])]
    entries, _ = keysfile.read_toml_keys(str(path))
    assert entries[-1].key.digest.hex() == digest and entries[-1].key.roles == {"admin", "inference"}


def test_an_expiry_a_table_lacked_goes_after_its_last_value(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = keys(path, "rotate", "ops", "--expires", "2031-01-01T00:00:00Z", capsys=capsys)
    assert code == 0
    [(tag, removed, added)] = changes(FILE, path.read_text())
    assert tag == "replace" and removed == [f'  key_sha256 = "{OPS_SHA256}"']
    assert added[1:] == ["  expires = 2031-01-01T00:00:00Z"]  # indented as the table is
    assert path.read_text().endswith('"\n  expires = 2031-01-01T00:00:00Z\n\n# end of the keys\n')


def test_revoke_removes_the_table_and_keeps_every_other_line(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = keys(path, "revoke", "team-a", capsys=capsys)
    assert code == 0
    text = path.read_text()
    [(tag, removed, added)] = changes(FILE, text)
    assert tag == "delete" and removed == TEAM_A_TABLE.splitlines() and added == []
    expected = tomllib.loads(FILE)
    del expected["keys"]["team-a"]
    assert tomllib.loads(text) == expected and ids(path) == ["inline", "ops"]


def test_revoking_a_table_keeps_the_comments_around_it_and_one_blank_line() -> None:
    """Only the table goes: the comments above it stay (llamad cannot tell a note about the key from
    one about the file), and so do those above the next table and at the end."""
    text = ('# head\n\n[keys.a]\nkey = "' + "a" * 20 + '"\n\n# about b\n[keys.b]\nkey = "' + "b" * 20 + '"\n\n'
            '[keys.c]\nkey = "' + "c" * 20 + '"\n\n# the end\n')
    assert keysfile.remove_table(text, "a") == ('# head\n\n# about b\n[keys.b]\nkey = "' + "b" * 20 + '"\n\n'
                                                '[keys.c]\nkey = "' + "c" * 20 + '"\n\n# the end\n')
    assert keysfile.remove_table(text, "b") == ('# head\n\n[keys.a]\nkey = "' + "a" * 20 + '"\n\n# about b\n\n'
                                                '[keys.c]\nkey = "' + "c" * 20 + '"\n\n# the end\n')
    assert keysfile.remove_table(text, "c") == ('# head\n\n[keys.a]\nkey = "' + "a" * 20 + '"\n\n# about b\n'
                                                '[keys.b]\nkey = "' + "b" * 20 + '"\n\n# the end\n')
    first = '[keys.a]\nkey = "' + "a" * 20 + '"\n\n[keys.b]\nkey = "' + "b" * 20 + '"\n'
    assert keysfile.remove_table(first, "a") == '[keys.b]\nkey = "' + "b" * 20 + '"\n'  # no blank first line
    assert keysfile.remove_table(first, "b") == '[keys.a]\nkey = "' + "a" * 20 + '"\n'  # no blank last line


def test_a_new_key_goes_after_the_last_key_table_not_under_the_next_tables_comment() -> None:
    text = '[keys.a]\nkey = "' + "a" * 20 + '"\n\n# about notes\n[notes]\nx = 1\n'
    table = keysfile.toml_table(keysfile.new_entry("b", "b" * 20))
    assert keysfile.append_table(text, table) == ('[keys.a]\nkey = "' + "a" * 20 + '"\n\n' + table
                                                  + '\n# about notes\n[notes]\nx = 1\n')


def test_a_key_in_an_inline_table_is_left_alone(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("revoke", "rotate"):
        code, _, err = keys(path, action, "inline", capsys=capsys)
        assert code == 1 and "not as its own [keys.inline] table" in err and "edit it by hand" in err
        assert path.read_text() == FILE


def test_a_file_of_inline_keys_only_gets_no_table_it_could_not_hold(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.toml"
    inline = f'# inline\nkeys = {{ robot = {{ key = "{INLINE}" }} }}\n'
    path.write_text(inline)
    code, out, err = keys(path, "generate", "new", capsys=capsys)
    assert code == 1 and out == "" and "without [keys.<id>] headers" in err and "edit it by hand" in err
    assert path.read_text() == inline


def test_edits_in_a_row_keep_every_comment_and_read_back_as_expected(path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    expected = tomllib.loads(FILE)
    code, out, _ = keys(path, "generate", "ci", "--role", "admin", "--hash-only", capsys=capsys)
    expected["keys"]["ci"] = {"key_sha256": hashlib.sha256(out.strip().encode()).hexdigest(), "role": "admin"}
    code, out, _ = keys(path, "rotate", "team-a", capsys=capsys)
    expected["keys"]["team-a"]["key"] = out.strip()
    code, out, _ = keys(path, "revoke", "ops", capsys=capsys)
    del expected["keys"]["ops"]
    code, out, _ = keys(path, "rotate", "ci", "--expires", "2029-01-01T00:00:00Z", capsys=capsys)
    expected["keys"]["ci"] = {"key_sha256": hashlib.sha256(out.strip().encode()).hexdigest(), "role": "admin",
                              "expires": datetime(2029, 1, 1, tzinfo=timezone.utc)}
    text = path.read_text()
    assert code == 0 and tomllib.loads(text) == expected
    assert comments(text) == comments(FILE)  # [keys.ops] had none of its own
    assert ids(path) == ["inline", "team-a", "ci"]


# --- any layout ---------------------------------------------------------------------------------------

KEY_IDS = ["a", "b", "c", "team-x"]
Layout = tuple[str, dict[str, list[str]]]


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    """A keys file laid out by hand, and for each key the lines of its table: its header, its values and
    the comment lines among them (what revoking it takes away).  Every comment is unique."""
    counter = iter(range(10_000))
    lines: list[str] = []
    tables: dict[str, list[str]] = {}

    def filler(own: list[str] | None = None) -> None:
        for kind in draw(st.lists(st.sampled_from(["", "  ", "comment"]), max_size=3)):
            line = f"# c{next(counter)}" if kind == "comment" else kind
            lines.append(line)
            if own is not None and line.strip():
                own.append(line)

    def notes() -> None:
        lines.extend(["[notes]", "owner = { name = 'ops' }  # an inline table, not a key"])
        filler()

    filler()
    if draw(st.booleans()):
        lines.extend(["[keys]", f'robot = {{ key = "{"r" * 20}", role = "admin" }}  # inline'])
        filler()
    ids = draw(st.lists(st.sampled_from(KEY_IDS), min_size=1, unique=True))
    notes_at = draw(st.integers(0, len(ids)))
    for i, key_id in enumerate(ids):
        if i == notes_at:
            notes()
        indent = draw(st.sampled_from(["", "  "]))
        header = f"{indent}[keys.{draw(st.sampled_from([key_id, chr(34) + key_id + chr(34)]))}]"
        header += draw(st.sampled_from(["", f"  # c{next(counter)}"]))
        own = [header]
        lines.append(header)
        values = draw(st.permutations([f'key = "{key_id[0] * 20}"', "rate = 60", 'models = ["m", "n"]',
                                       "expires = 2027-01-01T00:00:00Z"]))[:draw(st.integers(1, 4))]
        if not any(v.startswith("key =") for v in values):
            values.append(f'key = "{key_id[0] * 20}"')
        for j, value in enumerate(values):
            line = indent + value + draw(st.sampled_from(["", f"  # c{next(counter)}", f"   # c{next(counter)}"]))
            lines.append(line)
            own.append(line)
            if j < len(values) - 1:
                filler(own)
        tables[key_id] = own
        filler()
    if notes_at == len(ids):
        notes()
    return "\n".join(lines) + "\n", tables


def solid(text: str) -> list[str]:
    """The lines that are not blank."""
    return [line for line in text.splitlines() if line.strip()]


@settings(max_examples=200, deadline=None)
@given(layouts(), st.sampled_from(["generate", "revoke", "rotate", "rotate+expires"]), st.sampled_from(KEY_IDS))
def test_any_layout_keeps_its_lines_and_reads_back_as_edited(layout: Layout, action: str, key_id: str) -> None:
    text, tables = layout
    before = tomllib.loads(text)
    expected: dict[str, Any] = copy.deepcopy(before)
    secret = "s" * 20
    if action == "generate":
        key_id = key_id if key_id not in before["keys"] else "new"
        table = keysfile.toml_table(keysfile.new_entry(key_id, secret, models=["m"], rate=5))
        edited: str | None = keysfile.append_table(text, table)
        expected["keys"][key_id] = {"key": secret, "models": ["m"], "role": "inference", "rate": 5}
        assert edited is not None and without(solid(edited), solid(table)) == solid(text)
    elif key_id not in tables:
        assert keysfile.remove_table(text, key_id) is None
        assert keysfile.replace_secret(text, key_id, secret, False) is None
        return
    elif action == "revoke":
        edited = keysfile.remove_table(text, key_id)
        del expected["keys"][key_id]
        assert edited is not None and solid(edited) == without(solid(text), tables[key_id])
    else:
        expires = "2031-02-03T04:05:06Z" if action == "rotate+expires" else None
        edited = keysfile.replace_secret(text, key_id, secret, False, expires)
        expected["keys"][key_id]["key"] = secret
        if expires:
            expected["keys"][key_id]["expires"] = datetime(2031, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
        assert edited is not None
        old_key = next(line for line in tables[key_id] if line.lstrip().startswith("key ="))
        new_key = old_key.replace(key_id[0] * 20, secret)
        assert old_key not in solid(edited) and new_key in solid(edited)  # in place, its comment kept
        unchanged = [line for line in solid(text) if line != old_key and not (expires and "expires =" in line)]
        assert [line for line in solid(edited) if line != new_key and not (expires and "expires =" in line)] \
            == unchanged
    if not expected["keys"]:
        del expected["keys"]
    assert tomllib.loads(edited) == expected
    entries, _ = keysfile.parse_toml_keys(edited, "keys.toml")
    assert sorted(e.key.key_id for e in entries) == sorted(expected.get("keys", {}))


def without(lines: list[str], block: list[str]) -> list[str]:
    """``lines`` less ``block``, which they hold as a run from its first line (a unique header) on."""
    start = lines.index(block[0])
    assert lines[start:start + len(block)] == block
    return lines[:start] + lines[start + len(block):]


def test_a_file_too_deep_to_edit_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tomllib reads it (the key is valid); tomlkit bounds nesting (0.14 on) or copes: the edit is
    refused in one line with the file left as it was, or made."""
    path = tmp_path / "keys.toml"
    deep = "nested = " + "[" * 300 + "]" * 300 + f'\n\n[keys.a]\nkey = "{"a" * 20}"\n'
    path.write_text(deep)
    code, out, err = keys(path, "generate", "b", capsys=capsys)
    assert "Traceback" not in err
    if code == 0:
        assert ids(path) == ["a", "b"] and path.read_text().startswith(deep)
    else:
        assert code == 1 and out == "" and path.read_text() == deep
        assert err.splitlines()[-1].startswith("llamad keys: the keys file cannot be edited (")


def test_a_stack_overflow_in_tomlkit_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def overflow(text: str) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(keysfile.tomlkit, "parse", overflow)
    with pytest.raises(ValueError, match=r"^the keys file cannot be edited \(a value is nested too deeply\)"):
        keysfile.remove_table(FILE, "ops")
