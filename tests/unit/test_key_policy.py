"""Keys with a policy on port 8000 (the front, in memory, on a Clock): model scopes, roles, token
quotas, concurrent requests, priority in the gate, the key_id label and the access log."""

from __future__ import annotations

import json

import pytest
from fakes import FakeBackend, PendingProxy, UsageProxy
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from wire import connect, error_of, only_response, server

from llamad.activity import Activity
from llamad.gateway.app import Gateway
from llamad.fleet.gate import Gate
from llamad.gateway.guard import Auth
from llamad.gateway.routing import ModelDirectory
from llamad.metrics import Metrics
from llamad.fleet.runtime import ModelRuntime
from llamad.status import Status

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # a logged failure fails the test

A, B, C, OPS = "alpha-key-0123456789", "beta-key-01234567890", "cheap-key-0123456789", "ops-key-012345678901"
KEYS = f"""
[keys.a]
key = "{A}"
models = ["alpha"]

[keys.b]
key = "{B}"
models = ["al*", "beta"]
tokens_per_minute = 10
max_concurrent = 1
priority = "high"

[keys.c]
key = "{C}"

[keys.ops]
key = "{OPS}"
role = "admin"
"""


def build(tmp_path, proxy=None, max_concurrent: int = 4, queue_timeout: float = 10):
    clock = Clock()
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    auth = Auth(True, str(path), False, clock, priorities={"high": 1}, priority_ageing=30)
    metrics = Metrics(per_key=True)
    activity = Activity(clock)
    models = {}
    for model_id in ("alpha", "beta"):
        backend = FakeBackend(model_id=model_id)
        status = Status(clock, backend, model_id, lazy=False)
        gate = Gate(clock, status, backend, max_concurrent, 8, queue_timeout, metrics)
        models[model_id] = ModelRuntime(model_id, backend, gate, activity)
    lines: list[bytes] = []
    gateway = Gateway(clock, status, models, proxy or UsageProxy(), metrics, activity, auth,
                      directory=ModelDirectory(["alpha", "beta"], lenient=False),
                      access=lines.append, wall=lambda: 1795000000.5)
    gateway.router_api = False  # two models without a Fleet: lists are not exercised here
    return server(gateway), gateway, clock, lines


def post(factory, key: str, model: str = "alpha", path: bytes = b"/v1/chat/completions"):
    protocol, transport = connect(factory)
    body = json.dumps({"model": model, "messages": []}).encode()
    protocol.dataReceived(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path, key.encode(), len(body), body))
    return transport



def test_a_model_outside_the_scope_answers_as_if_it_did_not_exist(tmp_path):
    factory, gateway, clock, lines = build(tmp_path)
    status, code, message = error_of(post(factory, A, "beta"))
    assert (status, code) == (404, "model_not_found")
    assert "beta" in message and "(models here: alpha)" in message  # the other models are not named
    assert only_response(post(factory, A, "alpha")).status == 200
    assert only_response(post(factory, B, "beta")).status == 200  # globs and ids
    assert only_response(post(factory, C, "beta")).status == 200  # no models: every model
    assert [t.origin for t in gateway.proxy.targets] == [b"http://alpha", b"http://beta", b"http://beta"]


def test_roles_keep_admin_routes_and_inference_apart(tmp_path):
    factory, gateway, clock, lines = build(tmp_path)
    status, code, message = error_of(post(factory, A, path=b"/admin/reload"))
    assert (status, code) == (403, "insufficient_role") and "admin" in message
    status, code, _ = error_of(post(factory, OPS))
    assert (status, code) == (403, "insufficient_role")
    assert only_response(post(factory, OPS, path=b"/admin/reload")).status == 200
    assert gateway.proxy.targets == []


def test_a_token_quota_refuses_the_next_request_until_the_window_frees(tmp_path):
    factory, gateway, clock, lines = build(tmp_path)
    assert only_response(post(factory, B)).status == 200  # 12 tokens: over the 10 per minute, not cut
    response = only_response(post(factory, B))
    assert response.status == 429 and response.headers[b"retry-after"] == b"61"
    assert json.loads(response.body)["error"]["code"] == "token_quota_exceeded"
    assert only_response(post(factory, A)).status == 200  # another key's quota is its own
    clock.advance(61)
    assert only_response(post(factory, B)).status == 200


def test_max_concurrent_waits_in_line_then_429(tmp_path):
    proxy = PendingProxy()
    factory, gateway, clock, lines = build(tmp_path, proxy, queue_timeout=10)
    first = post(factory, B)
    second = post(factory, B)
    assert len(proxy.pending) == 1 and second.value() == b""  # waits for the key's one place
    proxy.answer()
    assert only_response(first).status == 200 and len(proxy.pending) == 1  # the second goes on
    third = post(factory, B)
    clock.advance(10)
    status, code, _ = error_of(third)
    assert (status, code) == (429, "concurrency_limit_exceeded")
    proxy.answer()
    assert only_response(second).status == 200
    assert gateway.policy.uses["b"].in_flight == 0


def test_a_higher_class_is_admitted_first(tmp_path):
    proxy = PendingProxy()
    factory, gateway, clock, lines = build(tmp_path, proxy, max_concurrent=1)
    running = post(factory, C)
    low = post(factory, C)
    clock.advance(1)
    high = post(factory, B)  # priority "high": 30 s ahead, though it came later
    assert len(proxy.pending) == 1
    proxy.answer()
    assert only_response(running).status == 200
    assert proxy.pending[0][0].getHeader(b"authorization") == b"Bearer " + B.encode()
    proxy.answer()
    proxy.answer()
    assert only_response(high).status == 200 and only_response(low).status == 200


def test_requests_and_tokens_carry_the_key_id(tmp_path):
    factory, gateway, clock, lines = build(tmp_path)
    post(factory, A)
    post(factory, A, "beta")
    families = {f.name: f for f in text_string_to_metric_families(gateway.metrics.exposition().decode())}
    requests = {(s.labels["key_id"], s.labels["code"]): s.value for s in families["llamad_requests"].samples
                if s.name == "llamad_requests_total"}
    assert requests == {("a", "200"): 1, ("a", "404"): 1}
    tokens = {(s.labels["key_id"], s.labels["kind"]): s.value for s in families["llamad_tokens"].samples}
    assert tokens == {("a", "prompt"): 8, ("a", "completion"): 4}


def test_each_request_writes_one_access_line(tmp_path):
    factory, gateway, clock, lines = build(tmp_path)
    post(factory, A)
    post(factory, A, "beta")
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    entries = [json.loads(line) for line in lines]
    assert [line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines] == [True] * 3
    assert entries[0] == {"time": "2026-11-18T11:06:40.500Z", "key_id": "a", "model": "alpha",
                          "route": "/v1/chat/completions", "status": 200, "prompt_tokens": 8,
                          "completion_tokens": 4, "duration": 0.0, "ttfb": 0.0, "queue_wait": 0.0,
                          "cold_start": None}
    assert (entries[1]["key_id"], entries[1]["model"], entries[1]["status"]) == ("a", None, 404)
    assert (entries[2]["key_id"], entries[2]["route"], entries[2]["duration"]) == (None, "/ping", None)


def test_a_reload_keeps_what_a_key_with_a_quota_used(tmp_path):
    factory, gateway, clock, lines = build(tmp_path)
    post(factory, B)
    post(factory, A)  # no quota: its tokens are in the metrics and the access log only
    gateway.auth.reload()
    assert gateway.policy.tokens_used("b") == (12, 12) and gateway.policy.tokens_used("a") == (0, 0)
