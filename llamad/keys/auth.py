"""The keys llamad checks: loaded from the keys file, compared in constant time, per-key rate limits.

A keys file holds one key per line (:mod:`llamad.keys.apikey`), or, when its
name ends in ``.toml``, one table per key with its policy (:mod:`llamad.keys.keysfile`).
"""

from __future__ import annotations

import hmac
import math
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Mapping

from llamad.keys.apikey import ApiKey, digest_of, read_key_file
from llamad.keys.keysfile import read_toml_keys

WINDOW = 60.0  # seconds of the sliding rate-limit window


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
        digest = digest_of(presented)
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
