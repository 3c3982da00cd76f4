"""Every error answered on port 8000, llamad's own and the backend's, in OpenAI's error shape, built in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from twisted.web.iweb import IRequest

# status -> (OpenAI error type, default code); 413 and 431 use llama-gguf-inference's codes, so its clients match.
_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    431: ("invalid_request_error", "header_fields_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "backend_unreachable"),
    503: ("server_error", "backend_unavailable"),
    504: ("server_error", "backend_timeout"),
}


@dataclass
class ApiError(Exception):
    """Raised anywhere in the gateway; rendered by :func:`write_error`."""

    status: int
    message: str
    code: str = ""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    param: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def error_body(status: int, message: str, code: str = "", param: str | None = None) -> dict[str, object]:
    kind, default_code = _TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", ""))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code or None}}


def backend_error_body(status: int, body: bytes) -> bytes:
    """A backend's JSON error answer in the shape of llamad's own, so that a client reads one shape.

    llama-server writes ``{"error": {"code": 400, "message": ..., "type": ...}}``,
    its ``code`` the HTTP status once more.  Its message, type and other fields
    (``n_prompt_tokens`` and ``n_ctx`` of an ``exceed_context_size_error``) are
    kept; ``code`` becomes a string: one the backend sent as a string, else its
    ``type``, the most precise name it gives (without one, OpenAI's type for the
    status); ``param`` is null unless the backend named one.  A body of another
    shape becomes the message.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        message = error if isinstance(error, str) else payload.get("message") if isinstance(payload, dict) else None
        error = {"message": message}
    shaped = error_body(status, "")["error"]
    message = error.get("message")
    if isinstance(message, str) and message:
        shaped["message"] = message
    else:
        shaped["message"] = body.decode("utf-8", "replace")[:500] or f"backend answered {status}"
    kind, code, param = error.get("type"), error.get("code"), error.get("param")
    if isinstance(kind, str) and kind:
        shaped["type"] = kind
    shaped["param"] = param if isinstance(param, str) else None
    shaped["code"] = code if isinstance(code, str) and code else shaped["type"]
    for name, value in error.items():
        shaped.setdefault(name, value)
    return json.dumps({"error": shaped}).encode()


def write_error(request: IRequest, err: ApiError) -> bytes:
    """Set status and headers for ``err``; return the body to write."""
    body = json.dumps(error_body(err.status, err.message, err.code, err.param)).encode()
    request.setResponseCode(err.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    for name, value in err.headers.items():
        request.setHeader(name, value)
    return body


def sse_error_event(message: str, code: str = "stream_interrupted") -> bytes:
    """The one event written when a started stream fails: never a second status line."""
    body = error_body(502, message, code)
    return b"data: " + json.dumps(body).encode() + b"\n\n"
