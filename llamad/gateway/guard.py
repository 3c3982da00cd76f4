"""What every request on port 8000 passes before routing: path sanity, CORS, API keys.

The front asks the guard before it reads a body and again before routing.  Auth is default-deny: only the exact
public paths skip it, and a path with dot segments, doubled or encoded
slashes, or a target with a fragment, is refused before anything else, so no
spelling of a path can reach a route without the key check.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime, timezone
from typing import Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from llamad.keys.auth import Denied, KeyStore, presented_key
from llamad.keys.apikey import EVERY_ROLE, ApiKey
from llamad.errors import ApiError, write_error
from llamad.keys.policy import Policy
from llamad.gateway.routes import (ADMIN_PATHS, ANY_ROLE_PATHS, LOCAL_PATHS, OWN_ROUTES, PUBLIC_PATHS, ROUTES,
                                   SLOTS_PREFIX)
from llamad.gateway.routing import child_path

log = Logger(namespace="llamad.guard")

# Dot segments, empty segments, backslashes, and any percent-escape: no OpenAI or
# llama.cpp route needs one, and the child would decode it into another route.
_TRICKY_PATH = re.compile(rb"//|/\.\.?(?:/|$)|\\|%")
ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})

CORS_ALLOW_HEADERS = (b"authorization", b"content-type", b"x-api-key", b"accept", b"openai-organization",
                      b"openai-project", b"openai-beta")
CORS_ALLOW_PREFIXES = (b"x-stainless-",)
CORS_EXPOSE = b"retry-after, x-llamad-cold-start, x-request-id"


class Cors:
    """The exact-origin allowlist (or ``*``) from ``api.cors_origins``."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        # A browser's Origin never ends in "/": an allowlisted "https://app.example/" would match nothing.
        self.origins = frozenset(o.rstrip("/").encode() for o in origins if o != "*")

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.origins)

    def allowed(self, origin: bytes | None) -> bytes | None:
        """The Access-Control-Allow-Origin value for ``origin``, if allowed."""
        if origin is None or not self.enabled:
            return None
        if self.any:
            return b"*"
        return origin if origin in self.origins else None

    def headers_for(self, origin: bytes | None) -> dict[bytes, bytes]:
        """The CORS headers of a response to ``origin``: also for answers written below the resource."""
        headers: dict[bytes, bytes] = {}
        allow = self.allowed(origin)
        if allow is not None:
            headers[b"access-control-allow-origin"] = allow
            headers[b"access-control-expose-headers"] = CORS_EXPOSE
        if not self.any:
            headers[b"vary"] = b"Origin"  # the answer depends on the origin, allowed or not
        return headers

    def decorate(self, request: IRequest) -> None:
        """CORS headers for a response, errors included."""
        for name, value in self.headers_for(request.getHeader(b"origin")).items():
            request.setHeader(name, value)

    def preflight(self, request: IRequest) -> bytes:
        """Answer an OPTIONS with an Origin (a preflight or not) with 204, or 403 for an origin not allowed."""
        if self.allowed(request.getHeader(b"origin")) is None:
            raise ApiError(403, "origin not allowed by api.cors_origins", "cors_origin_denied")
        asked = request.getHeader(b"access-control-request-headers") or b""
        requested = [h.strip().lower() for h in asked.split(b",")
                     if h.strip()]
        refused = [h for h in requested if h not in CORS_ALLOW_HEADERS and not h.startswith(CORS_ALLOW_PREFIXES)]
        if refused:
            raise ApiError(403, f"header not allowed by CORS: {refused[0].decode('latin-1')}", "cors_header_denied")
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"GET, POST, OPTIONS")
        request.setHeader(b"access-control-allow-headers", b", ".join(requested or CORS_ALLOW_HEADERS))
        request.setHeader(b"access-control-max-age", b"600")
        return b""


