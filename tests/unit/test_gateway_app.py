"""The Klein app's own routes and the gate, in memory with StubTreq (no child, no network)."""

from __future__ import annotations

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from wire import build, json_of

from llamad.gateway.app import parse_json_object
from llamad.gateway.routes import BY_PATH, FORM_ROUTES, INFERENCE_ROUTES, JSON_BODY_ROUTES, route_label
from llamad.supervisor import StartFailed, State


@pytest_twisted.ensureDeferred
async def test_ping_and_health_are_answered_by_llamad():
    http, clock, backend, status, metrics, proxy = build()
    assert (await http.get("http://x/ping")).code == 200
    response = await http.get("http://x/health")
    assert response.code == 200
    body = await json_of(response)
    assert body["state"] == "ready" and body["model"] == "demo" and body["status"] == "ok"
    backend.state = State.STARTING
    response = await http.get("http://x/health")
    assert response.code == 503 and (await json_of(response))["reason"] == "loading model"
    assert proxy.targets == []


@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_and_show_backend_state():
    http, clock, backend, status, metrics, proxy = build()
    metrics.set_backend_state(State.READY)
    await http.post("http://x/v1/chat/completions", data=b"{}")
    await http.get("http://x/ping")
    text = (await (await http.get("http://x/metrics")).content()).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("llamad_requests_total", (("code", "200"), ("method", "POST"), ("model", "demo"),
                                              ("route", "/v1/chat/completions")))] == 1
    assert samples[("llamad_backend_state", (("state", "ready"),))] == 1
    assert samples[("llamad_backend_state", (("state", "failed"),))] == 0
    assert samples[("llamad_in_flight_requests", ())] == 0


@pytest_twisted.ensureDeferred
async def test_unknown_routes_are_proxied_with_their_query():
    http, clock, backend, status, metrics, proxy = build()
    response = await http.get("http://x/slots?id=1")
    assert response.code == 200 and await json_of(response) == {"proxied": True}
    assert proxy.targets == [backend.target()]


@pytest_twisted.ensureDeferred
async def test_failed_backend_is_a_503_with_the_reason():
    http, clock, backend, status, metrics, proxy = build(State.FAILED)
    backend.reason = "exited with code 1"
    response = await http.post("http://x/v1/completions", data=b"{}")
    assert response.code == 503
    error = (await json_of(response))["error"]
    assert error["message"] == "backend failed: exited with code 1" and error["type"] == "server_error"
    assert response.headers.getRawHeaders(b"retry-after") == [b"30"]
    assert proxy.targets == []


@pytest_twisted.ensureDeferred
async def test_draining_refuses_new_inference():
    http, clock, backend, status, metrics, proxy = build()
    status.draining = True
    response = await http.post("http://x/v1/completions", data=b"{}")
    assert response.code == 503 and (await json_of(response))["error"]["code"] == "shutting_down"


@pytest_twisted.ensureDeferred
async def test_lazy_start_waits_for_one_shared_start():
    http, clock, backend, status, metrics, proxy = build(State.STOPPED, lazy=True)
    first = http.post("http://x/v1/completions", data=b"{}")
    second = http.post("http://x/v1/completions", data=b"{}")
    assert len(backend.waiters) == 2 and proxy.targets == []
    backend.state = State.READY
    for waiter in list(backend.waiters):
        waiter.callback(None)
    http.flush()
    assert [(await first).code, (await second).code] == [200, 200]
    assert len(proxy.targets) == 2


@pytest_twisted.ensureDeferred
async def test_start_failure_fails_the_waiter_with_503():
    http, clock, backend, status, metrics, proxy = build(State.STOPPED, lazy=True)
    pending = http.post("http://x/v1/completions", data=b"{}")
    backend.waiters[0].errback(StartFailed("exited with code 1"))
    http.flush()
    response = await pending
    assert response.code == 503
    assert (await json_of(response))["error"]["message"] == "backend start failed: exited with code 1"


@pytest_twisted.ensureDeferred
async def test_waiting_is_bounded_by_the_queue_timeout():
    http, clock, backend, status, metrics, proxy = build(State.STARTING, wait=5)
    pending = http.post("http://x/v1/completions", data=b"{}")
    clock.advance(5)
    http.flush()
    response = await pending
    assert response.code == 503 and (await json_of(response))["error"]["code"] == "queue_timeout"
    assert backend.waiters == []


