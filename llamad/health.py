"""The health site (port 8001): answered from memory, never from the child.

A plain ``twisted.web`` resource rather than Klein: a few fixed paths, and the
platform polls it often, so it should cost as little as possible.  Any other
GET path is answered as ``/ping``: platforms set up for llama-gguf-inference
(whose health port took any path) may poll ``/health`` or another path here.
"""

from __future__ import annotations

import json

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llamad.status import Status


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, status: Status, ping_mode: str) -> None:
        super().__init__()
        self.status = status
        self.ping_mode = ping_mode

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        path = request.path
        if path == b"/livez":
            return _json(request, 200, {"status": "alive"})
        if path == b"/readyz":
            ready, reason = self.status.readiness()
            body = {"status": "ready"} if ready else {"status": "unavailable", "reason": reason}
            return _json(request, 200 if ready else 503, {**body, "state": self.status.snapshot()["state"]})
        request.setResponseCode(self.status.ping_code(self.ping_mode))  # /ping, / and every other path
        return b""


def _json(request: Request, code: int, body: dict[str, object]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


class QuietSite(Site):
    """No access log (metrics count requests, and health polls would flood it)."""

    noisy = False
    displayTracebacks = False

    def log(self, request: object) -> None:
        pass


def health_site(status: Status, ping_mode: str) -> Site:
    return QuietSite(HealthResource(status, ping_mode))
