"""Port 8000: llamad's own routes (a Klein app), and the proxy path for everything else.

The front (``gateway/front.py``) hands each complete request to :meth:`Gateway.serve`:
the guard, then an own route through Klein's routing table, or the proxy path, which
skips routing so that the per-request work stays small.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import deque
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from llamad.keys.access import access_line
from llamad.activity import Activity
from llamad.keys.apikey import ApiKey
from llamad.backends import Target
from llamad.errors import ApiError, sse_error_event, write_error
from llamad.gateway.front import FrontFactory, FrontRequest
from llamad.gateway.limits import BODY_MIN_RATE
from llamad.gateway.page import PAGE_FILES, PAGE_POLICY, PAGE_ROUTES, RECENT_REQUESTS, read_log_tail
from llamad.fleet.fleet import FleetBackend
from llamad.fleet.gate import Lease
from llamad.gateway.guard import Auth, Cors, Guard
from llamad.gateway.proxy import NotDelivered, Proxy, Relay, Unanswered
from llamad.gateway import models_api
from llamad.gateway.routes import (
    CHILD_JSON_ROUTES, INFERENCE_ROUTES, JSON_ARRAY_ROUTES, JSON_BODY_ROUTES, MODEL_LIST_PATHS, MODELS_API_ROUTES,
    SLOTS_PREFIX, own_methods, route_label,
)
from llamad.gateway.routing import UPSTREAM_PREFIX, ModelDirectory, child_path
from llamad.gateway.usage import UsageTap, ask_for_usage
from llamad.metrics import Metrics, label_child_metrics
from llamad.fleet.runtime import ModelRuntime
from llamad.status import Status
from llamad.timers import cancel

log = Logger(namespace="llamad.gateway")

LOADING_INTERVAL = 3.0  # seconds between ": loading" comments on a waiting stream
CHILD_METRICS_TIMEOUT = 2.0
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
# A \uD800-\uDFFF escape: the only way a lone surrogate gets into parsed JSON.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# What any number past a double's range (1e999, 400 digits) must hold: an exponent of 3 digits or more,
# or a run of 200 digits or more.  A body is mapped to its numbers' shape (digits to 0, e/E to e, signs
# to +, the rest to a space: linear, in C) and only one with such a shape is parsed number by number.
_NUMBER_SHAPE = bytes(ord("0") if chr(c).isdigit() and c < 128 else ord("e") if c in b"eE" else
                      ord("+") if c in b"+-" else ord(" ") for c in range(256))
_BIG_SHAPES = (b"e000", b"e+000", b"0" * 200)


def _may_overflow(body: bytes) -> bool:
    shape = body.translate(_NUMBER_SHAPE)
    return any(big in shape for big in _BIG_SHAPES)


def wants_json(accept: bytes | None, by_default: bool = False) -> bool:
    """Whether ``/metrics`` answers llama-gguf-inference's JSON view rather than Prometheus' text.

    Never to a client that names text/plain, OpenMetrics or Prometheus' protobuf,
    as Prometheus always does; else to one that asks for JSON, or to any
    (``curl``'s ``*/*``, no Accept at all) when ``by_default``
    (``api.metrics_format = "json"``, what llama-gguf-inference answered).
    """
    text = (accept or b"").lower()
    if b"text/plain" in text or b"openmetrics" in text or b"io.prometheus" in text:
        return False
    return by_default or b"application/json" in text


def _query(request: IRequest) -> dict[str, str]:
    """A request's query parameters, the first value of each."""
    _, _, query = request.uri.partition(b"?")
    return {name: values[0] for name, values in parse_qs(query.decode("latin-1")).items()}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _shown(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_shown(text)} is out of range (past a double's largest)")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    if len(text) > 300 and not math.isfinite(float(text)):
        raise ValueError(f"number {_shown(text)} is out of range (past a double's largest)")
    return value


# One decoder for every body (``json.loads`` with an option builds a new one per call); the checked
# one only for bodies with a number that may overflow.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_CHECKED_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float, parse_int=_finite_int)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """An inference request body: a strict JSON object in UTF-8, or a 400 that says what is wrong."""
    payload = parse_json(body, "a JSON object")
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(payload).__name__}", "invalid_json")
    return payload


def parse_json(body: bytes, expected: str = "JSON") -> Any:
    """A body the child parses as JSON: strict JSON in UTF-8, or a 400 that says what is wrong.

    Strict, so that what llamad accepts is what the child parses: no NaN or
    Infinity, no number past a double's range (``1e999``, which Python reads
    as infinity), no lone surrogate escape, no UTF-16, no nesting deeper than
    the recursion limit.  The number and surrogate checks cost, so they run
    only on bodies that may need them.
    """
    if not body or body.isspace():
        raise ApiError(400, f"request body is empty: expected {expected}", "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 (byte {body[e.start]:#04x} at offset {e.start})",
                       "invalid_json") from None
    try:
        decoder = _CHECKED_DECODER if _may_overflow(body) else _DECODER
        payload = decoder.decode(text.removeprefix("\ufeff"))
        if _SURROGATE_ESCAPE.search(body):
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"request body is not valid JSON: lone surrogate \\u{ord(e.object[e.start]):04x} "
                       "in a string", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply", "invalid_json") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    return payload


class Gateway:
    app = Klein()
    in_thread: Callable[..., defer.Deferred[Any]] = staticmethod(threads.deferToThread)  # file reads, off the reactor

    def __init__(
        self,
        clock: IReactorTime,
        status: Status,
        models: Mapping[str, ModelRuntime],
        proxy: Proxy,
        metrics: Metrics,
        activity: Activity,
        auth: Auth | None = None,
        cors: Cors | None = None,
        directory: ModelDirectory | None = None,
        access: Callable[[bytes], None] | None = None,
        wall: Callable[[], float] = time.time,
        metrics_format: str = "prometheus",
    ) -> None:
        """``models``: the fleet's, by id; ``activity``: every request's (the drain counts them all).
        ``directory``: their names; without one, the one model takes any name, as llama-server alone does.
        With several models (or none), llamad answers the model list and the router API itself; with one,
        they are the child's."""
        self.clock = clock
        self.status = status
        self.proxy = proxy
        self.metrics = metrics
        self.activity = activity
        self.auth = auth or Auth(False, "", False, clock)
        self.policy = self.auth.policy
        self.cors = cors or Cors(())
        self.access = access  # takes one access-log line per request (None: no access log)
        self.metrics_json = metrics_format == "json"  # /metrics answers JSON unless Prometheus' text is named
        self.wall = wall
        self.bytes_sent = 0  # body bytes of finished responses, added once per response by the front
        self.models = dict(models)
        metrics.add_models(self.models)  # the request families' model label: these ids, or "-"
        self.directory = directory or ModelDirectory(list(self.models), lenient=True)
        self.router_api = not self.directory.lenient
        self._guard: Guard | None = None  # built on the first request
        self.recent: deque[bytes] = deque(maxlen=RECENT_REQUESTS)  # the newest access lines, for the status page
        # Read at scrape time: the requests being proxied are the process-wide activity's.
        metrics.in_flight.set_function(lambda: self.activity.in_flight)

    def runtime_for(self, request: IRequest, payload: Mapping[str, Any] | None,
                    allowed: Callable[[str], bool] | None = None) -> tuple[ModelRuntime, bytes]:
        """The model a request is for, and the path to send its server (``/upstream/<id>`` removed).
        ``allowed``: the models the caller's key may use; others answer as models that do not exist."""
        if not self.models:
            raise ApiError(503, "this llamad serves no model (backend.kind = \"none\")", "no_backend")
        routed = self.directory.route(request.method, request.uri, payload, allowed)
        return self.models[routed.model], routed.uri

    def count(self, request: IRequest, code: int, route: str | None = None, done: ProxiedRequest | None = None) -> None:
        """One answered request: its metric, and its access-log line (``done``: how a proxied one went)."""
        label = route if route is not None else route_label(request.path)
        key: ApiKey | None = getattr(request, "api_key", None)
        key_id = key.key_id if key is not None else None
        self.metrics.count_request(label, request.method, code, key_id or "",
                                   done.runtime.id if done is not None else None)
        quiet = label in PAGE_ROUTES
        if self.access is not None or not quiet:
            line = (access_line(self.wall(), key_id, None, label, code, 0, 0, None, None, None, None) if done is None
                    else done.access_line(key_id, label, code))
            if not quiet:
                self.recent.append(line)
            if self.access is not None:
                self.access(line)

    def error_answer(self, request: IRequest, err: ApiError) -> bytes:
        self.count(request, err.status)
        return write_error(request, err)

    # --- the front's entry points (llamad.gateway.front) ----------------------------------------

    @property
    def guard(self) -> Guard:
        """The guard, built on the first request (after the tests' and tap's set-up)."""
        if self._guard is None:
            self._guard = Guard(self.auth, self.cors, self.count)
        return self._guard

    def serve(self, request: FrontRequest) -> None:
        """One complete request from the front: the guard, then an own route (Klein) or the proxy."""
        answer = self.guard.answer(request)
        if answer is not None:
            request.respond(answer)
            return
        endpoint = OWN_ENDPOINTS.get(request.path)
        if endpoint is None:
            self.dispatch(request)
            return
        try:
            result = self.app.execute_endpoint(endpoint, request)
        except ApiError as err:
            request.respond(self.error_answer(request, err))
            return
        if isinstance(result, bytes):
            request.respond(result)
            return
        d: defer.Deferred[bytes] = result  # an async route: Klein made its coroutine a Deferred
        request.on_lost = d.cancel
        d.addCallbacks(request.respond, self._own_failed, errbackArgs=(request,))

    def _own_failed(self, failure: Failure, request: FrontRequest) -> None:
        if request.finished or request._disconnected:
            return
        if not failure.check(ApiError):
            log.failure("error in {path}", failure, path=request.path)
        err = failure.value if failure.check(ApiError) else ApiError(500, "internal error in llamad")
        request.respond(self.error_answer(request, err))

    def early_refusal(self, request: FrontRequest) -> ApiError | None:
        """The guard's answer to a request whose head is in and whose body is not, if the head decides it."""
        return self.guard.early_refusal(request.method, request.uri, request)

    def dispatch(self, request: FrontRequest) -> None:
        """Proxy one request from the front; the client going away cancels it.  A request that
        need not wait runs on plain callbacks; one that waits for admission takes a coroutine."""
        try:
            proxied = self._prepare(request)
        except Exception:
            self._forward_failed(Failure(), request)
            return
        if proxied is None:
            return
        if proxied.inference and proxied.lease is None:
            d = defer.ensureDeferred(self._wait_then_relay(proxied))
            request.on_lost = d.cancel
            d.addErrback(self._forward_failed, request, proxied)
            return
        request.on_lost = proxied.cancel
        proxied.start()

    @app.route("/ping", methods=own_methods("/ping"))
    def ping(self, request: IRequest) -> bytes:
        self.count(request, 200, "/ping")
        return b""

    @app.route("/health", methods=own_methods("/health"))
    def health(self, request: IRequest) -> bytes:
        body = self.status.snapshot()
        code = 200 if body["status"] == "ok" else 503
        self.count(request, code, "/health")
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    @app.route("/metrics", methods=own_methods("/metrics"))
    async def metrics_route(self, request: IRequest) -> bytes:
        self.count(request, 200, "/metrics")
        request.responseHeaders.addRawHeader(b"vary", b"Accept")
        if wants_json(request.getHeader(b"accept"), self.metrics_json):
            view = self.metrics.gateway_view(self.clock.seconds() - self.status.booted_at, self.auth.authenticated,
                                             self.auth.unauthorized, self.bytes_sent)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"gateway": view}).encode()
        text = self.metrics.exposition()
        if self.router_api:
            text += await self._fleet_metrics()
        elif self.status.backend_has_metrics:
            target = next(iter(self.models.values())).gate.current_target()
            if target is not None:
                text += await self._child_metrics(target)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return text

    async def _fleet_metrics(self) -> bytes:
        """Every ready child's ``llamacpp:*`` metrics, fetched at once, one series per ``model``."""
        ready = {model_id: runtime.gate.current_target() for model_id, runtime in self.models.items()
                 if runtime.backend is not None and runtime.backend.supervised}
        fetches = {model_id: defer.ensureDeferred(self._child_metrics(target))
                   for model_id, target in ready.items() if target is not None}
        texts = {model_id: await d for model_id, d in fetches.items()}
        return label_child_metrics({model_id: text for model_id, text in texts.items() if text})

    async def _child_metrics(self, target: Target) -> bytes:
        """The child's ``llamacpp:*`` metrics, or nothing if it cannot answer quickly."""
        try:
            status, body = await self.proxy.fetch(target, b"/metrics", CHILD_METRICS_TIMEOUT)
        except Exception as e:  # the child's metrics are a bonus, never an error
            log.debug("child metrics unavailable: {e}", e=e)
            return b""
        return body if status == 200 else b""

    @app.route("/admin/reload", methods=own_methods("/admin/reload"))
    @app.route("/reload", methods=own_methods("/reload"), endpoint="reload")  # llama-gguf-inference's path
    def admin_reload(self, request: IRequest) -> bytes:
        """Re-read the API keys file (the caller passed the key check, or auth is off and it is local).

        An unreadable file leaves no key valid (fail closed) and answers a JSON
        500 naming why, so ``llamad keys reload`` reports it rather than success.
        """
        try:
            loaded = self.auth.reload()
        except Exception:
            log.failure("reloading the API keys failed")
            raise ApiError(500, "reloading the API keys failed (see the log)", "reload_failed") from None
        if self.auth.enabled and self.auth.store.error:
            raise ApiError(500, f"API keys not reloaded: {self.auth.store.error}; no key is valid until the file "
                           "can be read and reloaded", "keys_file_unreadable")
        self.count(request, 200, route_label(request.path))
        request.setHeader(b"content-type", b"application/json")
        # llamad's fields, and llama-gguf-inference's for the same, so that the clients of either read it.
        return json.dumps({"reloaded": True, "keys": loaded, "status": "ok", "keys_loaded": loaded}).encode()

    @app.route("/admin/restart", methods=own_methods("/admin/restart"))
    def admin_restart(self, request: IRequest) -> bytes:
        """Out of ``failed`` at once, or a fresh child (with a key, or from loopback without auth)."""
        runtime, _ = self.runtime_for(request, None)
        backend = runtime.backend
        if backend is None or not backend.supervised:
            raise ApiError(409, "no supervised backend to restart", "no_backend")
        backend.restart()
        self.count(request, 200, "/admin/restart")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"restarting": True, "state": backend.state.value}).encode()

    # --- the status page: its files, and what it reads (never waking a model) -----------------------------

    @app.route("/ui", methods=own_methods("/ui"), endpoint="ui_bare")
    @app.route("/ui/", methods=own_methods("/ui/"))
    @app.route("/ui/app.js", methods=own_methods("/ui/app.js"), endpoint="ui_app")
    @app.route("/ui/style.css", methods=own_methods("/ui/style.css"), endpoint="ui_style")
    def ui(self, request: IRequest) -> bytes:
        """The page's files: no data in them, so no key; the data comes from the admin routes below."""
        body, content_type = PAGE_FILES[request.path]
        self.count(request, 200)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-security-policy", PAGE_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return body

    def _admin_json(self, request: IRequest, answer: Any) -> bytes:
        self.count(request, 200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(answer).encode()

    @app.route("/admin/status", methods=own_methods("/admin/status"))
    def admin_status(self, request: IRequest) -> bytes:
        """``/health``'s snapshot with every model (one model too), its aliases and idle time, the
        memory budget and the clock: all the status page shows of the models, in one answer."""
        body = self.status.snapshot()
        fleet = self.status.fleet
        models: dict[str, dict[str, Any]] = body.get("models") or {
            model_id: self._model_entry(runtime) for model_id, runtime in self.models.items()}
        aliases: dict[str, list[str]] = {}
        for name, model_id in self.directory.names.items():
            if name != model_id:
                aliases.setdefault(model_id, []).append(name)
        for model_id, entry in models.items():
            entry["aliases"] = aliases.get(model_id, [])
            runtime = self.models.get(model_id)
            entry["idle_seconds"] = round(runtime.activity.idle_seconds(), 3) if runtime is not None else None
        body.update(models=models, budget=fleet.budget if fleet is not None else None, router=self.router_api,
                    auth=self.auth.enabled, now=round(self.clock.seconds(), 3))
        return self._admin_json(request, body)

    def _model_entry(self, runtime: ModelRuntime) -> dict[str, Any]:
        """One model outside a fleet's ``/health`` (a one-model llamad): as ``Status.model_snapshot`` shows it."""
        placed = runtime.gate.backend
        if isinstance(placed, FleetBackend) and placed.model_id in placed.fleet.models:
            return self.status.model_snapshot(placed.fleet.models[placed.model_id])
        backend = runtime.backend
        return {**(backend.snapshot() if backend is not None else {"state": "none"}), "memory": 0, "waiting": None,
                "in_flight": runtime.activity.inference_in_flight, "queued": runtime.gate.waiting,
                "last_used": round(runtime.activity.last_activity, 3)}

    def log_file(self, model_id: str) -> str | None:
        """Where model ``model_id``'s child writes its output (None: it has no log file)."""
        return self.models[model_id].log_file

    @app.route("/admin/logs", methods=own_methods("/admin/logs"))
    async def admin_logs(self, request: IRequest) -> bytes:
        """A model's child log: its last lines, or those after ``?after=`` (the ``offset`` of the last
        answer).  ``?model=`` is matched against the configured models: it never names a file."""
        query = _query(request)
        name = query.get("model", "")
        if name:
            model_id = self.directory.names.get(name)
            if model_id is None or model_id not in self.models:
                raise ApiError(404, f"The model '{name}' does not exist (models here: {self.directory.listing()})",
                               "model_not_found", param="model")
        elif len(self.models) == 1:
            model_id = next(iter(self.models))
        else:
            raise ApiError(400, f"name a model in ?model= (one of: {self.directory.listing()})", "model_required",
                           param="model")
        after_text = query.get("after", "")
        if after_text and not (after_text.isascii() and after_text.isdigit()):
            raise ApiError(400, "?after= takes the offset of the last answer (a whole number of bytes)",
                           "invalid_parameter", param="after")
        path = self.log_file(model_id)
        lines, offset = ([], 0) if path is None else await self.in_thread(
            read_log_tail, path, int(after_text) if after_text else None)
        return self._admin_json(request, {"model": model_id, "lines": lines, "offset": offset})

    @app.route("/admin/requests", methods=own_methods("/admin/requests"))
    def admin_requests(self, request: IRequest) -> bytes:
        """The newest requests, newest first, as their access-log lines say (the page's own polling left out)."""
        return self._admin_json(request, {"requests": [json.loads(line) for line in reversed(self.recent)]})

    @app.route("/admin/keys", methods=own_methods("/admin/keys"))
    def admin_keys(self, request: IRequest) -> bytes:
        """Each key's name, roles, scope, limits and use: what the keys file says, never a secret or a hash."""
        keys = []
        for key_id, key in sorted(self.auth.store.by_id.items()):
            minute, day = self.policy.tokens_used(key_id)
            use = self.policy.uses.get(key_id)
            keys.append({
                "id": key_id, "roles": sorted(key.roles), "models": list(key.models), "rate_limit": key.rate_limit,
                "expires": key.expires.isoformat() if key.expires is not None else None,
                "tokens_per_minute": key.tokens_per_minute, "tokens_per_day": key.tokens_per_day,
                "max_concurrent": key.max_concurrent, "priority": key.priority or None,
                "tokens_used": {"minute": minute, "day": day}, "in_flight": use.in_flight if use is not None else 0,
            })
        return self._admin_json(request, {"auth": self.auth.enabled, "keys": keys})

    def _forward_failed(self, failure: Failure, request: IRequest, done: ProxiedRequest | None = None) -> None:
        """Answer a request whose proxying failed before its response began, and count it."""
        if failure.check(defer.CancelledError) or request.finished or getattr(request, "_disconnected", False):
            if done is not None:
                self.count(request, CLIENT_CLOSED, done.route, done)
            return
        if failure.check(ApiError):
            err = failure.value
        else:
            log.failure("proxy failure", failure)
            err = ApiError(500, "internal error in llamad")
        self.count(request, err.status, done.route if done is not None else None, done)
        request.write(write_error(request, err))
        request.finish()

    def _prepare(self, request: IRequest) -> ProxiedRequest | None:
        """Everything before the relay that needs no waiting: route, body checks, routing, and a slot
        when one is free.  None: answered here (the router API, a model list while the child is down)."""
        started = self.clock.seconds()
        path = request.path
        if path.startswith(UPSTREAM_PREFIX):
            path = child_path(path)  # the same route, checks and admission as without the prefix
            own_list = False  # the child's own list, not llamad's
        else:
            own_list = path in MODEL_LIST_PATHS
        route = route_label(path)
        content = request.content
        body = content.read() if content is not None else b""
        inference = route in INFERENCE_ROUTES
        key: ApiKey | None = getattr(request, "api_key", None)
        allowed = key.may_use if key is not None and key.models else None
        if self.router_api and (own_list or request.path in MODELS_API_ROUTES):
            self.models_api(request, route, body, allowed)
            return None
        if not inference:
            if own_list and allowed is not None and not allowed(self.status.model_id):
                self._answer_json(request, route, {"object": "list", "data": []})  # none of this key's
                return None
            runtime, uri = self.runtime_for(request, self._child_json(request.method, path, route, body), allowed)
            if own_list and not runtime.gate.ready:
                self._answer_json(request, route, self.model_list())
                return None
            proxied = ProxiedRequest(self, request, route, started, runtime, body, uri, None)
            proxied.target = runtime.gate.ready_target()
            return proxied
        if request.method != b"POST":
            raise ApiError(405, f"{route} takes POST", "method_not_allowed", {b"allow": b"POST"})
        payload = parse_json_object(body) if route in JSON_BODY_ROUTES else {}
        runtime, uri = self.runtime_for(request, payload if route in JSON_BODY_ROUTES else None, allowed)
        if key is not None and (key.tokens_per_minute is not None or key.tokens_per_day is not None):
            refusal = self.policy.quota_refusal(key)
            if refusal is not None:
                raise refusal
        changed, strip_usage = ask_for_usage(path, payload)
        if changed:
            try:
                body = json.dumps(payload).encode()
            except RecursionError:  # parsed just under the limit, this deeper stack is over it
                raise ApiError(400, "request body is not valid JSON: nested too deeply", "invalid_json") from None
        proxied = ProxiedRequest(self, request, route, started, runtime, body, uri, payload, strip_usage)
        if key is not None and key.max_concurrent is not None:
            proxied.key = key
            if not self.policy.enter(key):
                return proxied  # waits for one of the key's places first
            proxied.holds_key_place = True
        proxied.lease = runtime.gate.try_admit()  # a free slot and a ready child: no waiting
        return proxied

    @staticmethod
    def _child_json(method: bytes, path: bytes, route: str, body: bytes) -> dict[str, Any] | None:
        """The body of a POST that is not inference but that the child parses as JSON, checked as strictly
        as inference's (a 400 if not); its object routes the request.  None for every other request."""
        if method != b"POST":
            return None
        if route in CHILD_JSON_ROUTES:
            payload = parse_json(body) if route in JSON_ARRAY_ROUTES else parse_json_object(body)
        elif path.startswith(SLOTS_PREFIX) and body and not body.isspace():
            payload = parse_json_object(body)
        else:
            return None
        return payload if isinstance(payload, dict) else None

    async def _wait_then_relay(self, proxied: ProxiedRequest) -> None:
        """Admission when it has to wait (the key's places, a queue, a cold start), then the relay."""
        if proxied.inference and proxied.lease is None:
            try:
                await self._admit(proxied)
            except BaseException:
                proxied.leave_key()
                raise
            if proxied.lease is None:
                return  # refused inside a stream that had started
        await proxied.relay()

    async def _admit(self, proxied: ProxiedRequest) -> None:
        request, gate = proxied.request, proxied.runtime.gate
        if proxied.key is not None and not proxied.holds_key_place:
            await self._wait_for_key_place(proxied, proxied.key)
        loading: LoadingComments | None = None
        if proxied.payload is not None and proxied.payload.get("stream") is True and not gate.ready:
            loading = LoadingComments(self.clock, request)
        key: ApiKey | None = getattr(request, "api_key", None)
        try:
            proxied.lease = await gate.admit(self.policy.head_start(key), proxied.started)
        except ApiError as err:
            if loading is None or not loading.stop():
                raise
            loading.fail(err)  # the stream has started: the error goes in it
            proxied.leave_key()
            self.count(request, err.status, proxied.route, proxied)
        finally:
            proxied.sse_started = loading is not None and loading.stop()  # also when the client left

    async def _wait_for_key_place(self, proxied: ProxiedRequest, key: ApiKey) -> None:
        """Wait for one of the key's ``max_concurrent`` places, within the model's queue_timeout."""
        d = self.policy.wait(key)
        timeout = proxied.runtime.gate.queue_timeout
        if timeout > 0:
            d.addTimeout(max(0.0, proxied.started + timeout - self.clock.seconds()), self.clock)
        try:
            await d
        except defer.TimeoutError:
            raise ApiError(429, f"key {key.key_id} already has {key.max_concurrent} requests running "
                           f"(its max_concurrent), and this one waited {timeout:g} s", "concurrency_limit_exceeded",
                           {b"retry-after": b"1"}) from None
        proxied.holds_key_place = True

    def _answer_json(self, request: IRequest, route: str, answer: Any, status: int = 200) -> None:
        self.count(request, status, route)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(answer).encode())
        request.finish()

    def models_api(self, request: IRequest, route: str, body: bytes,
                   allowed: Callable[[str], bool] | None = None) -> None:
        """llama-server's router API for a fleet: list every model whatever its state (never waking
        one), and load or unload one (an unload waits for the model's requests; ``"force": true`` cuts them)."""
        fleet = self.status.fleet
        snapshots = [s for s in fleet.model_snapshots(int(self.status.booted_wall)) if allowed is None or allowed(s.id)]
        if request.path in MODEL_LIST_PATHS:
            if request.method not in (b"GET", b"HEAD"):
                raise ApiError(405, f"{route} takes GET", "method_not_allowed", {b"allow": b"GET, HEAD"})
            status, answer = 200, models_api.models_list(snapshots)
        elif request.method != b"POST":
            raise ApiError(405, f"{route} takes POST", "method_not_allowed", {b"allow": b"POST"})
        else:
            try:
                name = models_api.requested_model(body)
                force = request.path == b"/models/unload" and models_api.requested_force(body)
            except models_api.ModelsApiError as e:
                status, answer = e.answer()
            else:
                model = self.directory.names.get(name)
                snapshot = next((s for s in snapshots if s.id == model), None)  # another key's: not found
                if request.path == b"/models/load":
                    status, answer = models_api.load_answer(snapshot)
                    if status == 200 and model is not None:
                        fleet.load(model)
                else:
                    status, answer = models_api.unload_answer(snapshot)
                    if status == 200 and model is not None:
                        fleet.unload(model, force=force)
        self._answer_json(request, route, answer, status)

    def model_list(self) -> dict[str, Any]:
        """``/v1/models`` from the config, so listing models never wakes the child."""
        return {"object": "list", "data": [{"id": self.status.model_id, "object": "model",
                                            "created": int(self.status.booted_wall), "owned_by": "llamad"}]}


