"""The status page on port 8000, in memory: its files (no key, a strict CSP), and the admin routes it reads
(the admin role with auth on, loopback with auth off), none of which wakes a model or names a file."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBackend, FakeProxy
from twisted.internet import defer
from twisted.internet.task import Clock
from wire import connect, make_gateway, parse, server

from llamad.activity import Activity
from llamad.fleet.fleet import Fleet, FleetBackend
from llamad.fleet.gate import Gate
from llamad.fleet.runtime import ModelRuntime
from llamad.gateway.app import Gateway
from llamad.gateway.page import PAGE_POLICY, RECENT_REQUESTS
from llamad.gateway.guard import Auth
from llamad.gateway.routing import ModelDirectory
from llamad.logs import LogWriter, model_log
from llamad.metrics import Metrics
from llamad.status import Status
from llamad.supervisor import State

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # a logged failure fails the test

ADMIN, INFER = "admin-key-0123456789ab", "infer-key-0123456789ab"
KEYS = f"""
[keys.ops]
key = "{ADMIN}"
role = "admin"

[keys.app]
key = "{INFER}"
role = "inference"
models = ["alpha"]
tokens_per_minute = 1000
max_concurrent = 2
"""
PAGE = ["/ui", "/ui/", "/ui/app.js", "/ui/style.css"]
DATA = ["/admin/status", "/admin/logs", "/admin/requests", "/admin/keys"]


def auth(tmp_path: Path, enabled: bool = True) -> Auth:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return Auth(enabled, str(path), False, Clock())


def get(gateway: Gateway, target: str, key: str | None = None, host: str = "127.0.0.1", method: str = "GET"):
    """One request from ``host`` on a fresh connection: the response."""
    protocol, transport = connect(server(gateway), host=host)
    headers = f"Authorization: Bearer {key}\r\n" if key else ""
    protocol.dataReceived(f"{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    [response] = parse(transport.value(), head_request=method == "HEAD")
    return response


def body_of(response) -> Any:
    assert response.headers[b"content-type"] == b"application/json", response
    return json.loads(response.body)


def in_line(gateway: Gateway) -> list[tuple[Any, ...]]:
    """Run the gateway's thread work at once (recorded), so an in-memory test needs no thread pool."""
    calls: list[tuple[Any, ...]] = []

    def run(f: Any, *args: Any) -> defer.Deferred[Any]:
        calls.append((f, *args))
        return defer.succeed(f(*args))

    gateway.in_thread = run  # type: ignore[method-assign]
    return calls


def fleet_gateway(tmp_path: Path, enabled: bool = True) -> tuple[Gateway, Fleet]:
    """Two models in a real Fleet (a budget of 8 GiB), the second one with an alias that is markup."""
    clock = Clock()
    metrics = Metrics()
    fleet = Fleet(clock, 8 << 30)
    status = Status(clock, None, "", lazy=True)
    status.fleet = fleet
    models = {}
    for model_id, state in (("alpha", State.READY), ("beta", State.STOPPED)):
        backend = FakeBackend(state, model_id=model_id)
        gate = Gate(clock, status, FleetBackend(backend, fleet, model_id), 4, 8, 10, metrics)
        runtime = models[model_id] = ModelRuntime(model_id, backend, gate, Activity(clock))
        fleet.add(runtime, 1 << 30)
    aliases = {"beta": ["<script>alert(1)</script>"]}
    gateway = Gateway(clock, status, models, FakeProxy(), metrics, Activity(clock), auth(tmp_path, enabled),
                      directory=ModelDirectory(list(models), aliases))
    return gateway, fleet


# --- the page's files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path, kind", [("/ui", b"text/html"), ("/ui/", b"text/html"),
                                        ("/ui/app.js", b"text/javascript"), ("/ui/style.css", b"text/css")])
