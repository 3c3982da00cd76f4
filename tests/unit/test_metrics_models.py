"""The request families' ``model`` label: configured model ids only, plus one value for a request that
reached no model, so that clients naming models cannot grow the exposition."""

from __future__ import annotations

import json

import pytest
from fakes import FakeBackend, UsageProxy
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from wire import connect, only_response, server

from llamad.activity import Activity
from llamad.fleet.gate import Gate
from llamad.fleet.runtime import ModelRuntime
from llamad.gateway.app import Gateway
from llamad.gateway.routing import ModelDirectory
from llamad.metrics import NO_MODEL, Metrics
from llamad.status import Status

REQUEST_FAMILIES = ("llamad_requests_total", "llamad_request_duration_seconds_count",
                    "llamad_time_to_first_byte_seconds_count", "llamad_tokens_total")


def samples(metrics: Metrics) -> list:
    return [s for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples]


def models_of(metrics: Metrics, name: str) -> set[str]:
    return {s.labels["model"] for s in samples(metrics) if s.name == name}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(metrics)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def answer(metrics: Metrics, model: str | None, route: str = "/v1/chat/completions", code: int = 200) -> None:
    """What the gateway records for one request routed to ``model``."""
    metrics.count_request(route, b"POST", code, "", model)
    metrics.by_route(metrics.time_to_first_byte, route, model).observe(0.05)
    metrics.by_route(metrics.request_duration, route, model).observe(0.25)
    metrics.count_tokens(8, 4, "", model)


def test_each_configured_model_has_its_own_series_and_the_rest_share_one() -> None:
    metrics = Metrics(per_model=True, models=["alpha", "beta"])
    answer(metrics, "alpha")
    answer(metrics, "alpha")
    answer(metrics, "beta")
    for name in REQUEST_FAMILIES:
        assert models_of(metrics, name) == {"alpha", "beta"}, name
    for unknown in ("gpt-4", "x" * 300, "", None):
        answer(metrics, unknown, code=404)
    for name in REQUEST_FAMILIES:
        assert models_of(metrics, name) == {"alpha", "beta", NO_MODEL}, name  # one value for all of them
    assert value(metrics, "llamad_requests_total", model="alpha") == 2
    assert value(metrics, "llamad_requests_total", model="beta") == 1
    assert value(metrics, "llamad_requests_total", model=NO_MODEL, code="404") == 4
    assert value(metrics, "llamad_tokens_total", model="alpha", kind="completion") == 8
    assert value(metrics, "llamad_request_duration_seconds_count", model="beta") == 1
    assert value(metrics, "llamad_time_to_first_byte_seconds_count", model=NO_MODEL) == 4


def test_one_model_is_labelled_with_its_id_and_own_routes_with_none() -> None:
    metrics = Metrics(models=["demo"])
    answer(metrics, "demo")
    metrics.count_request("/metrics", b"GET", 200)  # llamad's own route: no model
    assert value(metrics, "llamad_requests_total", model="demo", route="/v1/chat/completions") == 1
    assert value(metrics, "llamad_requests_total", model=NO_MODEL, route="/metrics") == 1
    assert models_of(metrics, "llamad_tokens_total") == {"demo"}


def test_the_existing_labels_stay_beside_the_model() -> None:
    metrics = Metrics(per_key=True, models=["demo"])
    metrics.count_request("/v1/completions", b"POST", 200, "team-a", "demo")
    metrics.count_tokens(3, 5, "team-a", "demo")
    [request] = [s for s in samples(metrics) if s.name == "llamad_requests_total"]
    assert request.labels == {"route": "/v1/completions", "method": "POST", "code": "200", "key_id": "team-a",
                              "model": "demo"}
    tokens = {s.labels["kind"]: s.labels for s in samples(metrics) if s.name == "llamad_tokens_total"}
    assert tokens["prompt"] == {"kind": "prompt", "key_id": "team-a", "model": "demo"}


def test_models_added_later_become_label_values() -> None:
    metrics = Metrics()
    assert metrics.model_label("demo") == NO_MODEL
    metrics.add_models({"demo": object()})  # a gateway's models, by id
    assert metrics.model_label("demo") == "demo" and metrics.model_label(None) == NO_MODEL


def test_the_json_view_still_sums_every_model() -> None:
    metrics = Metrics(models=["alpha", "beta"])
    answer(metrics, "alpha")
    answer(metrics, "beta", code=503)
    answer(metrics, None, code=404)
    view = metrics.gateway_view(1.0, 0, 0, 0)
    assert (view["requests_total"], view["requests_success"], view["requests_error"]) == (3, 1, 2)


def two_models() -> tuple[Gateway, Metrics]:
    """A gateway of two models on the fakes, its answers carrying 8 prompt and 4 completion tokens."""
    clock = Clock()
    metrics = Metrics(per_model=True, models=["alpha", "beta"])
    activity = Activity(clock)
    models = {}
    for model_id in ("alpha", "beta"):
        backend = FakeBackend(model_id=model_id)
        status = Status(clock, backend, model_id, lazy=False)
        gate = Gate(clock, status, backend, 4, 8, 10, metrics.for_model(model_id))
        models[model_id] = ModelRuntime(model_id, backend, gate, activity)
    gateway = Gateway(clock, status, models, UsageProxy(), metrics, activity,
                      directory=ModelDirectory(["alpha", "beta"], lenient=False))
    gateway.router_api = False  # two models without a Fleet: the router API is not exercised here
    return gateway, metrics


def post(factory, model: str) -> int:
    protocol, transport = connect(factory)
    body = json.dumps({"model": model, "messages": []}).encode()
    protocol.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return only_response(transport).status


def test_requests_to_two_models_show_in_metrics_per_model() -> None:
    gateway, metrics = two_models()
    factory = server(gateway)
    assert [post(factory, "alpha"), post(factory, "alpha"), post(factory, "beta")] == [200, 200, 200]
    assert post(factory, "no-such-model") == 404
    assert value(metrics, "llamad_requests_total", model="alpha") == 2
    assert value(metrics, "llamad_requests_total", model="beta") == 1
    assert value(metrics, "llamad_tokens_total", model="beta", kind="prompt") == 8
    assert value(metrics, "llamad_request_duration_seconds_count", model="alpha") == 2
    assert value(metrics, "llamad_time_to_first_byte_seconds_count", model="beta") == 1
    assert models_of(metrics, "llamad_requests_total") == {"alpha", "beta", NO_MODEL}  # the 404 adds no value
