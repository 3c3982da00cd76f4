"""The guard in front of every API route: API keys, path sanity, methods, bodies and CORS."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest
from wire import build, json_of

from llamad.gateway.guard import OWN_METHODS, Auth, Cors, Guard

KEY = "k" * 24
NEW_KEY = "n" * 24
CHAT = "http://x/v1/chat/completions"
OPENAI_401_KEYS = {"message", "type", "param", "code"}


def keys_file(tmp_path, *lines: str) -> str:
    path = tmp_path / "api_keys"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def gateway(tmp_path, *lines: str, protect_metrics: bool = False, origins: tuple[str, ...] = (),
            enabled: bool = True, keys: str | None = None):
    path = keys if keys is not None else keys_file(tmp_path, *lines)
    return build(auth=Auth(enabled, path, protect_metrics, Clock()), cors=Cors(origins))


def bearer(key: str = KEY) -> dict:
    return {"authorization": [f"Bearer {key}"]}


def reloaded(keys: int) -> dict:
    """A reload's answer: llamad's fields, and llama-gguf-inference's for the same."""
    return {"reloaded": True, "keys": keys, "status": "ok", "keys_loaded": keys}


# --- API keys ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ping_and_health_need_no_key(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    assert (await http.get("http://x/ping")).code == 200
    assert (await http.get("http://x/health")).code == 200


@pytest_twisted.ensureDeferred
async def test_inference_without_key_is_the_openai_401(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.post(CHAT, data=b"{}")
    assert response.code == 401
    body = await json_of(response)
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_401_KEYS
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "authorization" and body["error"]["code"] == "invalid_api_key"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert proxy.targets == []


@pytest_twisted.ensureDeferred
async def test_wrong_key_is_401_invalid_api_key(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))
    assert response.code == 401 and (await json_of(response))["error"]["message"] == "Invalid API key"
    assert proxy.targets == []


@pytest.mark.parametrize("headers", [bearer(), {"authorization": [f"bearer {KEY}"]}, {"x-api-key": [KEY]}])
@pytest_twisted.ensureDeferred
async def test_a_valid_key_in_either_header_reaches_the_proxy(tmp_path, headers):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.post(CHAT, data=b"{}", headers=headers)
    assert response.code == 200 and await json_of(response) == {"proxied": True}
    assert len(proxy.targets) == 1


@pytest_twisted.ensureDeferred
async def test_rate_limited_key_is_429_with_retry_after(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}:1")
    assert (await http.post(CHAT, data=b"{}", headers=bearer())).code == 200
    response = await http.post(CHAT, data=b"{}", headers=bearer())
    assert response.code == 429 and response.headers.getRawHeaders(b"retry-after") == [b"60"]
    assert (await json_of(response))["error"]["type"] == "rate_limit_error"
    assert len(proxy.targets) == 1


@pytest.mark.parametrize("protect, code", [(False, 200), (True, 401)])
@pytest_twisted.ensureDeferred
async def test_metrics_is_public_unless_protected(tmp_path, protect, code):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}", protect_metrics=protect)
    assert (await http.get("http://x/metrics")).code == code
    assert (await http.get("http://x/metrics", headers=bearer())).code == 200


@pytest.mark.parametrize("content", [None, "", "# only a comment\nbroken line\n"])
@pytest_twisted.ensureDeferred
async def test_enabled_without_valid_keys_fails_closed(tmp_path, content):
    path = tmp_path / "api_keys"
    if content is not None:
        path.write_text(content)
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, keys=str(path), protect_metrics=True)
    for method, url in [("POST", CHAT), ("GET", "http://x/v1/models"), ("GET", "http://x/metrics"),
                        ("POST", "http://x/admin/reload"), ("GET", "http://x/slots")]:
        assert (await http.request(method, url, data=b"{}", headers=bearer())).code == 401, url
    assert (await http.get("http://x/ping")).code == 200
    assert proxy.targets == []


@pytest_twisted.ensureDeferred
async def test_auth_disabled_needs_no_key(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, enabled=False, protect_metrics=True)
    assert (await http.post(CHAT, data=b"{}")).code == 200
    assert (await http.get("http://x/metrics")).code == 200


