"""A small Kubernetes API client on treq: JSON requests with a bearer token, and watch streams.

No well-kept Twisted Kubernetes client exists (txkube is unmaintained), so
llamad keeps the few calls the poller needs.  The token is asked for on every
request, so a rotated service-account token is picked up.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import treq
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss


class ApiStatusError(Exception):
    """A non-2xx answer from the API server; ``code`` is the HTTP status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Gone(ApiStatusError):
    """410: the resourceVersion is too old; list again."""


class KubeClient:
    def __init__(self, http: treq.HTTPClient, server: str, token: Callable[[], str | None]) -> None:
        self.http = http
        self.server = server.rstrip("/")
        self.token = token

    def _headers(self, content_type: str = "application/json") -> dict[str, str]:
        headers = {"accept": "application/json", "content-type": content_type}
        token = self.token()
        if token:
            headers["authorization"] = f"Bearer {token}"
        return headers

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None,
                      body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        response = await self.http.request(method, self.server + path, params=dict(params or {}),
                                           headers=self._headers(content_type), data=data)
        payload = await response.content()
        try:
            parsed = json.loads(payload) if payload else {}
        except ValueError:
            parsed = {"message": payload[:200].decode("utf-8", "replace")}
        if response.code >= 300:
            error = Gone if response.code == 410 else ApiStatusError
            raise error(response.code, str(parsed.get("message", "")))
        return dict(parsed)

    async def watch(self, path: str, resource_version: str,
                    on_event: Callable[[str, dict[str, Any]], None]) -> None:
        """Stream watch events to ``on_event(type, object)`` until the server ends the stream.

        An ``ERROR`` event with code 410 raises :class:`Gone`.
        """
        params = {"watch": "1", "resourceVersion": resource_version, "allowWatchBookmarks": "true"}
        response = await self.http.get(self.server + path, params=params, headers=self._headers())
        if response.code >= 300:
            payload = await response.content()
            error = Gone if response.code == 410 else ApiStatusError
            raise error(response.code, payload[:200].decode("utf-8", "replace"))
        buffer = b""
        failure: list[Exception] = []

        def collect(data: bytes) -> None:
            nonlocal buffer
            if failure:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type", ""), event.get("object") or {}
                if kind == "ERROR":
                    code = int(obj.get("code", 500))
                    failure.append((Gone if code == 410 else ApiStatusError)(code, str(obj.get("message", ""))))
                    return
                on_event(kind, obj)

        try:
            await treq.collect(response, collect)
        except (ResponseFailed, PotentialDataLoss):
            pass  # the stream broke: a watch that ended, to be resumed from the last resourceVersion
        if failure:
            raise failure[0]