# llamad's own routes: each path and its endpoint in Klein's routing table.
OWN_ENDPOINTS: dict[bytes, str] = {rule.rule.encode(): rule.endpoint for rule in Gateway.app.url_map.iter_rules()}


class ProxiedRequest:
    """One request on its way through a child once admitted: the relay, a redelivery when the child
    died before getting any of it, and the accounting at the end, on plain callbacks."""

    # Defaults kept on the class: a request sets only what differs (one is made per request).
    lease: Lease | None = None
    target: Target | None = None
    sse_started = False  # llamad started the SSE response itself (cold start)
    tap: UsageTap | None = None
    pending: Relay | defer.Deferred[Any] | None = None  # the relay or the wait for a restarted child
    done: defer.Deferred[None] | None = None  # for a coroutine that awaits the end
    key: ApiKey | None = None  # set when the key limits its concurrent requests
    holds_key_place = False  # holds one of them
    resent = False  # sent once more after a child closed it unanswered
    first_byte_at: float | None = None

    def __init__(self, gateway: Gateway, request: IRequest, route: str, started: float, runtime: ModelRuntime,
                 body: bytes, uri: bytes, payload: dict[str, Any] | None, strip_usage: bool = False) -> None:
        self.gateway = gateway
        self.request = request
        self.route = route
        self.started = started
        self.runtime = runtime
        self.body = body
        self.uri = uri
        self.payload = payload  # an inference request's parsed body; None for other routes
        self.inference = payload is not None
        self.strip_usage = strip_usage

    def relay(self) -> defer.Deferred[None]:
        """:meth:`start`, as a Deferred that fires at the end; cancelling it cancels the relay."""
        self.done = defer.Deferred(lambda _: self.cancel())
        self.start()
        return self.done

    def start(self) -> None:
        lease = self.lease
        if lease is not None:
            if lease.cold_wait is not None:
                if self.sse_started:
                    self.request.write(b": cold-start %.3f\n\n" % lease.cold_wait)
                else:
                    self.request.setHeader(b"x-llamad-cold-start", b"%.3f" % lease.cold_wait)
            self.target = lease.target
        for activity in self._activities():
            activity.begin(self.inference)
        self._send()

    def cancel(self) -> None:
        """The client went away."""
        if self.pending is not None:
            self.pending.cancel()

    def _activities(self) -> tuple[Activity, ...]:
        everyone = self.gateway.activity
        return (everyone,) if self.runtime.activity is everyone else (everyone, self.runtime.activity)

    def _send(self) -> None:
        assert self.target is not None
        self.pending = self.gateway.proxy.relay(
            self.request, self.target, self.body, self, self._first_byte, self._tap_for if self.inference else None,
            self.sse_started, self.uri)

    def _tap_for(self, sse: bool) -> UsageTap:
        self.tap = UsageTap(sse, self.strip_usage)
        return self.tap

    def _first_byte(self) -> None:
        metrics = self.gateway.metrics
        self.first_byte_at = self.gateway.clock.seconds()
        metrics.by_route(metrics.time_to_first_byte, self.route, self.runtime.id).observe(
            self.first_byte_at - self.started)

    def leave_key(self) -> None:
        """Give back the key's place, once."""
        if self.holds_key_place:
            self.holds_key_place = False
            assert self.key is not None
            self.gateway.policy.leave(self.key)

    def access_line(self, key_id: str | None, route: str, code: int) -> bytes:
        gateway = self.gateway
        now = gateway.clock.seconds()
        tap, lease = self.tap, self.lease
        prompt, completion = tap.usage if tap is not None and tap.usage is not None else (0, 0)
        return access_line(gateway.wall(), key_id, self.runtime.id, route, code, prompt, completion,
                           now - self.started,
                           None if self.first_byte_at is None else self.first_byte_at - self.started,
                           None if lease is None else lease.queue_wait, None if lease is None else lease.cold_wait)

    def relayed(self) -> None:
        self.pending = None
        request = self.request
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()
        self._end(request.code)

    def not_relayed(self, failure: Failure) -> None:
        self.pending = None
        lease = self.lease
        # NotDelivered: the child died (or is restarting) and got none of this request.  Unanswered: it took
        # the request and closed unanswered, as a dying child does; once only: a request that meets two such
        # closes in a row fails with the reason (it may be what kills the child).  Either goes to the next child.
        unanswered = failure.check(Unanswered) is not None
        resend = failure.check(NotDelivered) is not None or (unanswered and self.inference and not self.resent)
        if resend and lease is not None and self.runtime.gate.can_redeliver(lease):
            if unanswered:
                self.resent = True
                log.info("backend closed {route} unanswered: sending it to the next child if this one exits",
                         route=self.route)
            else:
                log.info("backend unreachable before {route} was sent: waiting for its restart", route=self.route)
            d = self.pending = defer.ensureDeferred(
                self.runtime.gate.redeliver(lease, failure.value if unanswered else None))
            d.addCallbacks(self._redelivered, self.not_relayed)
            return
        request = self.request
        if failure.check(defer.CancelledError):
            self._end(CLIENT_CLOSED)
        elif failure.check(ApiError) and self.sse_started:
            # The SSE response has started: the 502/504 becomes its one error event.
            err = failure.value
            try:
                request.write(sse_error_event(err.message, err.code or "backend_unavailable"))
                request.finish()
            finally:
                self._end(err.status)
        else:
            self._finish_accounting()
            try:
                self.gateway._forward_failed(failure, request, self)
            finally:
                if self.done is not None:
                    self.done.callback(None)

    def _redelivered(self, _: object) -> None:
        assert self.lease is not None
        self.target = self.lease.target
        self._send()

    def _end(self, code: int) -> None:
        self._finish_accounting()
        self.gateway.count(self.request, code, self.route, self)
        if self.done is not None:
            self.done.callback(None)

    def _finish_accounting(self) -> None:
        """The slot, the key's place, activity, duration and tokens: everything but the count."""
        if self.lease is not None:
            self.lease.release()
        self.leave_key()
        for activity in self._activities():
            activity.end(self.inference)
        gateway = self.gateway
        metrics = gateway.metrics
        metrics.by_route(metrics.request_duration, self.route, self.runtime.id).observe(
            gateway.clock.seconds() - self.started)
        tap = self.tap
        if tap is not None:
            if tap.usage is None:
                tap.finish()  # the client left early (often right after [DONE]): count what was seen
            if tap.usage is not None:
                key: ApiKey | None = getattr(self.request, "api_key", None)
                metrics.count_tokens(*tap.usage, key.key_id if key is not None else "", self.runtime.id)
                if key is not None and (key.tokens_per_minute is not None or key.tokens_per_day is not None):
                    gateway.policy.record(key.key_id, tap.usage[0] + tap.usage[1])


