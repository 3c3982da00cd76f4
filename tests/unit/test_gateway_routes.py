"""What a request is, whatever its spelling: ``/upstream/<id>/...`` and ``#fragment`` targets, the JSON bodies
the child parses, routing non-inference POSTs by their ``model``, the router API's ``force``, and ``/metrics``
for scoped keys.  Two models on port 8000's front, in memory, on a Clock."""

from __future__ import annotations

import json

import pytest
from fakes import FakeBackend, PendingProxy, UsageProxy
from twisted.internet.task import Clock
from wire import connect, error_of, only_response, server

from llamad.activity import Activity
from llamad.gateway.app import Gateway
from llamad.fleet.gate import Gate
from llamad.gateway.guard import Auth
from llamad.fleet.fleet import ModelSnapshot
from llamad.gateway.routing import ModelDirectory
from llamad.metrics import Metrics
from llamad.fleet.runtime import ModelRuntime
from llamad.status import Status
from llamad.supervisor import State

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # a logged failure fails the test

PLAIN, QUOTA, ONE, SCOPED, OPS = ("plain-key-0123456789", "quota-key-0123456789", "one-at-a-time-key-01",
                                  "scoped-key-012345678", "ops-key-012345678901")
KEYS = f"""
[keys.plain]
key = "{PLAIN}"

[keys.quota]
key = "{QUOTA}"
models = ["beta"]
tokens_per_day = 20

[keys.one]
key = "{ONE}"
max_concurrent = 1

[keys.scoped]
key = "{SCOPED}"
models = ["alpha"]

[keys.ops]
key = "{OPS}"
role = "admin"
"""


class FakeFleet:
    """The models API's view of the fleet: both models loaded; loads and unloads recorded."""

    def __init__(self) -> None:
        self.unloads: list[tuple[str, bool]] = []

    def model_snapshots(self, created: int) -> list[ModelSnapshot]:
        return [ModelSnapshot(model_id, "ready", f"/m/{model_id}.gguf", created) for model_id in ("alpha", "beta")]

    def unload(self, model_id: str, force: bool = False) -> None:
        self.unloads.append((model_id, force))


def build(tmp_path, proxy=None, beta: State = State.READY):
    """Two models, each with its own activity (what the fleet reads to unload an idle one)."""
    clock = Clock()
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    auth = Auth(True, str(path), True, clock)
    metrics = Metrics(per_key=True)
    models = {}
    for model_id, state in (("alpha", State.READY), ("beta", beta)):
        backend = FakeBackend(state, model_id=model_id)
        status = Status(clock, backend, model_id, lazy=True)
        gate = Gate(clock, status, backend, 4, 8, 10, metrics)
        models[model_id] = ModelRuntime(model_id, backend, gate, Activity(clock))
    status.fleet = FakeFleet()
    gateway = Gateway(clock, status, models, proxy or UsageProxy(), metrics, Activity(clock), auth,
                      directory=ModelDirectory(["alpha", "beta"], default="alpha"))
    return server(gateway, max_body_bytes=200000), gateway


def send(factory, key: str, path: bytes, body: bytes | dict | None = None, method: bytes = b"POST"):
    protocol, transport = connect(factory)
    data = json.dumps(body).encode() if isinstance(body, dict) else body or b""
    protocol.dataReceived(b"%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                          % (method, path, key.encode(), len(data), data))
    return transport



def key_for(path: bytes) -> str:
    """A slot's save, restore and erase take the admin role; the child's other routes the inference one."""
    return OPS if b"?action=" in path else PLAIN


def origins(gateway: Gateway) -> list[bytes]:
    return [target.origin for target in gateway.proxy.targets]


CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}


# --- a fragment ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [b"/v1/chat/completions#", b"/v1/chat/completions#x", b"/props?model=beta#x",
                                    b"/upstream/beta/v1/chat/completions#"])
def test_a_target_with_a_fragment_is_400_and_reaches_no_model(tmp_path, target):
    factory, gateway = build(tmp_path)
    status, code, message = error_of(send(factory, PLAIN, target, {**CHAT, "model": "beta", "temperature": 0.5}))
    assert (status, code) == (400, "invalid_request_target") and "fragment" in message
    assert gateway.proxy.targets == []


# --- /upstream/<id>/: the same request as without the prefix ------------------------------------------


