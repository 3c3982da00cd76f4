"""The TOML keys file: one table per key, with the policy the line format cannot hold.

::

    [keys.team-a]
    key_sha256 = "9f86d081884c7d65..."   # or key = "<the secret>"
    models = ["qwen-*", "llama-3-8b"]    # ids or globs; left out: every model
    role = "inference"                   # "admin", or ["inference", "admin"]
    rate = 120                           # requests per minute
    tokens_per_minute = 20000            # prompt + completion, from each response's usage
    tokens_per_day = 2000000
    max_concurrent = 4                   # more wait in the queue, then 429
    priority = "interactive"             # a class of [auth.priorities] in llamad's config
    expires = 2027-01-01T00:00:00Z

A table with a problem is skipped with a warning that names it, as a bad line
is in the line format; a file that is not TOML at all holds no valid key.
Edits (``llamad keys``) go through tomlkit, which renders what it parsed byte
for byte: they change one ``[keys.<id>]`` table and keep the rest of the file,
comments, blank lines and order included.  Reading stays with tomllib.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any, Iterator, Mapping

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Comment, Item, Key, Table, Whitespace

from llamad.keys.apikey import API_KEY, KEY_ID, ROLES, ApiKey, KeyLine, digest_of, parse_expiry
from llamad.config import decode_utf8, loads_toml

FIELDS = ("key", "key_sha256", "models", "role", "rate", "tokens_per_minute", "tokens_per_day", "max_concurrent",
          "priority", "expires")
_COUNTS = {"rate": "rate_limit", "tokens_per_minute": "tokens_per_minute", "tokens_per_day": "tokens_per_day",
           "max_concurrent": "max_concurrent"}
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class KeyEntry:
    key: ApiKey
    secret: str = ""  # empty when the file holds only the key's SHA-256


def parse_toml_keys(text: str, path: str, priorities: Mapping[str, int] | None = None
                    ) -> tuple[list[KeyEntry], list[str]]:
    """The valid keys and one warning per skipped table.  ``priorities``: the classes a key may name
    (None: any).  Raises ValueError when the text is not TOML."""
    try:
        doc = loads_toml(text)
    except ValueError as e:
        raise ValueError(f"not valid TOML: {e}") from None
    warnings = [f"{path}: ignored: {name!r} (each key is a [keys.<id>] table)" for name in doc if name != "keys"]
    tables = doc.get("keys", {})
    if not isinstance(tables, dict):
        raise ValueError("'keys' must be a table of [keys.<id>] tables")
    entries: list[KeyEntry] = []
    seen: dict[bytes, str] = {}
    for key_id, table in tables.items():
        try:
            entry = _entry(key_id, table, priorities)
        except ValueError as e:
            warnings.append(f"{path}: [keys.{_table_key(key_id)}] skipped: {e}")
            continue
        if entry.key.digest in seen:
            warnings.append(f"{path}: [keys.{key_id}] skipped: the same key as [keys.{seen[entry.key.digest]}]")
            continue
        seen[entry.key.digest] = key_id
        entries.append(entry)
    return entries, warnings


def _table_key(key_id: str) -> str:
    """``key_id`` as a table name in TOML: bare when it is a valid id, else a quoted string with every
    control character escaped (a warning then shows what the file holds, not raw bytes)."""
    return key_id if KEY_ID.match(key_id) else json.dumps(key_id).replace("\x7f", "\\u007f")


def read_toml_keys(path: str, priorities: Mapping[str, int] | None = None) -> tuple[list[KeyEntry], list[str]]:
    """Raises OSError when the file cannot be read, ValueError when it is not TOML."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_toml_keys(decode_utf8(data), path, priorities)


def _entry(key_id: str, table: Any, priorities: Mapping[str, int] | None) -> KeyEntry:
    if not KEY_ID.match(key_id):
        raise ValueError("a key id is letters, digits, '_' and '-'")
    if not isinstance(table, dict):
        raise ValueError("expected a table")
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    secret = table.get("key")
    hashed = table.get("key_sha256")
    if (secret is None) == (hashed is None):
        raise ValueError("give exactly one of key and key_sha256")
    if secret is not None:
        if not isinstance(secret, str) or not API_KEY.match(secret):
            raise ValueError("bad key (16-128 letters, digits, '_' and '-')")
        digest = digest_of(secret)
    else:
        if not isinstance(hashed, str) or not _SHA256.match(hashed):
            raise ValueError("bad key_sha256 (64 hex digits: sha256sum of the key)")
        digest = bytes.fromhex(hashed)
    fields: dict[str, Any] = {}
    for name, attribute in _COUNTS.items():
        value = table.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be an integer > 0 (leave it out for no limit)")
            fields[attribute] = value
    models = table.get("models", [])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError("models must be a list of model ids or globs")
    if "models" in table and not models:
        raise ValueError("models = [] allows no model (leave it out for every model)")
    role = table.get("role", "inference")
    roles = [role] if isinstance(role, str) else role
    if not isinstance(roles, list) or not roles or not all(r in ROLES for r in roles):
        raise ValueError(f"role must be one of {', '.join(ROLES)}, or a list of them")
    priority = table.get("priority", "")
    if not isinstance(priority, str):
        raise ValueError("priority must be the name of a class of [auth.priorities]")
    if priority and priorities is not None and priority not in priorities:
        known = ", ".join(sorted(priorities)) or "none"
        raise ValueError(f"priority {priority!r} is not a class of [auth.priorities] (classes: {known})")
    expires = table.get("expires")
    if expires is not None:
        expires = _expiry(expires)
    key = ApiKey(key_id, digest, expires=expires, models=tuple(models), roles=frozenset(roles), priority=priority,
                 **fields)
    return KeyEntry(key, secret or "")