# --- strict JSON bodies ------------------------------------------------------------


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"[" * 100000, "nested too deeply"),
        (b'{"a":' * 3000 + b"1" + b"}" * 3000, "nested too deeply"),
        (b'{"temperature": NaN}', "NaN"),
        (b'{"temperature": Infinity}', "Infinity"),
        (b'{"temperature": -Infinity}', "-Infinity"),
        (b'{"temperature": 1e999}', "number 1e999 is out of range"),
        (b'{"temperature": -1e999}', "number -1e999 is out of range"),
        (b'{"temperature": 1E+308, "top_p": 2.5e308}', "number 2.5e308 is out of range"),
        (b'{"seed": 1' + b"0" * 400 + b"}", "number 10000000000000000000... (401 characters) is out of range"),
        (b'{"seed": 1' + b"0" * 250 + b"e99}", "is out of range"),
        (b'{"prompt": "\\ud800"}', "lone surrogate \\ud800"),
        (b'{"prompt": "x\\uDC00y"}', "lone surrogate \\udc00"),
        (b'{"\\ud83d": 1}', "lone surrogate \\ud83d"),
        (b'{"prompt": "\\ude00\\ud83d"}', "lone surrogate"),
        ('{"prompt": "hi"}'.encode("utf-16"), "not UTF-8"),
        ('{"prompt": "hi"}'.encode("utf-16-le"), "not valid JSON"),
        (b'{"prompt": "caf\xe9"}', "not UTF-8 (byte 0xe9 at offset 15)"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_inference_bodies_are_strict_json_in_utf8(body, problem):
    http, clock, backend, status, metrics, proxy = build()
    response = await http.post("http://x/v1/chat/completions", data=body)
    assert response.code == 400
    error = (await json_of(response))["error"]
    assert error["code"] == "invalid_json" and problem in error["message"]
    assert proxy.targets == []


@pytest.mark.parametrize(
    "body", [b'{"prompt": "\\ud83d\\ude00"}', b'{"prompt": "\\\\ud800"}', '{"prompt": "café 😀"}'.encode(),
             b'\xef\xbb\xbf{"prompt": "a"}'],
)
@pytest_twisted.ensureDeferred
async def test_surrogate_pairs_and_plain_utf8_are_accepted(body):
    http, clock, backend, status, metrics, proxy = build()
    assert (await http.post("http://x/v1/chat/completions", data=body)).code == 200
    assert len(proxy.targets) == 1


@pytest.mark.parametrize("body", [b'{"t": 1e308}', b'{"t": -1.7976931348623157e308}', b'{"t": 1e-999}',
                                  b'{"n": 1' + b"0" * 300 + b"}", b'{"words": "e999 and 1e999 in a string"}'])
def test_numbers_a_double_holds_are_accepted(body):
    assert parse_json_object(body)


def test_parse_json_object_keeps_the_parsed_pair():
    assert parse_json_object(b'{"p": "\\ud83d\\ude00"}') == {"p": "\U0001F600"}


# --- inference routes -----------------------------------------------------------------

MULTIPART = (b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\n'
             b"content-type: audio/wav\r\n\r\nRIFF\x00\xff\r\n--b--\r\n")


@pytest.mark.parametrize(
    "route", ["/v1/reranking", "/v1/audio/transcriptions", "/audio/transcriptions", "/responses", "/v1/rerank"],
)
@pytest_twisted.ensureDeferred
async def test_every_route_that_runs_the_model_passes_the_gate_and_counts_as_activity(route):
    http, clock, backend, status, metrics, proxy = build()
    activity = http.gateway.activity
    changes: list[int] = []
    activity.on_change(lambda: changes.append(activity.inference_in_flight))
    body = MULTIPART if "audio" in route else b"{}"
    assert (await http.post(f"http://x{route}", data=body)).code == 200
    assert changes == [1, 0] and len(proxy.targets) == 1
    assert route_label(route.encode()) == route
    status.draining = True  # the gate refuses from here on
    response = await http.post(f"http://x{route}", data=body)
    assert response.code == 503 and (await json_of(response))["error"]["code"] == "shutting_down"
    assert len(proxy.targets) == 1


@pytest_twisted.ensureDeferred
async def test_a_multipart_transcription_is_not_held_to_a_json_body():
    http, clock, backend, status, metrics, proxy = build()
    headers = {"content-type": ["multipart/form-data; boundary=b"]}
    response = await http.post("http://x/v1/audio/transcriptions", data=MULTIPART, headers=headers)
    assert response.code == 200 and len(proxy.targets) == 1
    assert (await http.get("http://x/v1/audio/transcriptions")).code == 405
    assert (await http.post("http://x/v1/reranking", data=MULTIPART)).code == 400  # JSON routes still check


def test_inference_routes_are_the_json_ones_plus_the_form_ones():
    assert JSON_BODY_ROUTES | FORM_ROUTES == INFERENCE_ROUTES and not JSON_BODY_ROUTES & FORM_ROUTES
    assert INFERENCE_ROUTES <= set(BY_PATH)


def test_several_childrens_metrics_merge_into_one_family_per_name_with_a_model_label():
    from prometheus_client.parser import text_string_to_metric_families

    from llamad.metrics import label_child_metrics

    child = (b"# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
             b"# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total %d\n"
             b"# HELP llamacpp:requests_processing Number of requests processing.\n"
             b"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n")
    text = label_child_metrics({"qwen": child % 7, "gemma": child % 9, "broken": b"not { a metric"})
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    tokens = families["llamacpp:prompt_tokens"]
    assert tokens.type == "counter"
    assert {(s.labels["model"], s.value) for s in tokens.samples} == {("qwen", 7.0), ("gemma", 9.0)}
    assert len(families["llamacpp:requests_processing"].samples) == 2
    assert text.count(b"# TYPE llamacpp:requests_processing gauge") == 1
    assert label_child_metrics({}) == b""