@pytest_twisted.ensureDeferred
async def test_admin_reload_needs_a_key_and_loads_new_keys(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    keys_file(tmp_path, f"alice:{KEY}", f"bob:{NEW_KEY}")
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 401
    assert (await http.post("http://x/admin/reload")).code == 401
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 401  # not reloaded
    response = await http.post("http://x/admin/reload", headers=bearer())
    assert response.code == 200 and await json_of(response) == reloaded(2)
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 200
    assert proxy.targets != []


@pytest_twisted.ensureDeferred
async def test_reload_is_admin_reload_under_llama_gguf_inference_path(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    keys_file(tmp_path, f"alice:{KEY}", f"bob:{NEW_KEY}")
    assert (await http.post("http://x/reload")).code == 401
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 401  # not reloaded
    response = await http.post("http://x/reload", headers=bearer())
    assert response.code == 200 and await json_of(response) == reloaded(2)
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 200
    get = await http.get("http://x/reload", headers=bearer())
    assert get.code == 405 and get.headers.getRawHeaders(b"allow") == [b"POST"]
    text = metrics.exposition().decode()
    assert 'llamad_requests_total{code="200",method="POST",model="-",route="/reload"} 1.0' in text
    assert 'route="other"' not in text
    assert len(proxy.targets) == 1  # the chat request only: /reload is llamad's, never the child's


@pytest.fixture
def remote_client(monkeypatch):
    """Requests that treq's in-memory client makes arrive from 10.1.2.3, not from loopback."""
    from twisted.internet.address import IPv4Address

    from llamad.gateway.front import FrontRequest

    monkeypatch.setattr(FrontRequest, "getClientAddress", lambda self: IPv4Address("TCP", "10.1.2.3", 40000))


@pytest.mark.parametrize("path", ["/admin/reload", "/reload", "/admin/restart"])
@pytest_twisted.ensureDeferred
async def test_with_auth_off_admin_routes_refuse_a_remote_client_with_json_403(tmp_path, remote_client, path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, enabled=False)
    response = await http.post(f"http://x{path}")
    assert response.code == 403
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    error = (await json_of(response))["error"]
    assert error["code"] == "forbidden"
    assert error["message"] == f"POST {path} needs auth.enabled, or a request from loopback"
    assert proxy.targets == [] and backend.start_requests == 0


@pytest.mark.parametrize("path", ["/admin/reload", "/reload"])
@pytest_twisted.ensureDeferred
async def test_with_auth_off_reload_answers_loopback_with_any_or_no_key(tmp_path, path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, enabled=False)
    for headers in ({}, bearer("whatever-it-is-123")):
        response = await http.post(f"http://x{path}", headers=headers)
        assert response.code == 200 and await json_of(response) == reloaded(0)


@pytest.mark.parametrize("path", ["/admin/reload", "/reload"])
@pytest_twisted.ensureDeferred
async def test_with_auth_on_a_remote_client_reloads_with_a_valid_key(tmp_path, remote_client, path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    assert (await http.post(f"http://x{path}")).code == 401
    response = await http.post(f"http://x{path}", headers=bearer())
    assert response.code == 200 and await json_of(response) == reloaded(1)


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.1.2.3", False), ("::ffff:10.1.2.3", False), ("2001:db8::1", False), ("", False), ("localhost", False),
])
def test_is_loopback(host, local):
    from llamad.gateway.guard import is_loopback

    assert is_loopback(host) is local


# --- paths and methods -------------------------------------------------------------


TRICKS = [
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/../admin/reload",
    "/v1/%2e%2e/admin/reload",
    "/v1/%2E%2E/admin/reload",
    "/v1%2fchat%2fcompletions",
    "/v1/./models",
    "/v1/chat/completions/.",
    "/ping/../v1/chat/completions",
    "/health/%2e%2e/admin/reload",
    "/v1\\chat\\completions",
]


@pytest.mark.parametrize("path", TRICKS)
@pytest.mark.parametrize("with_key", [False, True])
@pytest_twisted.ensureDeferred
async def test_path_tricks_never_bypass_auth_nor_reach_the_proxy(tmp_path, path, with_key):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    keys_file(tmp_path, f"alice:{KEY}", f"bob:{NEW_KEY}")  # a reload would let bob in
    response = await http.post("http://x" + path, data=b"{}", headers=bearer() if with_key else {})
    assert response.code in (400, 401)
    assert (await json_of(response))["error"]["type"] == "invalid_request_error"
    assert proxy.targets == []
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 401


@pytest.mark.parametrize("uri", [b"/v1\\..\\admin/reload", b"/v1/chat\\completions", b"http://x/v1/models"])
def test_raw_backslashes_and_absolute_uris_are_refused_before_auth(tmp_path, uri):
    """The guard's own check, for any request that reached it (the front refuses an absolute URI first)."""
    auth = Auth(True, keys_file(tmp_path, f"alice:{KEY}"), False, Clock())
    rejected = []
    guard = Guard(auth, Cors(()), lambda request, code: rejected.append(code))
    request = DummyRequest([])
    request.method, request.uri = b"POST", uri
    request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {KEY}".encode()])
    body = guard.answer(request)  # None: the request would go on to a route or the proxy
    assert body is not None and request.responseCode == 400
    assert json.loads(body)["error"]["code"] == "invalid_path"
    assert rejected == [400] and auth.authenticated == 0  # refused before the key was looked at
    assert guard.early_refusal(b"POST", uri, request).code == "invalid_path"  # before a body, the same


@pytest_twisted.ensureDeferred
async def test_get_on_an_inference_route_is_405_with_allow(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.get(CHAT, headers=bearer())
    assert response.code == 405 and response.headers.getRawHeaders(b"allow") == [b"POST"]
    assert (await json_of(response))["error"]["code"] == "method_not_allowed"
    assert proxy.targets == []


@pytest.mark.parametrize("method, url, allow", [
    ("POST", "http://x/ping", b"GET, HEAD"),
    ("DELETE", "http://x/health", b"GET, HEAD"),
    ("OPTIONS", "http://x/ping", b"GET, HEAD"),
    ("PUT", "http://x/metrics", b"GET, HEAD"),
    ("GET", "http://x/admin/reload", b"POST"),
    ("DELETE", "http://x/admin/restart", b"POST"),
])
@pytest_twisted.ensureDeferred
async def test_own_routes_answer_a_method_they_do_not_take_with_json_405(tmp_path, method, url, allow):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.request(method, url, headers=bearer())
    assert response.code == 405 and response.headers.getRawHeaders(b"allow") == [allow]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    error = (await json_of(response))["error"]
    assert error["code"] == "method_not_allowed" and error["type"] == "invalid_request_error"
    assert proxy.targets == [] and backend.start_requests == 0


def test_the_guard_knows_the_methods_of_llamads_own_routes():
    read = {b"GET", b"HEAD"}
    assert OWN_METHODS == {b"/ping": read, b"/health": read, b"/metrics": read,
                           b"/admin/reload": {b"POST"}, b"/reload": {b"POST"}, b"/admin/restart": {b"POST"},
                           b"/ui": read, b"/ui/": read, b"/ui/app.js": read, b"/ui/style.css": read,
                           b"/admin/status": read, b"/admin/logs": read, b"/admin/requests": read, b"/admin/keys": read}


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND"])
@pytest_twisted.ensureDeferred
async def test_unknown_methods_are_405_with_allow(tmp_path, method):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.request(method, "http://x/", headers=bearer())
    assert response.code == 405
    allow = response.headers.getRawHeaders(b"allow")[0]
    assert b"POST" in allow and method.encode() not in allow
    assert proxy.targets == []


# --- bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"", b"   ", b'"text"', b"\xff\xfe", b'{"a": '])
@pytest_twisted.ensureDeferred
async def test_inference_body_must_be_a_json_object(tmp_path, body):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.post(CHAT, data=body, headers=bearer())
    assert response.code == 400
    error = (await json_of(response))["error"]
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
    assert proxy.targets == []


# --- CORS ------------------------------------------------------------------------------


PREFLIGHT = {
    "origin": ["https://a.example"],
    "access-control-request-method": ["POST"],
    "access-control-request-headers": ["authorization, content-type, x-stainless-os, x-stainless-retry-count"],
}


def header(response, name: bytes) -> bytes | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


@pytest_twisted.ensureDeferred
async def test_preflight_from_an_allowed_origin_is_204(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}", origins=("https://a.example",))
    response = await http.request("OPTIONS", CHAT, headers=PREFLIGHT)
    assert response.code == 204
    assert header(response, b"access-control-allow-origin") == b"https://a.example"
    assert b"POST" in header(response, b"access-control-allow-methods")
    allowed = {h.strip().lower() for h in header(response, b"access-control-allow-headers").split(b",")}
    assert {b"authorization", b"content-type", b"x-stainless-os", b"x-stainless-retry-count"} <= allowed
    assert proxy.targets == []


@pytest_twisted.ensureDeferred
async def test_preflight_from_another_origin_is_403(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}", origins=("https://a.example",))
    response = await http.request("OPTIONS", CHAT, headers={**PREFLIGHT, "origin": ["https://evil.example"]})
    assert response.code == 403
    assert header(response, b"access-control-allow-origin") is None
    assert proxy.targets == []


@pytest_twisted.ensureDeferred
async def test_every_response_to_an_allowed_origin_carries_cors_headers(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}", origins=("https://a.example",))
    origin = {"origin": ["https://a.example"]}
    cases = [
        ("POST", CHAT, bearer(), b"{}", 200),
        ("POST", CHAT, {}, b"{}", 401),
        ("POST", CHAT, bearer(), b"[]", 400),
        ("GET", CHAT, bearer(), None, 405),
        ("GET", "http://x//v1/models", bearer(), None, 400),
        ("TRACE", "http://x/", {}, None, 405),
        ("GET", "http://x/ping", {}, None, 200),
    ]
    for method, url, headers, data, code in cases:
        response = await http.request(method, url, headers={**origin, **headers}, data=data)
        assert response.code == code, (method, url)
        assert header(response, b"access-control-allow-origin") == b"https://a.example", (method, url)
        assert b"retry-after" in header(response, b"access-control-expose-headers")


@pytest_twisted.ensureDeferred
async def test_star_allows_any_origin(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}", origins=("*",))
    headers = {"origin": ["https://anything.example"]}
    assert header(await http.post(CHAT, data=b"{}", headers=headers), b"access-control-allow-origin") == b"*"
    preflight = await http.request("OPTIONS", CHAT, headers={**PREFLIGHT, **headers})
    assert preflight.code == 204 and header(preflight, b"access-control-allow-origin") == b"*"


@pytest_twisted.ensureDeferred
async def test_no_cors_headers_when_cors_is_off(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    for headers in ({"origin": ["https://a.example"]}, {**bearer(), "origin": ["https://a.example"]}):
        response = await http.post(CHAT, data=b"{}", headers=headers)
        assert header(response, b"access-control-allow-origin") is None
    response = await http.request("OPTIONS", CHAT, headers=PREFLIGHT)
    assert response.code != 204 and header(response, b"access-control-allow-origin") is None


@pytest_twisted.ensureDeferred
async def test_percent_encoded_inference_route_is_not_a_way_around_the_gate(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    response = await http.post("http://x/v1/chat/complet%69ons", data=b"not json", headers=bearer())
    assert response.code == 400
    assert proxy.targets == []


# --- reloading a keys file that is not all UTF-8, or cannot be read ---------------------


@pytest_twisted.ensureDeferred
async def test_admin_reload_of_a_file_with_a_bad_byte_loads_the_other_lines(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}", f"bob:{NEW_KEY}")
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 200
    (tmp_path / "api_keys").write_bytes(f"alice:{KEY}\n# bob left \xe9\n".encode("latin-1"))
    response = await http.post("http://x/admin/reload", headers=bearer())
    assert response.code == 200 and await json_of(response) == reloaded(1)
    assert (await http.post(CHAT, data=b"{}", headers=bearer(NEW_KEY))).code == 401  # revoked
    assert (await http.post(CHAT, data=b"{}", headers=bearer())).code == 200


@pytest_twisted.ensureDeferred
async def test_admin_reload_of_an_unreadable_file_is_json_and_fails_closed(tmp_path):
    http, clock, backend, status, metrics, proxy = gateway(tmp_path, f"alice:{KEY}")
    path = tmp_path / "api_keys"
    path.unlink()
    path.mkdir()
    response = await http.post("http://x/admin/reload", headers=bearer())
    assert response.code == 500
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    error = (await json_of(response))["error"]
    assert error["code"] == "keys_file_unreadable" and "Is a directory" in error["message"]
    assert (await http.post(CHAT, data=b"{}", headers=bearer())).code == 401  # no key is valid now
    assert proxy.targets == []


def test_a_sighup_reload_of_an_unreadable_file_does_not_raise_and_fails_closed(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(f"alice:{KEY}\n")
    auth = Auth(True, str(path), False, Clock())
    assert len(auth.store) == 1
    path.unlink()
    path.mkdir()
    assert auth.reload() == 0 and len(auth.store) == 0