def test_the_pages_files_need_no_key_and_carry_a_strict_policy(tmp_path, path, kind):
    gateway = make_gateway(auth=auth(tmp_path))
    for host in ("127.0.0.1", "10.1.2.3"):
        response = get(gateway, path, host=host)
        assert response.status == 200 and response.headers[b"content-type"].startswith(kind)
        assert response.headers[b"content-security-policy"] == PAGE_POLICY
        assert response.headers[b"x-content-type-options"] == b"nosniff"
        assert response.body and gateway.proxy.targets == []
    head = get(gateway, path, method="HEAD")
    assert head.status == 200 and int(head.headers[b"content-length"]) == len(response.body)


def test_the_policy_allows_only_the_pages_own_files():
    policy = dict(part.strip().split(" ", 1) for part in PAGE_POLICY.decode().split(";"))
    assert policy == {"default-src": "'self'", "script-src": "'self'", "style-src": "'self'",
                      "connect-src": "'self'", "img-src": "'self' data:", "frame-ancestors": "'none'",
                      "base-uri": "'none'", "form-action": "'none'"}


def test_the_page_has_no_inline_script_or_style_and_puts_text_in_as_text(tmp_path):
    gateway = make_gateway()
    page = get(gateway, "/ui/").body.decode()
    script = get(gateway, "/ui/app.js").body.decode()
    assert "<script>" not in page and "<style" not in page and not re.search(r"\s(on\w+|style)=", page)
    assert 'src="/ui/app.js"' in page and 'href="/ui/style.css"' in page
    assert "http://" not in page + script and "https://" not in page + script
    for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert unsafe not in script, unsafe
    assert "textContent" in script and 'credentials: "omit"' in script and "sessionStorage" in script


def test_a_method_the_files_do_not_take_is_405(tmp_path):
    response = get(make_gateway(auth=auth(tmp_path)), "/ui/", method="POST")
    assert response.status == 405 and response.headers[b"allow"] == b"GET, HEAD"


# --- who may read the data ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", DATA)
def test_with_auth_on_the_data_needs_a_key_with_the_admin_role(tmp_path, path):
    gateway = make_gateway(auth=auth(tmp_path))
    assert body_of(get(gateway, path))["error"]["code"] == "invalid_api_key"
    refused = get(gateway, path, INFER)
    assert refused.status == 403 and body_of(refused)["error"]["code"] == "insufficient_role"
    for host in ("127.0.0.1", "10.1.2.3"):
        response = get(gateway, path, ADMIN, host=host)
        assert response.status == 200 and response.headers[b"cache-control"] == b"no-store", body_of(response)
    assert gateway.proxy.targets == []


@pytest.mark.parametrize("path", DATA)
def test_with_auth_off_the_data_answers_loopback_only(tmp_path, path):
    gateway = make_gateway()
    assert get(gateway, path, host="127.0.0.1").status == 200
    assert get(gateway, path, host="::1").status == 200
    refused = get(gateway, path, host="10.1.2.3")
    assert refused.status == 403 and body_of(refused)["error"]["code"] == "forbidden"
    assert body_of(refused)["error"]["message"] == f"GET {path} needs auth.enabled, or a request from loopback"


# --- /admin/status -----------------------------------------------------------------------------------


def test_status_of_one_model_is_health_with_a_models_map(tmp_path):
    gateway = make_gateway()
    body = body_of(get(gateway, "/admin/status"))
    assert body["status"] == "ok" and body["model"] == "demo" and body["backend"]["state"] == "ready"
    assert set(body["models"]) == {"demo"} and body["router"] is False and body["budget"] is None
    entry = body["models"]["demo"]
    assert entry["state"] == "ready" and entry["in_flight"] == 0 and entry["queued"] == 0
    assert entry["aliases"] == [] and entry["idle_seconds"] == 0 and body["auth"] is False


