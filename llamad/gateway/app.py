"""The Klein app on port 8000: llamad's own routes, and everything else proxied."""

from __future__ import annotations

import json

from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from llamad.activity import Activity
from llamad.gateway.errors import ApiError, write_error
from llamad.gateway.gate import Gate
from llamad.gateway.proxy import Proxy
from llamad.health import QuietSite
from llamad.metrics import Metrics
from llamad.status import Status

log = Logger(namespace="llamad.gateway")

# Routes counted under their own label; anything else is "other" (bounded cardinality).
KNOWN_ROUTES = frozenset(
    {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/rerank",
        "/chat/completions", "/completions", "/completion", "/embedding", "/embeddings", "/infill",
        "/rerank", "/reranking", "/tokenize", "/detokenize", "/apply-template", "/props", "/slots",
        "/models", "/lora-adapters", "/health", "/ping", "/metrics",
    }
)
CHILD_METRICS_TIMEOUT = 2.0
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"


def route_label(path: bytes) -> str:
    text = path.decode("latin-1")
    return text if text in KNOWN_ROUTES else "other"


class Gateway:
    app = Klein()

    def __init__(
        self,
        clock: IReactorTime,
        status: Status,
        gate: Gate,
        proxy: Proxy,
        metrics: Metrics,
        agent: client.Agent,
        activity: Activity,
    ) -> None:
        self.clock = clock
        self.status = status
        self.gate = gate
        self.proxy = proxy
        self.metrics = metrics
        self.agent = agent
        self.activity = activity

    def _count(self, request: IRequest, route: str, code: int) -> None:
        self.metrics.requests.labels(route, request.method.decode("latin-1"), str(code)).inc()

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        self._count(request, route_label(request.path), err.status)
        return write_error(request, err)

    @app.route("/ping", methods=["GET", "HEAD"])
    def ping(self, request: IRequest) -> bytes:
        self._count(request, "/ping", 200)
        return b""

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        body = self.status.snapshot()
        code = 200 if body["status"] == "ok" else 503
        self._count(request, "/health", code)
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    @app.route("/metrics", methods=["GET", "HEAD"])
    async def metrics_route(self, request: IRequest) -> bytes:
        self._count(request, "/metrics", 200)
        text = self.metrics.exposition()
        target = self.gate.current_target()
        if target is not None and self.status.backend_has_metrics:
            text += await self._child_metrics(target.origin, target.key)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return text

    async def _child_metrics(self, origin: bytes, key: str) -> bytes:
        """The child's ``llamacpp:*`` metrics, or nothing if it cannot answer quickly."""
        headers = Headers({b"authorization": [b"Bearer " + key.encode()]})
        d = self.agent.request(b"GET", origin + b"/metrics", headers)
        d.addTimeout(CHILD_METRICS_TIMEOUT, self.clock)
        try:
            response = await d
            body: bytes = await client.readBody(response)
        except Exception as e:  # the child's metrics are a bonus, never an error
            log.debug("child metrics unavailable: {e}", e=e)
            return b""
        return body if response.code == 200 else b""

    @app.route("/", branch=True, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    def forward(self, request: IRequest) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._forward(request))

    async def _forward(self, request: IRequest) -> None:
        started = self.clock.seconds()
        route = route_label(request.path)
        body = request.content.read() if request.content is not None else b""
        target = await self.gate.acquire()

        def first_byte() -> None:
            self.metrics.time_to_first_byte.labels(route).observe(self.clock.seconds() - started)

        self.metrics.in_flight.inc()
        self.activity.begin()
        try:
            await self.proxy.forward(request, target, body, first_byte)
        except defer.CancelledError:
            self._count(request, route, CLIENT_CLOSED)
            raise
        else:
            self._count(request, route, request.code)
        finally:
            self.activity.end()
            self.metrics.in_flight.dec()
            self.metrics.request_duration.labels(route).observe(self.clock.seconds() - started)


def api_site(gateway: Gateway) -> Site:
    return QuietSite(gateway.app.resource())