def _expiry(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    if isinstance(value, date):
        return datetime.combine(value, time(), timezone.utc)
    if isinstance(value, str):
        try:
            return parse_expiry(value)
        except ValueError:
            pass
    raise ValueError(f"bad expires {value!r} (a TOML date-time or ISO 8601, e.g. 2026-12-31T23:59:59Z)")


# --- writing ------------------------------------------------------------------------------------


def _datetime(when: datetime) -> Item:
    """``when`` as a TOML date-time in UTC with a ``Z``, as people write it (tomlkit would write +00:00)."""
    return tomlkit.value(when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _table(entry: KeyEntry, hash_only: bool) -> Table:
    key = entry.key
    table = tomlkit.table()
    if entry.secret and not hash_only:
        table.add("key", entry.secret)
    else:
        table.add("key_sha256", key.digest.hex())
    if key.models:
        table.add("models", list(key.models))
    roles = [r for r in ROLES if r in key.roles]
    table.add("role", roles[0] if len(roles) == 1 else roles)
    for name, attribute in _COUNTS.items():
        value = getattr(key, attribute)
        if value is not None:
            table.add(name, value)
    if key.priority:
        table.add("priority", key.priority)
    if key.expires is not None:
        table.add("expires", _datetime(key.expires))
    return table


def toml_table(entry: KeyEntry, hash_only: bool = False) -> str:
    """The ``[keys.<id>]`` table of one key (``hash_only``: its SHA-256 instead of the key)."""
    doc = tomlkit.document()
    keys = tomlkit.table(is_super_table=True)
    keys.append(entry.key.key_id, _table(entry, hash_only))
    doc.append("keys", keys)
    return doc.as_string()


def key_line(entry: KeyEntry) -> str:
    """The line-format line of one key; ValueError when that format cannot hold it."""
    key = entry.key
    if key.has_policy:
        raise _unholdable(key.key_id, "has a policy (models, role, token quotas, max_concurrent or priority)")
    if not entry.secret:
        raise _unholdable(key.key_id, "is stored as key_sha256 only")
    fields = [key.key_id, entry.secret]
    if key.rate_limit or key.expires:
        fields.append(str(key.rate_limit or ""))
    if key.expires:
        fields.append(key.expires.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return ":".join(fields)


def _unholdable(key_id: str, why: str) -> ValueError:
    return ValueError(f"key {key_id} {why}, which the line format cannot hold")


def lines_to_toml(lines: list[KeyLine]) -> str:
    """A line-format file as a TOML keys file: each key keeps its rate and expiry, and may do
    everything (both roles, every model), as it did."""
    out = ["# llamad API keys: one [keys.<id>] table per key (see `llamad keys --help`)."]
    for line in lines:
        if line.key is not None:
            key = line.key
            out.append("")
            out.append(toml_table(KeyEntry(key, line.secret)).rstrip("\n"))
    return "\n".join(out) + "\n"


def toml_to_lines(entries: list[KeyEntry]) -> list[str]:
    """A TOML keys file as lines; ValueError naming the first key the line format cannot hold."""
    return [key_line(entry) for entry in entries]


def new_entry(key_id: str, secret: str, **policy: Any) -> KeyEntry:
    """A key for ``llamad keys generate``, checked as the file's tables are."""
    table: dict[str, Any] = {"key": secret, **{k: v for k, v in policy.items() if v not in (None, "", [], ())}}
    return _entry(key_id, table, None)


# --- editing ------------------------------------------------------------------------------------
#
# tomlkit keeps the blank lines and comments after a table's last value in that table's body, but
# a reader takes them as the head of what follows ("# the operators" above [keys.ops]).  So before
# a table is removed, gets a value at its end or a new table after it, those lines move to the
# front of the next header (its ``trivia.indent``, which tomlkit renders verbatim before the
# ``[``): the text stays byte for byte the same, and the edit then leaves them where they were.
# Every edit is then read back with tomllib and must hold exactly the change asked for.

_MARK = "\x00"  # cannot occur in TOML text: marks a place in a rendering
_Owner = Container | Table  # what holds a table: the document or a table


@dataclass(frozen=True)
class _Headed:
    """A table with its own ``[header]`` (or ``[[header]]``), where the document holds it."""
    path: tuple[str, ...]
    owner: _Owner
    key: Key
    table: Table


def _document(text: str) -> tomlkit.TOMLDocument:
    """``text`` as tomlkit's document; ValueError when tomlkit cannot parse it or would not
    render it back unchanged (an edit would then touch more than it should)."""
    try:
        doc = tomlkit.parse(text)
        same = doc.as_string() == text
    except RecursionError:
        raise ValueError("the keys file cannot be edited (a value is nested too deeply); it was not written") \
            from None
    except (TOMLKitError, ValueError) as e:
        raise ValueError(f"the keys file cannot be edited ({e}); it was not written") from None
    if not same:
        raise ValueError("the keys file cannot be edited without changing its layout; it was not written")
    return doc


def _headed(container: Container, owner: _Owner, path: tuple[str, ...]) -> Iterator[_Headed]:
    """Every table that renders a header, in the order of the text.  Super tables (``keys`` of
    ``[keys.a]``) and tables made by dotted keys (``a.b = 1``) render none and are only walked."""
    for key, item in container.body:
        if key is None:
            continue
        name = path + (key.key,)
        if isinstance(item, Table):
            if not item.is_super_table() and not key.is_dotted():
                yield _Headed(name, owner, key, item)
            yield from _headed(item.value, item, name)
        elif isinstance(item, AoT):
            for element in item.body:
                yield _Headed(name, item, key, element)
                yield from _headed(element.value, element, name)


def _key_tables(doc: tomlkit.TOMLDocument) -> list[_Headed]:
    return [h for h in _headed(doc, doc, ()) if len(h.path) == 2 and h.path[0] == "keys"
            and not isinstance(h.owner, AoT)]


def _find(doc: tomlkit.TOMLDocument, key_id: str) -> tuple[_Headed, _Headed | None] | None:
    """The ``[keys.<key_id>]`` table and the headed table after it (None: no such table; a key
    in an inline table or made of dotted keys has none)."""
    every = list(_headed(doc, doc, ()))
    for i, headed in enumerate(every):
        if headed.path == ("keys", key_id) and not isinstance(headed.owner, AoT):
            return headed, every[i + 1] if i + 1 < len(every) else None
    return None


def _trailing(table: Table) -> list[Item]:
    """Take the blank lines and comments after ``table``'s last value out of it."""
    body = table.value.body
    end = len(body)
    while end and body[end - 1][0] is None and isinstance(body[end - 1][1], (Whitespace, Comment)):
        end -= 1
    items = [item for _, item in body[end:]]
    del body[end:]  # items without a key: the container's index of keys does not change
    return items


def _hand_on(table: Table, following: _Headed | None) -> None:
    """Move the lines after ``table``'s last value to the front of the next header, if any."""
    if following is None:
        return
    moved = "".join(item.as_string() for item in _trailing(table))
    following.table.trivia.indent = moved + following.table.trivia.indent


def _text_before(doc: tomlkit.TOMLDocument, table: Table) -> str:
    """What the document renders before ``table``'s header."""
    indent = table.trivia.indent
    table.trivia.indent = _MARK + indent
    try:
        rendered = doc.as_string()
    finally:
        table.trivia.indent = indent
    return rendered[:rendered.index(_MARK)]


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """The data with an empty ``keys`` left out: a file without keys reads the same either way."""
    return {k: v for k, v in data.items() if not (k == "keys" and v == {})}


def _checked(text: str, new_text: str, key_id: str, table: dict[str, Any] | None) -> str:
    """``new_text`` if it reads as ``text`` with ``[keys.<key_id>]`` set to ``table`` (None: gone) and
    nothing else changed; else ValueError (a layout that tomlkit does not edit as expected)."""
    expected = copy.deepcopy(loads_toml(text))
    keys = expected.setdefault("keys", {})
    if table is None:
        keys.pop(key_id, None)
    else:
        keys[key_id] = table
    try:
        got = loads_toml(new_text)
    except ValueError as e:
        raise ValueError(f"the edit would leave the keys file invalid TOML ({e}); it was not written") from None
    if _plain(got) != _plain(expected):
        raise ValueError(f"editing [keys.{key_id}] would change more of the keys file than that table; "
                         "it was not written: edit it by hand")
    return new_text


def append_table(text: str, table: str) -> str:
    """``text`` with the ``[keys.<id>]`` table of ``table`` (from :func:`toml_table`) after its last key
    table, or at its end.  ValueError when ``text`` holds its keys in a form without headers
    (``keys = {...}``), where a ``[keys.<id>]`` table cannot go."""
    doc = _document(text)
    new = _key_tables(_document(table))
    if len(new) != 1:
        raise ValueError("expected one [keys.<id>] table")
    key_id, item = new[0].path[1], new[0].table
    keys = doc.get("keys")
    if key_id in (loads_toml(text).get("keys") or {}):
        raise ValueError(f"the keys file already holds a key {key_id} (one llamad skips: see its warning); "
                         "edit it by hand")
    present = _key_tables(doc)
    found = _find(doc, present[-1].path[1]) if present else None
    if found is not None:
        last, following = found
        _hand_on(last.table, following)
        owner: _Owner = last.owner
    elif keys is None:
        owner = tomlkit.table(is_super_table=True)
        doc.append("keys", owner)
    elif isinstance(keys, Table) and not keys.is_super_table():
        owner = keys  # [keys] with inline tables or dotted keys only
    else:
        raise ValueError(f"the keys file holds its keys without [keys.<id>] headers (keys = {{...}}?), "
                         f"so [keys.{key_id}] cannot be added to it: edit it by hand")
    try:
        owner.append(key_id, item)
    except TOMLKitError as e:
        raise ValueError(f"[keys.{key_id}] cannot be added to the keys file ({e}): edit it by hand") from None
    before = _text_before(doc, item)
    item.trivia.indent = "" if not before or before.endswith("\n\n") else "\n" if before.endswith("\n") else "\n\n"
    return _checked(text, doc.as_string(), key_id, loads_toml(table)["keys"][key_id])


def remove_table(text: str, key_id: str) -> str | None:
    """``text`` without the table of ``key_id`` (None: no such table).  The comments above the
    next table stay, with one blank line between the neighbours, not two."""
    doc = _document(text)
    found = _find(doc, key_id)
    if found is None:
        return None
    headed, following = found
    before = _text_before(doc, headed.table)
    kept = _trailing(headed.table)
    if not before or before.endswith("\n\n"):
        while kept and isinstance(kept[0], Whitespace) and not kept[0].as_string().strip(" \t\n"):
            kept.pop(0)
    headed.owner.remove(headed.key)
    if following is not None:
        following.table.trivia.indent = "".join(item.as_string() for item in kept) + following.table.trivia.indent
    elif any(isinstance(item, Comment) for item in kept):  # the last table: its closing comments stay at the end
        end = _last_table(doc)
        for item in kept:
            if isinstance(end, Table):
                end.raw_append(None, item)
            else:
                end.append(None, item)
    new_text = doc.as_string()
    if following is None:  # the blank line that kept the removed table apart ends nothing now
        new_text = new_text.rstrip("\n") + "\n" if new_text.strip() else ""
    return _checked(text, new_text, key_id, None)


def _last_table(doc: tomlkit.TOMLDocument) -> _Owner:
    """The table that now renders last (the document itself when none does)."""
    every = list(_headed(doc, doc, ()))
    return every[-1].table if every else doc


def replace_secret(text: str, key_id: str, secret: str, hash_only: bool, expires: str | None = None) -> str | None:
    """``text`` with the table of ``key_id`` holding a new secret (or its hash), and a new expiry if
    ``expires`` (ISO 8601) is given; its policy, comments and order kept (a value replaced in
    place keeps its comment; a new one goes after the table's last value)."""
    doc = _document(text)
    found = _find(doc, key_id)
    if found is None:
        return None
    headed, following = found
    table = headed.table
    field, other = ("key_sha256", "key") if hash_only else ("key", "key_sha256")
    value = digest_of(secret).hex() if hash_only else secret
    values: dict[str, Any] = {field: value}
    expected = dict(loads_toml(text)["keys"][key_id])
    expected.pop(other, None)
    expected[field] = value
    if expires is not None:
        values["expires"] = _datetime(_expiry(expires))
        expected["expires"] = _expiry(expires)
    kept: list[Item] = []
    if any(name not in table for name in values):
        if following is not None:
            _hand_on(table, following)
        else:
            kept = _trailing(table)  # put back after the new value
    if other in table:
        table.remove(other)
    for name, item in values.items():
        if name in table:
            table[name] = item  # in place: its comment stays
        else:
            table.append(name, item)
    for item in kept:
        table.raw_append(None, item)
    return _checked(text, doc.as_string(), key_id, expected)


def check_text(text: str) -> None:
    """Refuse to write what would not read back as TOML."""
    try:
        loads_toml(text)
    except ValueError as e:
        raise ValueError(f"the edit would leave the keys file invalid TOML ({e}); it was not written") from None