@pytest.mark.parametrize("body", [b'{"messages": [], "temperature": NaN}', b'{"temperature": 1e999}', b"[1]", b""])
def test_an_inference_route_under_upstream_gets_the_same_json_checks(tmp_path, body):
    factory, gateway = build(tmp_path)
    status, code, _ = error_of(send(factory, PLAIN, b"/upstream/beta/v1/chat/completions", body))
    assert (status, code) == (400, "invalid_json") and gateway.proxy.targets == []


def test_an_inference_route_under_upstream_takes_post_only(tmp_path):
    factory, gateway = build(tmp_path)
    assert error_of(send(factory, PLAIN, b"/upstream/beta/v1/chat/completions", method=b"GET"))[0] == 405


def test_upstream_goes_to_its_model_whatever_the_body_names_and_counts_under_the_route(tmp_path):
    factory, gateway = build(tmp_path)
    assert only_response(send(factory, PLAIN, b"/upstream/beta/v1/chat/completions", CHAT)).status == 200
    assert origins(gateway) == [b"http://beta"]
    text = gateway.metrics.exposition().decode()
    assert 'route="/v1/chat/completions"' in text and 'route="other"' not in text


def test_a_token_quota_counts_and_refuses_under_upstream(tmp_path):
    factory, gateway = build(tmp_path)
    for _ in range(2):  # 12 tokens each: 24 of 20 used, the second not cut
        assert only_response(send(factory, QUOTA, b"/upstream/beta/v1/chat/completions", CHAT)).status == 200
    assert gateway.policy.tokens_used("quota") == (24, 24)
    status, code, _ = error_of(send(factory, QUOTA, b"/upstream/beta/v1/chat/completions", CHAT))
    assert (status, code) == (429, "token_quota_exceeded") and len(gateway.proxy.targets) == 2


def test_a_scope_holds_under_upstream(tmp_path):
    factory, gateway = build(tmp_path)
    status, code, _ = error_of(send(factory, QUOTA, b"/upstream/alpha/v1/chat/completions", CHAT))
    assert (status, code) == (404, "model_not_found") and gateway.proxy.targets == []


def test_max_concurrent_holds_under_upstream_and_the_model_counts_it_in_flight(tmp_path):
    proxy = PendingProxy()
    factory, gateway = build(tmp_path, proxy)
    beta = gateway.models["beta"].activity
    first = send(factory, ONE, b"/upstream/beta/v1/chat/completions", CHAT)
    second = send(factory, ONE, b"/upstream/beta/v1/completions", {"prompt": "x"})
    assert len(proxy.pending) == 1 and second.value() == b""  # waits for the key's one place
    assert beta.inference_in_flight == 1 and gateway.activity.inference_in_flight == 1
    proxy.answer()
    assert only_response(first).status == 200 and len(proxy.pending) == 1
    proxy.answer()
    assert only_response(second).status == 200
    assert beta.inference_in_flight == 0 and gateway.policy.uses["one"].in_flight == 0


def test_upstream_to_a_stopped_model_starts_it(tmp_path):
    factory, gateway = build(tmp_path, beta=State.STOPPED)
    backend = gateway.models["beta"].backend
    transport = send(factory, PLAIN, b"/upstream/beta/v1/chat/completions", CHAT)
    assert backend.start_requests == 1 and transport.value() == b""
    backend.state = State.READY
    backend.waiters[0].callback(None)
    assert only_response(transport).status == 200 and origins(gateway) == [b"http://beta"]


def test_other_routes_under_upstream_still_pass_through(tmp_path):
    factory, gateway = build(tmp_path)
    assert only_response(send(factory, PLAIN, b"/upstream/beta/slots?id=1", method=b"GET")).status == 200
    assert only_response(send(factory, PLAIN, b"/upstream/beta/v1/models", method=b"GET")).status == 200  # the child's
    assert origins(gateway) == [b"http://beta", b"http://beta"]


# --- every JSON body the child parses ----------------------------------------------------------------

CHILD_JSON = [b"/tokenize", b"/detokenize", b"/apply-template", b"/v1/messages/count_tokens",
              b"/chat/completions/input_tokens", b"/v1/chat/completions/input_tokens", b"/v1/responses/input_tokens",
              b"/lora-adapters", b"/slots/0?action=save", b"/upstream/beta/tokenize", b"/v1/chat/completions"]