class Auth:
    """The ``[auth]`` policy over a :class:`KeyStore` that SIGHUP can reload."""

    def __init__(self, enabled: bool, keys_file: str, protect_metrics: bool, clock: IReactorTime,
                 wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc), *, default_rate: int = 0,
                 priorities: Mapping[str, int] | None = None, priority_ageing: float = 30.0,
                 enable_on_keys: bool = False) -> None:
        """``enable_on_keys``: auth.enabled is set nowhere, so a reload that finds keys turns auth on (as a
        keys file present at boot does); nothing turns it off but a restart."""
        self.enabled = enabled
        self.enable_on_keys = enable_on_keys
        self.keys_file = keys_file
        self.protect_metrics = protect_metrics
        self.clock = clock
        self.wall = wall
        self.store = KeyStore(default_rate, priorities)
        self.policy = Policy(clock, priorities, priority_ageing)  # what each key used survives reloads
        # Requests let in by a key, and refused by the key check (401 or 429): the JSON /metrics view.
        self.authenticated = 0
        self.unauthorized = 0
        if enabled:
            self.reload()

    def reload(self) -> int:
        """Re-read the keys file; a request in flight keeps its verdict."""
        warnings = self.store.load(self.keys_file)
        self.policy.reloaded(self.store.by_id)
        for warning in warnings:
            log.warn("api keys: {warning}", warning=warning)
        if not self.enabled and self.enable_on_keys and len(self.store):
            self.enabled = True
            log.info("auth enabled: {path} now holds keys (auth.enabled is set nowhere): every request but "
                     "/ping and /health needs a key from here on; set auth.enabled = false or AUTH_ENABLED=false "
                     "and restart to serve without keys", path=self.keys_file)
        if self.enabled and not len(self.store):
            log.warn("auth is enabled but {path} holds no valid key: every request gets 401 (fail closed)",
                     path=self.keys_file)
        else:
            log.info("api keys: {n} loaded from {path}", n=len(self.store), path=self.keys_file)
        return len(self.store)

    def needs_key(self, path: bytes) -> bool:
        if not self.enabled or path in PUBLIC_PATHS:
            return False
        return path != b"/metrics" or self.protect_metrics

    def check(self, request: IRequest, count: bool = True) -> ApiKey:
        """The caller's key, or an :class:`ApiError` (401/429).

        ``count=False`` takes no rate-limit slot (the check before a body arrives).
        """
        verdict = self.store.check(
            presented_key(request.getHeader(b"authorization"), request.getHeader(b"x-api-key")),
            self.clock.seconds(), self.wall, count,
        )
        if isinstance(verdict, Denied):
            self.unauthorized += 1  # a refusal ends the request, whichever check made it
            headers = {b"retry-after": b"%d" % verdict.retry_after} if verdict.retry_after else {}
            if verdict.status == 401:
                headers[b"www-authenticate"] = b'Bearer realm="llamad"'
            raise ApiError(verdict.status, verdict.message, verdict.code, headers,
                           param="authorization" if verdict.status == 401 else None)
        if count:
            self.authenticated += 1
        return verdict


# llamad's own routes, each with the methods it takes (a JSON 405 for any other).
OWN_METHODS: dict[bytes, frozenset[bytes]] = {
    route.path.encode(): frozenset(method.encode() for method in route.methods)
    for route in ROUTES if route.path in OWN_ROUTES
}


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback as a dual-stack socket shows it (``::ffff:127.0.0.1``)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def is_slot_action(path: bytes) -> bool:
    """``/slots/<id>?action=save|restore|erase`` (also under ``/upstream/<id>``): the child reads and writes
    llamad's KV cache files.  Every path under ``/slots/`` counts, whatever its query says: the child decodes
    the query, so no spelling of ``action`` can pass for another."""
    return child_path(path).startswith(SLOTS_PREFIX)


