"""An API key and llama-gguf-inference's keys file format, one key per line (``#`` starts a comment)::

    key_id:api_key[:rate_limit_per_min][:expiry_iso]

``key_id`` is ``[A-Za-z0-9_-]+``; ``api_key`` is 16-128 characters of the same
set.  Invalid lines (one that is not UTF-8 included) are skipped with a warning
naming the line number.  Such a key may use every model and every route.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase

KEY_ID = re.compile(r"^[A-Za-z0-9_-]+$")
API_KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


ROLES = ("inference", "admin")
EVERY_ROLE = frozenset(ROLES)


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    digest: bytes
    rate_limit: int | None = None  # requests per minute
    expires: datetime | None = None  # aware, UTC
    models: tuple[str, ...] = ()  # ids or globs; empty: every model
    roles: frozenset[str] = EVERY_ROLE
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None
    priority: str = ""  # a class of [auth.priorities]; empty: level 0
    _scope: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)  # model id -> may use

    def may_use(self, model_id: str) -> bool:
        allowed = self._scope.get(model_id)
        if allowed is None:  # once per model id: ids come from the config, never from a request
            allowed = self._scope[model_id] = not self.models or any(fnmatchcase(model_id, p) for p in self.models)
        return allowed

    @property
    def has_policy(self) -> bool:
        """Whether it says more than the line format can hold."""
        return bool(self.models or self.roles != EVERY_ROLE or self.tokens_per_minute is not None
                    or self.tokens_per_day is not None or self.max_concurrent is not None or self.priority)


@dataclass(frozen=True)
class KeyLine:
    """One parsed line, kept with its text so that edits preserve the file."""

    text: str
    key: ApiKey | None
    secret: str = ""


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_expiry(text: str) -> datetime:
    """ISO 8601; a naive time is taken as UTC."""
    value = datetime.fromisoformat(text.strip())
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def parse_line(line: str) -> tuple[ApiKey, str] | None:
    """Parse one line; None for blank or comment lines.  Raises ValueError naming the problem."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split(":", 2)
    if len(parts) < 2:
        raise ValueError("expected key_id:api_key[:rate_limit_per_min][:expiry_iso]")
    key_id, secret = parts[0].strip(), parts[1].strip()
    if not KEY_ID.match(key_id):
        raise ValueError(f"bad key_id {key_id!r} (letters, digits, '_' and '-')")
    if not API_KEY.match(secret):
        raise ValueError("bad api_key (16-128 letters, digits, '_' and '-')")
    rate: int | None = None
    expires: datetime | None = None
    if len(parts) == 3 and parts[2].strip():
        rest = parts[2].strip()
        m = re.match(r"^(\d*)(?::(.*))?$", rest)
        if m:
            rate = int(m.group(1)) if m.group(1) else None
            expiry_text = m.group(2)
        else:
            expiry_text = rest  # an expiry with no rate limit
        if expiry_text:
            try:
                expires = parse_expiry(expiry_text)
            except ValueError:
                raise ValueError(f"bad expiry {expiry_text!r} (ISO 8601, e.g. 2026-12-31T23:59:59Z)") from None
        if rate == 0:
            raise ValueError("rate limit must be > 0 (leave it out for no limit)")
    return ApiKey(key_id, digest_of(secret), rate, expires), secret


def read_key_file(path: str) -> tuple[list[KeyLine], list[str]]:
    """All lines of a keys file, and one warning per invalid line.

    Read as bytes and decoded line by line: one stray non-UTF-8 byte skips
    that line only, so the rest of the file (and a revocation in it) applies.
    Raises OSError when the file cannot be read at all.
    """
    lines: list[KeyLine] = []
    warnings: list[str] = []
    with open(path, "rb") as f:
        data = f.read()
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            warnings.append(f"{path}:{number}: skipped: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})")
            # Surrogate-escaped, so that a rewrite by `llamad keys` keeps the line byte for byte.
            lines.append(KeyLine(raw.decode("utf-8", "surrogateescape"), None))
            continue
        try:
            parsed = parse_line(text)
        except ValueError as e:
            warnings.append(f"{path}:{number}: skipped: {e}")
            parsed = None
        lines.append(KeyLine(text, parsed[0] if parsed else None, parsed[1] if parsed else ""))
    return lines, warnings


def write_key_file(path: str, lines: list[str]) -> None:
    """Replace the keys file atomically, mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".api_keys.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def new_secret() -> str:
    """A new API key: 256 random bits, URL-safe, never starting with '-' (one in 64 would, and
    ``llamad keys reload --key KEY`` would take it for an option)."""
    while True:
        secret = secrets.token_urlsafe(32)
        if not secret.startswith("-"):
            return secret
