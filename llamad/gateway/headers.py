"""Which headers cross the proxy, in each direction."""

from __future__ import annotations

from twisted.web.http_headers import Headers

# RFC 9110 section 7.6.1 hop-by-hop fields, plus the ones the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"x-api-key"}
# CORS is llamad's policy (api.cors_origins), whatever the child would allow.
_CORS = frozenset({b"access-control-allow-origin", b"access-control-allow-credentials",
                   b"access-control-allow-methods", b"access-control-allow-headers",
                   b"access-control-expose-headers", b"access-control-max-age"})
_RESPONSE_DROP = HOP_BY_HOP | _CORS | {b"server", b"date"}


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _filtered(headers: Headers, drop: frozenset[bytes]) -> Headers:
    named = _connection_tokens(headers)
    out = Headers()
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower not in drop and lower not in named:
            out.setRawHeaders(name, values)
    return out


def to_backend(headers: Headers, key: str) -> Headers:
    """The client's headers minus hop-by-hop and its credentials, plus the child's key."""
    out = _filtered(headers, _REQUEST_DROP)
    if key:
        out.setRawHeaders(b"authorization", [b"Bearer " + key.encode()])
    return out


def to_client(headers: Headers) -> Headers:
    """The child's response headers minus hop-by-hop ones."""
    return _filtered(headers, _RESPONSE_DROP)