def test_status_of_a_fleet_has_every_model_the_budget_and_the_aliases(tmp_path):
    gateway, fleet = fleet_gateway(tmp_path)
    body = body_of(get(gateway, "/admin/status", ADMIN))
    assert body["state"] == "fleet" and body["router"] is True and body["budget"] == 8 << 30
    assert body["fleet"]["budget"] == 8 << 30
    assert {model_id: entry["state"] for model_id, entry in body["models"].items()} == {
        "alpha": "ready", "beta": "stopped"}
    assert body["models"]["beta"]["aliases"] == ["<script>alert(1)</script>"]
    assert body["models"]["alpha"]["memory"] == 1 << 30
    assert all(backend.start_requests == 0 for backend in (r.backend for r in gateway.models.values()))


def test_a_model_of_a_fleet_of_one_shows_as_the_fleet_keeps_it(tmp_path):
    clock = Clock()
    fleet = Fleet(clock, None)
    status = Status(clock, None, "solo", lazy=True)
    backend = FakeBackend(model_id="solo")
    gate = Gate(clock, status, FleetBackend(backend, fleet, "solo"), 4, 8, 10, Metrics())
    runtime = ModelRuntime("solo", backend, gate, Activity(clock))
    fleet.add(runtime, 0)
    status.backend = backend
    gateway = Gateway(clock, status, {"solo": runtime}, FakeProxy(), Metrics(), Activity(clock))
    entry = body_of(get(gateway, "/admin/status"))["models"]["solo"]
    assert entry == {**status.model_snapshot(fleet.models["solo"]), "aliases": [], "idle_seconds": 0}


# --- /admin/logs -------------------------------------------------------------------------------------