class Guard:
    """The checks every request passes before llamad's own routes or the proxy."""

    def __init__(self, auth: Auth, cors: Cors, on_reject: Callable[[IRequest, int], None]) -> None:
        self.auth = auth
        self.cors = cors
        self.on_reject = on_reject

    def answer(self, request: IRequest) -> bytes | None:
        """CORS headers, then the checks: the body of the answer when they decide it (an error, a
        preflight), or None when the request goes on to a route or the proxy."""
        if self.cors.enabled:
            self.cors.decorate(request)
        try:
            self.check(request)
            if self.is_preflight(request):
                return self.cors.preflight(request)
        except ApiError as err:
            self.on_reject(request, err.status)
            return write_error(request, err)
        return None

    def check(self, request: IRequest) -> None:
        self.check_head(request.method, request.uri, request)

    def check_head(self, method: bytes, target: bytes, request: IRequest, count: bool = True) -> None:
        """Everything the head of a request decides; ``request`` is read for its headers only."""
        if method not in ALLOWED_METHODS:
            raise ApiError(405, f"method {method.decode('latin-1')} not allowed", "method_not_allowed",
                           {b"allow": b", ".join(sorted(ALLOWED_METHODS))})
        if b"#" in target:  # a client never sends one (RFC 9110 4.2.4), and routes are matched without it
            raise ApiError(400, "invalid request target: it has a fragment ('#'), which is never sent to a server",
                           "invalid_request_target")
        path = target.split(b"?", 1)[0]
        if not path.startswith(b"/") or _TRICKY_PATH.search(path):
            raise ApiError(400, "invalid request path", "invalid_path")
        if self._preflight(method, request):
            return  # preflights carry no credentials
        slot_action = is_slot_action(path)
        if self.auth.needs_key(path):
            key = request.api_key = self.auth.check(request, count)
            if key.roles is not EVERY_ROLE and path not in ANY_ROLE_PATHS:
                role = "admin" if path in ADMIN_PATHS or slot_action else "inference"
                if role not in key.roles:
                    raise ApiError(403, f"key {key.key_id} does not have the {role} role", "insufficient_role")
        elif (slot_action or path in LOCAL_PATHS) and not is_loopback(getattr(request.getClientAddress(), "host", "")):
            if slot_action:
                raise ApiError(403, "the slot actions (save, restore, erase) need auth.enabled and a key with the "
                               "admin role, or a request from loopback: they read and write llamad's KV cache files",
                               "forbidden")
            raise ApiError(403, f"{method.decode('latin-1')} {path.decode('latin-1')} needs auth.enabled, or a "
                           "request from loopback", "forbidden")
        allowed = OWN_METHODS.get(path)
        if allowed is not None and method not in allowed:
            listed = b", ".join(sorted(allowed))
            raise ApiError(405, f"{path.decode('latin-1')} takes {listed.decode('latin-1')}", "method_not_allowed",
                           {b"allow": listed})

    def early_refusal(self, method: bytes, target: bytes, request: IRequest) -> ApiError | None:
        """The answer to a request whose head is in but whose body is not, if the head already decides it.

        Called by the channel before it reads a body, so a client without a
        valid key cannot hold a connection open by trickling one.  The rate
        limit is only looked at: :meth:`answer` checks again and counts the request
        once.  The error carries the CORS headers :meth:`answer` would have added.
        """
        try:
            self.check_head(method, target, request, count=False)
        except ApiError as err:
            if self.cors.enabled:
                err.headers = {**self.cors.headers_for(request.getHeader(b"origin")), **err.headers}
            return err
        return None

    def is_preflight(self, request: IRequest) -> bool:
        return self._preflight(request.method, request)

    def _preflight(self, method: bytes, request: IRequest) -> bool:
        """An OPTIONS with an Origin, with CORS on: answered by llamad, with or without
        Access-Control-Request-Method (llama-gguf-inference's clients send a bare one)."""
        return method == b"OPTIONS" and self.cors.enabled and request.getHeader(b"origin") is not None