BAD_JSON = [
    (b'{"content": 1e999}', "1e999 is out of range"),
    (b'{"content": -1e999}', "-1e999 is out of range"),
    (b'{"content": 1E+400}', "out of range"),
    (b'{"content": 1' + b"0" * 400 + b"}", "out of range"),
    (b'{"content": NaN}', "NaN"),
    (b'{"content": -Infinity}', "Infinity"),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, "nested too deeply"),
    (b'{"content": "\\ud800"}', "lone surrogate"),
]


@pytest.mark.parametrize("body, problem", BAD_JSON)
@pytest.mark.parametrize("path", CHILD_JSON)
def test_every_json_body_the_child_parses_is_strict(tmp_path, path, body, problem):
    factory, gateway = build(tmp_path)
    status, code, message = error_of(send(factory, key_for(path), path, body))
    assert (status, code) == (400, "invalid_json") and problem in message, message
    assert gateway.proxy.targets == []


@pytest.mark.parametrize("path, body", [
    (b"/tokenize", b'{"content": "hi", "x": 1.5e308, "y": 1e-999, "z": 12345678901234567890123}'),
    (b"/lora-adapters", b'[{"id": 0, "scale": 0.5}]'),
    (b"/slots/0?action=erase", b""),
    (b"/props", b""),
])
def test_bodies_the_child_takes_still_pass(tmp_path, path, body):
    factory, gateway = build(tmp_path)
    assert only_response(send(factory, key_for(path), path, body)).status == 200 and len(gateway.proxy.targets) == 1


# --- non-inference POSTs go to the body's model --------------------------------------------------------


@pytest.mark.parametrize("path", [b"/tokenize", b"/detokenize", b"/apply-template", b"/v1/messages/count_tokens"])
def test_a_non_inference_post_goes_to_the_model_its_body_names(tmp_path, path):
    factory, gateway = build(tmp_path)
    assert only_response(send(factory, PLAIN, path, {"model": "beta", "content": "hi", "tokens": [1]})).status == 200
    assert only_response(send(factory, PLAIN, path, {"content": "hi", "tokens": [1]})).status == 200  # the default
    assert only_response(send(factory, PLAIN, path + b"?model=beta", {"content": "hi"})).status == 200
    assert origins(gateway) == [b"http://beta", b"http://alpha", b"http://beta"]
    status, code, _ = error_of(send(factory, QUOTA, path, {"model": "alpha", "content": "hi"}))
    assert (status, code) == (404, "model_not_found") and len(gateway.proxy.targets) == 3


# --- the router API's force ------------------------------------------------------------------------------


@pytest.mark.parametrize("force", ["yes", 1, "true", None, [True]])
def test_unload_with_a_force_that_is_not_a_boolean_is_400(tmp_path, force):
    factory, gateway = build(tmp_path)
    response = only_response(send(factory, OPS, b"/models/unload", {"model": "beta", "force": force}))
    assert response.status == 400
    err = json.loads(response.body)["error"]
    assert err["code"] == 400 and "\"force\" must be a boolean" in err["message"]
    assert gateway.status.fleet.unloads == []


@pytest.mark.parametrize("body, force", [({"model": "beta"}, False), ({"model": "beta", "force": False}, False),
                                         ({"model": "beta", "force": True}, True)])
def test_unload_takes_a_boolean_force_or_none(tmp_path, body, force):
    factory, gateway = build(tmp_path)
    assert only_response(send(factory, OPS, b"/models/unload", body)).status == 200
    assert gateway.status.fleet.unloads == [("beta", force)]


# --- /metrics, when it asks for a key, is an admin route -----------------------------------------------


@pytest.mark.parametrize("key, code", [(SCOPED, 403), (PLAIN, 403), (OPS, 200)])
def test_protected_metrics_need_the_admin_role(tmp_path, key, code):
    factory, gateway = build(tmp_path)
    for accept in (b"text/plain", b"application/json"):
        protocol, transport = connect(factory)
        protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: %s\r\nAuthorization: Bearer %s\r\n\r\n"
                              % (accept, key.encode()))
        response = only_response(transport)
        assert response.status == code
        if code == 403:
            assert json.loads(response.body)["error"]["code"] == "insufficient_role"
