"""llamad's router-style models API has the shapes llama-server's router answers with.

The router's answers were captured live (tests/fixtures/router_shapes.json); each
of llamad's answers is compared with the captured one for the same situation:
the same keys, the same JSON types, recursively, and the same values where a
client may branch on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from shapes import shape_diff

from llamad.gateway import models_api
from llamad.fleet.fleet import ModelSnapshot
from llamad.gateway.models_api import (
    ModelsApiError, child_meta, find_model, load_answer, models_list, requested_force, requested_model,
    unload_answer,
)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "router_shapes.json"
CASES: dict[str, Any] = json.loads(FIXTURE.read_text())["cases"]
LLAMAD_KEY = "llamad"


def assert_same_shape(ours: Any, theirs: Any, ignore: frozenset[str] = frozenset({LLAMAD_KEY})) -> None:
    diffs = shape_diff(ours, theirs, ignore=ignore)
    assert not diffs, "\n".join(diffs)


def router_entry(case: str, model: str) -> dict[str, Any]:
    return next(m for m in CASES[case]["body"]["data"] if m["id"] == model)


META = router_entry("models_loaded", "a")["meta"]


def snapshot(state: str, **kw: Any) -> ModelSnapshot:
    values: dict[str, Any] = {
        "id": "a", "state": state, "path": "/models/a.gguf", "created": 1700000000,
        "aliases": ("alpha", "gpt-4o"), "memory_need": 2 << 30, "last_used": 1700000100.5,
        "args": ("llama-server", "--host", "127.0.0.1", "--port", "8081", "--model", "/models/a.gguf"),
        "pid": 1234 if state in ("starting", "ready", "stopping") else None,
    }
    if state in ("ready", "stopping"):
        values["meta"] = META  # read from the child once it was ready
    if state == "failed":
        values["exit_code"] = 1
        values["reason"] = "exited with status 1 while loading"
    values.update(kw)
    return ModelSnapshot(**values)


# llamad's state -> (the captured list, the model in it) showing the router's equivalent.
EQUIVALENT = {
    "stopped": ("models_initial", "a"),
    "starting": ("models_loading", "a"),
    "backoff": ("models_loading", "a"),
    "ready": ("models_loaded", "a"),
    "stopping": ("models_unloading", "b"),
    "failed": ("models_failed", "c"),
}


def test_the_fixture_holds_every_situation():
    assert {"models_initial", "models_loading", "models_loaded", "models_failed", "v1_models", "load_accepted",
            "load_already_running", "load_unknown", "unload_running", "unload_not_running", "unload_unknown",
            "load_bad_json"} <= set(CASES)
    assert router_entry("models_failed", "c")["status"]["failed"] is True
    # /v1/models is the same handler as /models.
    assert CASES["v1_models"]["body"] == CASES["models_loaded"]["body"]


@pytest.mark.parametrize("state", sorted(EQUIVALENT))
def test_a_model_entry_has_the_routers_shape_in_each_state(state):
    case, model = EQUIVALENT[state]
    theirs = router_entry(case, model)
    ours = models_list([snapshot(state)])["data"][0]
    assert_same_shape(ours, theirs)
    assert ours["status"]["value"] == theirs["status"]["value"]
    assert list(ours)[:len(theirs)] == list(theirs)  # the router's keys in its order, llamad's after
    for key in ("object", "tags", "architecture", "can_remove"):
        assert ours[key] == theirs[key], key
    assert ours["source"] in ("models_dir", "preset")


@pytest.mark.parametrize("case", ["models_initial", "models_loading", "models_loaded", "models_after_evict",
                                  "models_unloading", "models_failed", "v1_models"])
def test_the_list_has_the_routers_shape(case):
    """A whole list, model by model in the router's states: same envelope, same entries."""
    theirs = CASES[case]["body"]
    state_of = {("unloaded", False): "stopped", ("loading", False): "starting", ("loaded", False): "ready",
                ("unloaded", True): "failed"}
    ours = models_list([
        snapshot(state_of[(m["status"]["value"], m["status"].get("failed", False))], id=m["id"])
        for m in theirs["data"]
    ])
    assert_same_shape(ours, theirs)
    for mine, router in zip(ours["data"], theirs["data"]):
        assert_same_shape(mine, router)
        assert mine["status"]["value"] == router["status"]["value"]
        assert mine["status"].get("failed") == router["status"].get("failed")
    assert ours["object"] == theirs["object"] == "list"


def test_llamad_facts_live_under_their_own_key():
    ours = models_list([snapshot("ready", in_flight=2, queued=3, reason="")])["data"][0]
    assert ours["llamad"] == {
        "state": "ready", "reason": "", "exit_code": None, "pid": 1234, "path": "/models/a.gguf",
        "memory": 2 << 30, "last_used": 1700000100.5, "in_flight": 2, "queued": 3,
    }
    assert ours["aliases"] == ["alpha", "gpt-4o"]
    assert ours["owned_by"] == "llamad"
    assert ours["status"]["args"][-1] == "/models/a.gguf"
    assert json.loads(json.dumps(models_list([snapshot(s) for s in EQUIVALENT])))  # plain JSON throughout


def test_a_failed_model_shows_as_the_router_shows_a_failed_load():
    status = models_list([snapshot("failed", exit_code=139)])["data"][0]["status"]
    assert (status["value"], status["failed"], status["exit_code"]) == ("unloaded", True, 139)
    # No exit status (never spawned, or killed by a signal): still an int, as in the router.
    status = models_list([snapshot("failed", exit_code=None)])["data"][0]["status"]
    assert status["exit_code"] == models_api.UNKNOWN_EXIT_CODE
    # Only llamad's "failed" is a failure: a stopped model that once exited non-zero is not.
    assert "failed" not in models_list([snapshot("stopped", exit_code=1)])["data"][0]["status"]