def test_a_log_of_a_model_that_is_not_configured_is_404_and_no_file_is_read(tmp_path):
    gateway, _ = fleet_gateway(tmp_path)
    calls = in_line(gateway)
    for name in ("gamma", "..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "alpha/../../x"):
        response = get(gateway, f"/admin/logs?model={name}", ADMIN)
        error = body_of(response)["error"]
        assert (response.status, error["code"], error["param"]) == (404, "model_not_found", "model"), name
    response = get(gateway, "/admin/logs", ADMIN)
    assert response.status == 400 and body_of(response)["error"]["code"] == "model_required"
    assert calls == []


def test_a_bad_offset_is_400(tmp_path):
    gateway = make_gateway()
    for after in ("-1", "x", "1.5", "%D9%A3"):  # the last: an Arabic-Indic digit
        response = get(gateway, f"/admin/logs?after={after}")
        error = body_of(response)["error"]
        assert (response.status, error["code"], error["param"]) == (400, "invalid_parameter", "after"), after


def test_a_log_is_read_off_the_reactor_its_last_lines_then_the_new_ones(tmp_path):
    gateway, _ = fleet_gateway(tmp_path)
    calls = in_line(gateway)
    log = tmp_path / "alpha.txt"
    gateway.log_file = lambda model_id: str(log) if model_id == "alpha" else None  # type: ignore[method-assign]
    assert body_of(get(gateway, "/admin/logs?model=alpha", ADMIN)) == {"model": "alpha", "lines": [], "offset": 0}
    log.write_bytes(b"one\ntwo <b>\nthr")
    first = body_of(get(gateway, "/admin/logs?model=alpha", ADMIN))
    assert first == {"model": "alpha", "lines": ["one", "two <b>"], "offset": 12}
    with log.open("ab") as f:
        f.write(b"ee\nfour \xff\n")
    answer = body_of(get(gateway, "/admin/logs?model=alpha&after=12", ADMIN))
    assert answer == {"model": "alpha", "lines": ["three", "four \ufffd"], "offset": 25}
    assert body_of(get(gateway, "/admin/logs?model=alpha&after=25", ADMIN))["lines"] == []
    # An alias names its model; a model without a log file has no lines.
    assert body_of(get(gateway, "/admin/logs?model=%3Cscript%3Ealert(1)%3C/script%3E", ADMIN)) == {
        "model": "beta", "lines": [], "offset": 0}
    assert [call[0].__name__ for call in calls] == ["read_log_tail"] * 4


def test_a_rotated_log_starts_over_and_a_long_one_gives_its_last_64_kib(tmp_path):
    from llamad.gateway.page import LOG_TAIL_BYTES, read_log_tail

    log = tmp_path / "latest.txt"
    log.write_bytes(b"new\n")
    assert read_log_tail(str(log), 1000) == (["new"], 4)  # shorter than the offset: rotated
    lines = [b"line %06d" % n for n in range(10000)]  # 12 bytes a line with its newline
    log.write_bytes(b"\n".join(lines) + b"\n")
    size = log.stat().st_size
    shown, offset = read_log_tail(str(log), None)
    assert offset == size and shown[-1] == "line 009999" and len(shown) == LOG_TAIL_BYTES // 12
    assert all(line.startswith("line ") and len(line) == 11 for line in shown)  # no piece of a line
    shown, offset = read_log_tail(str(log), 12)  # far behind: the newest 64 KiB, whole lines
    assert offset == size and shown[0].startswith("line ") and len(shown) == LOG_TAIL_BYTES // 12
    assert read_log_tail(str(tmp_path / "none.txt"), None) == ([], 0)
    log.write_bytes(b"x" * 10)  # one line still being written
    assert read_log_tail(str(log), None) == ([], 0)


def test_a_models_log_file_is_the_one_its_child_writes(tmp_path):
    writer = LogWriter()
    assert model_log(writer, str(tmp_path / "logs"), "alpha", 1 << 20, 2).path == str(
        tmp_path / "logs" / "llama" / "alpha" / "latest.txt")


# --- /admin/keys -------------------------------------------------------------------------------------


def test_the_keys_are_listed_without_their_secrets(tmp_path):
    gateway = make_gateway(auth=auth(tmp_path))
    gateway.policy.record("app", 30)
    response = get(gateway, "/admin/keys", ADMIN)
    body = body_of(response)
    assert body["auth"] is True
    assert [k["id"] for k in body["keys"]] == ["app", "ops"]
    app = body["keys"][0]
    assert app == {"id": "app", "roles": ["inference"], "models": ["alpha"], "rate_limit": None, "expires": None,
                   "tokens_per_minute": 1000, "tokens_per_day": None, "max_concurrent": 2, "priority": None,
                   "tokens_used": {"minute": 30, "day": 30}, "in_flight": 0}
    for secret in (ADMIN, INFER):
        for form in (secret, hashlib.sha256(secret.encode()).hexdigest(), secret[:12]):
            assert form.encode() not in response.body


def test_with_auth_off_no_key_is_listed(tmp_path):
    body = body_of(get(make_gateway(), "/admin/keys"))
    assert body == {"auth": False, "keys": []}


# --- /admin/requests ---------------------------------------------------------------------------------


def test_recent_requests_are_the_access_lines_newest_first_without_the_pages_own(tmp_path):
    written: list[bytes] = []
    gateway = make_gateway(auth=auth(tmp_path), access=written.append)
    get(gateway, "/ui/")
    get(gateway, "/admin/status", ADMIN)
    get(gateway, "/health")
    get(gateway, "/v1/models", INFER)  # the child's list (one model): proxied
    get(gateway, "/admin/restart", ADMIN, method="POST")
    body = body_of(get(gateway, "/admin/requests", ADMIN))
    assert [(r["route"], r["status"], r["key_id"]) for r in body["requests"]] == [
        ("/admin/restart", 200, "ops"), ("/v1/models", 200, "app"), ("/health", 200, None)]
    assert set(body["requests"][0]) >= {"time", "key_id", "model", "route", "status", "prompt_tokens",
                                        "completion_tokens", "duration"}
    assert len(written) == 6  # the access log itself has every request, the page's too


def test_recent_requests_keep_the_newest_only(tmp_path):
    gateway = make_gateway()
    for _ in range(RECENT_REQUESTS + 5):
        get(gateway, "/ping")
    get(gateway, "/health")
    requests = body_of(get(gateway, "/admin/requests"))["requests"]
    assert len(requests) == RECENT_REQUESTS and requests[0]["route"] == "/health"
