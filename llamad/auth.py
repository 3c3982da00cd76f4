"""API keys: the keys files, constant-time checks, per-key rate limits.

llama-gguf-inference's format, one key per line (``#`` starts a comment)::

    key_id:api_key[:rate_limit_per_min][:expiry_iso]

``key_id`` is ``[A-Za-z0-9_-]+``; ``api_key`` is 16-128 characters of the same
set.  Invalid lines (one that is not UTF-8 included) are skipped with a warning
naming the line number.  Such a key may use every model and every route.

A keys file whose name ends in ``.toml`` holds one table per key, with its
policy (:mod:`llamad.keysfile`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import tempfile
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Callable, Mapping

KEY_ID = re.compile(r"^[A-Za-z0-9_-]+$")
API_KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
WINDOW = 60.0  # seconds of the sliding rate-limit window


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


def _digest(secret: str) -> bytes:
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
    return ApiKey(key_id, _digest(secret), rate, expires), secret


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


@dataclass(frozen=True)
class Denied:
    status: int  # 401 or 429
    message: str
    code: str
    retry_after: int = 0


class KeyStore:
    """The loaded keys and their rate-limit windows.

    ``default_rate`` (requests per minute, 0 = none) limits the keys whose
    line sets no rate of their own, as MAX_REQUESTS_PER_MINUTE did.
    """

    def __init__(self, default_rate: int = 0, priorities: Mapping[str, int] | None = None) -> None:
        self.default_rate = default_rate
        self.priorities = dict(priorities or {})  # the classes a TOML key may name
        self.by_digest: dict[bytes, ApiKey] = {}
        self.by_id: dict[str, ApiKey] = {}
        self.windows: dict[str, deque[float]] = {}
        self.error = ""  # why the last load could not read the file

    def __len__(self) -> int:
        return len(self.by_digest)

    def load(self, path: str) -> list[str]:
        """(Re)load from ``path``; returns warnings.  Never raises.

        A missing or unreadable file means no keys (fail closed): keeping the
        old keys would keep a key valid that the edit meant to revoke.
        ``error`` says why the file could not be read, or is empty.
        """
        try:
            if path.endswith(".toml"):
                from llamad.keysfile import read_toml_keys

                entries, warnings = read_toml_keys(path, self.priorities)
                found = [entry.key for entry in entries]
            else:
                lines, warnings = read_key_file(path)
                found = [line.key for line in lines if line.key is not None]
            self.error = ""
        except FileNotFoundError:
            found, warnings = [], [f"{path}: not found"]
            self.error = ""
        except (OSError, ValueError) as e:
            self.error = f"{path}: cannot read: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
            found, warnings = [], [self.error]
        keys = {key.digest: key for key in found}
        self.by_digest = keys
        self.by_id = {key.key_id: key for key in found}
        live = {key.key_id for key in keys.values()}
        self.windows = {k: v for k, v in self.windows.items() if k in live}
        return warnings

    def check(self, presented: str | None, now: float, wall: datetime | Callable[[], datetime],
              count: bool = True) -> ApiKey | Denied:
        """The key for ``presented``, or why not.  ``now`` is monotonic for rate limits; ``wall`` (or
        what gives it, asked only for a key that expires) is the time for expiry.

        ``count=False`` only looks at the rate-limit window: a check made before
        the body arrives must not cost the request a second slot.
        """
        if not presented:
            return Denied(401, "Missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        digest = _digest(presented)
        key = self.by_digest.get(digest)
        # Compare digests in constant time; the lookup above only reveals hash prefixes.
        if key is None or not hmac.compare_digest(key.digest, digest):
            return Denied(401, "Invalid API key", "invalid_api_key")
        if key.expires is not None and (wall() if callable(wall) else wall) >= key.expires:
            return Denied(401, "API key has expired", "invalid_api_key")  # as llama-gguf-inference
        rate = key.rate_limit if key.rate_limit is not None else self.default_rate
        if rate:
            window = self.windows.setdefault(key.key_id, deque())
            while window and window[0] <= now - WINDOW:
                window.popleft()
            if len(window) >= rate:
                retry = max(1, math.ceil(window[0] + WINDOW - now))
                return Denied(429, f"Rate limit of {rate} requests per minute exceeded",
                              "rate_limit_exceeded", retry)
            if count:
                window.append(now)
        return key


def presented_key(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>``, a bare ``Authorization: <key>``
    (llama-gguf-inference took one, so its clients may send it), or ``x-api-key``."""
    if authorization:
        if authorization.startswith(b"Bearer ") and b"\t" not in authorization:  # nearly every client
            return authorization[7:].strip().decode("latin-1") or None
        scheme, _, value = authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if not value and scheme.lower() != "bearer":  # one word: the key itself (Basic and others have two)
            return scheme
    if x_api_key:
        return x_api_key.decode("latin-1").strip() or None
    return None
