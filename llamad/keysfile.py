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
Edits (``llamad keys``) change the text of one table and keep the rest of the
file, comments included.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any, Mapping

from llamad.auth import API_KEY, KEY_ID, ROLES, ApiKey, KeyLine, _digest, parse_expiry
from llamad.config import decode_utf8, loads_toml

FIELDS = ("key", "key_sha256", "models", "role", "rate", "tokens_per_minute", "tokens_per_day", "max_concurrent",
          "priority", "expires")
_COUNTS = {"rate": "rate_limit", "tokens_per_minute": "tokens_per_minute", "tokens_per_day": "tokens_per_day",
           "max_concurrent": "max_concurrent"}
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEADER = re.compile(r'^\s*\[\s*keys\s*\.\s*"?([A-Za-z0-9_-]+)"?\s*\]\s*(?:#.*)?$')
_ANY_HEADER = re.compile(r"^\s*\[")
_SECRET_LINE = re.compile(r"^\s*(key|key_sha256)\s*=")
_SECRET_OR_EXPIRY_LINE = re.compile(r"^\s*(key|key_sha256|expires)\s*=")


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
        digest = _digest(secret)
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


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def toml_table(entry: KeyEntry, hash_only: bool = False) -> str:
    """The ``[keys.<id>]`` table of one key (``hash_only``: its SHA-256 instead of the key)."""
    key = entry.key
    lines = [f"[keys.{key.key_id}]"]
    if entry.secret and not hash_only:
        lines.append(f"key = {_string(entry.secret)}")
    else:
        lines.append(f"key_sha256 = {_string(key.digest.hex())}")
    if key.models:
        lines.append(f"models = [{', '.join(_string(m) for m in key.models)}]")
    roles = [r for r in ROLES if r in key.roles]
    lines.append(f"role = {_string(roles[0])}" if len(roles) == 1
                 else f"role = [{', '.join(_string(r) for r in roles)}]")
    for name, attribute in _COUNTS.items():
        value = getattr(key, attribute)
        if value is not None:
            lines.append(f"{name} = {value}")
    if key.priority:
        lines.append(f"priority = {_string(key.priority)}")
    if key.expires is not None:
        lines.append(f"expires = {key.expires.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    return "\n".join(lines) + "\n"


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


# --- editing the text ---------------------------------------------------------------------------


def _block(lines: list[str], key_id: str) -> tuple[int, int] | None:
    """The first and past-the-last line of ``[keys.<id>]``'s table."""
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m and m.group(1) == key_id:
            end = i + 1
            while end < len(lines) and not _ANY_HEADER.match(lines[end]):
                end += 1
            while end > i + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
                end -= 1  # blank lines and the comment above the next table stay with it
            return i, end
    return None


def append_table(text: str, table: str) -> str:
    head = text.rstrip("\n")
    return (head + "\n\n" if head else "") + table


def remove_table(text: str, key_id: str) -> str | None:
    """``text`` without the table of ``key_id`` (None: no such table)."""
    lines = text.split("\n")
    found = _block(lines, key_id)
    if found is None:
        return None
    start, end = found
    while end < len(lines) and not lines[end].strip() and start > 0 and not lines[start - 1].strip():
        end += 1  # one blank line between the neighbours, not two
    return "\n".join(lines[:start] + lines[end:])


def replace_secret(text: str, key_id: str, secret: str, hash_only: bool, expires: str | None = None) -> str | None:
    """``text`` with the table of ``key_id`` holding a new secret (or its hash), and a new expiry if
    ``expires`` (ISO 8601) is given; its policy and comments kept."""
    lines = text.split("\n")
    found = _block(lines, key_id)
    if found is None:
        return None
    start, end = found
    new = [f"key_sha256 = {_string(_digest(secret).hex())}" if hash_only else f"key = {_string(secret)}"]
    dropped = _SECRET_LINE if expires is None else _SECRET_OR_EXPIRY_LINE
    if expires is not None:
        new.append(f"expires = {_expiry(expires).strftime('%Y-%m-%dT%H:%M:%SZ')}")
    body = [line for line in lines[start + 1:end] if not dropped.match(line)]
    return "\n".join(lines[:start + 1] + new + body + lines[end:])


def check_text(text: str) -> None:
    """Refuse to write what would not read back as TOML."""
    try:
        loads_toml(text)
    except ValueError as e:
        raise ValueError(f"the edit would leave the keys file invalid TOML ({e}); it was not written") from None