class LoadingComments:
    """While a streaming request waits for a cold start, keep its connection alive.

    After ``LOADING_INTERVAL`` seconds the SSE response starts (200,
    ``text/event-stream``) and an SSE comment ``: loading`` goes out every
    ``LOADING_INTERVAL`` seconds, so proxies with idle timeouts keep the
    connection; SSE clients ignore comments.
    """

    def __init__(self, clock: IReactorTime, request: IRequest) -> None:
        self.clock = clock
        self.request = request
        self.sse_started = False
        self.call: IDelayedCall | None = clock.callLater(LOADING_INTERVAL, self._tick)

    def _tick(self) -> None:
        if not self.sse_started:
            self.sse_started = True
            self.request.setResponseCode(200)
            self.request.setHeader(b"content-type", b"text/event-stream")
            self.request.setHeader(b"cache-control", b"no-cache")
        self.request.write(b": loading\n\n")
        self.call = self.clock.callLater(LOADING_INTERVAL, self._tick)

    def stop(self) -> bool:
        """Stop ticking; True if the response has started."""
        self.call = cancel(self.call)
        return self.sse_started

    def fail(self, err: ApiError) -> None:
        self.request.write(sse_error_event(err.message, err.code or "backend_unavailable"))
        self.request.finish()


def api_factory(gateway: Gateway, max_body_bytes: int = 10485760, header_timeout: float = 10,
                body_timeout: float = 30, max_incomplete_per_client: int = 64, *, max_headers: int = 64,
                max_header_line: int = 8192, max_request_line: int = 8192,
                body_min_rate: float = BODY_MIN_RATE) -> FrontFactory:
    """Port 8000: llamad's HTTP/1.1 front in front of ``gateway``, with the ``[api]`` limits."""
    return FrontFactory(gateway, gateway.clock, max_body_bytes, header_timeout, body_timeout,
                        max_incomplete_per_client, max_headers=max_headers, max_header_line=max_header_line,
                        max_request_line=max_request_line, body_min_rate=body_min_rate)
