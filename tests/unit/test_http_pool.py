"""llamad's HTTP clients open connections without logging each one: a KV cache save or restore, or a
Kubernetes call, adds no "Starting factory" lines to the log."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server

from llamad.kv.http import child_http


class Slots(resource.Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'[{"id": 0}]'


@pytest_twisted.ensureDeferred
async def test_the_slot_api_client_logs_no_connection_lines() -> None:
    site = server.Site(Slots())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        get, post = child_http(reactor, "key")
        assert await get(port.getHost().port, b"/slots", 5.0) == (200, b'[{"id": 0}]')
        code, _ = await post(port.getHost().port, b"/slots/0?action=save", {"filename": "f"}, 5.0)
        assert code == 200
    finally:
        globalLogPublisher.removeObserver(observe)
        await port.stopListening()
    assert not [line for line in lines if "factory" in line.lower()], lines