def test_meta_only_while_loaded_and_known():
    assert "meta" not in models_list([snapshot("ready", meta=None)])["data"][0]
    assert "meta" not in models_list([snapshot("starting", meta=META)])["data"][0]
    assert models_list([snapshot("ready")])["data"][0]["meta"] == META


def test_child_meta_reads_a_plain_llama_servers_v1_models():
    assert child_meta({"object": "list", "data": [{"id": "x", "meta": META}]}) == META
    assert child_meta({"data": []}) is None
    assert child_meta({"data": [{"id": "x"}]}) is None
    assert child_meta({}) is None


# Load and unload: llamad's answer -> the captured router answer for the same situation.
ANSWERS = [
    ("load_accepted", lambda: load_answer(snapshot("stopped"))),
    ("load_accepted", lambda: load_answer(snapshot("failed"))),  # a failed model may be loaded again
    ("load_after_failure", lambda: load_answer(snapshot("failed"))),
    ("load_already_running", lambda: load_answer(snapshot("ready"))),
    ("load_already_running", lambda: load_answer(snapshot("starting"))),
    ("load_already_running", lambda: load_answer(snapshot("backoff"))),
    ("load_already_running", lambda: load_answer(snapshot("stopping"))),
    ("load_unknown", lambda: load_answer(None)),
    ("unload_running", lambda: unload_answer(snapshot("ready"))),
    ("unload_running", lambda: unload_answer(snapshot("starting"))),
    ("unload_running", lambda: unload_answer(snapshot("backoff"))),
    ("unload_not_running", lambda: unload_answer(snapshot("stopped"))),
    ("unload_failed", lambda: unload_answer(snapshot("failed"))),
    ("unload_unknown", lambda: unload_answer(None)),
]


@pytest.mark.parametrize("case,answer", ANSWERS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(ANSWERS)])
def test_load_and_unload_answer_as_the_router(case, answer):
    status, body = answer()
    theirs = CASES[case]
    assert status == theirs["status"]
    assert_same_shape(body, theirs["body"])
    if "error" in body:
        assert body["error"]["type"] == theirs["body"]["error"]["type"]
        assert body["error"]["code"] == theirs["body"]["error"]["code"] == status
        if theirs["body"]["error"]["message"] != "File Not Found":  # the router's 404 handler rewrites the body
            assert body["error"]["message"] == theirs["body"]["error"]["message"]
    else:
        assert body == theirs["body"] == {"success": True}


def test_unknown_load_says_what_the_router_means():
    status, body = load_answer(None)
    assert (status, body["error"]["message"]) == (404, "model is not found")


def test_requested_model_and_lookup():
    models = [snapshot("stopped"), snapshot("ready", id="b", aliases=("beta",))]
    assert requested_model(b'{"model": "b"}') == "b"
    assert requested_model('{"model": "beta"}') == "beta"
    # Missing or non-string: no model has that name, so the not-found answer, as in the router.
    assert requested_model(b"{}") == "" and requested_model(b'{"model": 3}') == ""
    assert find_model(models, "beta").id == "b"
    assert find_model(models, "b").id == "b"
    assert find_model(models, "") is None
    # An id wins over another model's alias of the same name.
    assert find_model([snapshot("stopped", id="x", aliases=("b",)), *models], "b").id == "b"


def test_force_is_a_boolean_or_absent():
    assert requested_force(b'{"model": "b"}') is False
    assert requested_force(b'{"model": "b", "force": true}') is True
    assert requested_force(b'{"model": "b", "force": false}') is False
    for force, kind in (('"yes"', "a string"), ("1", "a number"), ("null", "null"), ("[true]", "an array")):
        with pytest.raises(ModelsApiError) as caught:
            requested_force(b'{"model": "b", "force": %s}' % force.encode())
        status, answer = caught.value.answer()
        assert status == 400 and answer["error"]["message"] == f'"force" must be a boolean (true or false), not {kind}'
        assert_same_shape(answer, CASES["load_bad_json"]["body"])


@pytest.mark.parametrize("body", [b"not json", b"", b"[1]", b'"a"', b"\xff"])
def test_a_bad_body_is_a_4xx_in_the_routers_error_shape(body):
    with pytest.raises(ModelsApiError) as caught:
        requested_model(body)
    status, answer = caught.value.answer()
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    # The router answers 500 server_error here; the body's shape is the same.
    assert_same_shape(answer, CASES["load_bad_json"]["body"])


def test_every_state_maps_to_a_router_value():
    assert set(models_api.ROUTER_STATUS) == {"stopped", "starting", "ready", "stopping", "backoff", "failed"}
    assert set(models_api.ROUTER_STATUS.values()) <= {"unloaded", "loading", "loaded"}


def test_shape_diff_notices_changes():
    """The comparison itself: a changed key or type is reported, llamad's key is ignored."""
    theirs = {"a": 1, "b": {"c": ["x"]}}
    assert shape_diff({"a": 1, "b": {"c": ["y", "z"]}, "llamad": {}}, theirs, ignore=frozenset({"llamad"})) == []
    assert shape_diff({"a": True, "b": {"c": ["y"]}}, theirs) == ["$.a: boolean != router's integer"]
    assert shape_diff({"a": 1, "b": {"c": [1]}}, theirs) == ["$.b.c[0]: integer != router's string"]
    assert shape_diff({"a": 1, "b": {}}, theirs) == ["$.b: missing key 'c'"]
    assert shape_diff({"a": 1, "b": {"c": []}, "d": 0}, theirs) == ["$: extra key 'd'"]
