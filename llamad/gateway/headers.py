"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

from typing import Iterable

from twisted.web.http_headers import Headers

# RFC 9110 section 7.6.1 hop-by-hop fields.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)
# The client's credentials stay with llamad; the proxy sets Host and framing itself, and sends
# the body at once (so no Expect: 100-continue).
_REQUEST_DROP = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"x-api-key", b"expect"}
# CORS is llamad's policy (api.cors_origins), whatever the child would allow.
_CORS = frozenset({b"access-control-allow-origin", b"access-control-allow-credentials",
                   b"access-control-allow-methods", b"access-control-allow-headers",
                   b"access-control-expose-headers", b"access-control-max-age"})
_RESPONSE_DROP = HOP_BY_HOP | _CORS | {b"server", b"date"}


def _named_in_connection(values: Iterable[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def to_backend(headers: Headers, key: str) -> list[bytes]:
    """Header lines for the child: the client's minus hop-by-hop and credentials, plus the child's key."""
    # The front's headers are (name, value) pairs as received; twisted.web's group values by name.
    pairs = getattr(headers, "raw", None)
    if pairs is None:
        pairs = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
    lines = []
    named: set[bytes] | None = None
    for name, value in pairs:
        lower = name.lower()
        if lower in _REQUEST_DROP:
            if lower == b"connection":
                named = _named_in_connection((value,)) | (named or set())
            continue
        lines.append(name + b": " + value)
    if named:  # rare: more headers named hop-by-hop
        lines = [line for line in lines if line.partition(b":")[0].lower() not in named]
    if key:
        lines.append(b"Authorization: Bearer " + key.encode())
    return lines


def to_client(headers: list[tuple[bytes, bytes, bytes]]) -> list[tuple[bytes, bytes, bytes]]:
    """The child's response headers, as (lower-case name, name, value), minus hop-by-hop (and those named
    in Connection), CORS, Server, Date."""
    kept = []
    named: set[bytes] | None = None
    for header in headers:
        lower = header[0]
        if lower in _RESPONSE_DROP:
            if lower == b"connection":
                named = _named_in_connection((header[2],)) | (named or set())
            continue
        kept.append(header)
    return [header for header in kept if header[0] not in named] if named else kept
