"""Which model a request is for."""

from __future__ import annotations

import pytest

from llamad.errors import ApiError
from llamad.gateway.routing import ModelDirectory, Routed, child_path

FLEET = ModelDirectory(["qwen2.5:7b", "gemma"], {"qwen2.5:7b": ["qwen"], "gemma": ["g"]})


def error(call) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_post_routes_by_the_bodys_model_id_or_alias():
    assert FLEET.route(b"POST", b"/v1/chat/completions", {"model": "qwen2.5:7b"}) == Routed("qwen2.5:7b",
                                                                                            b"/v1/chat/completions")
    assert FLEET.route(b"POST", b"/v1/completions", {"model": "g"}).model == "gemma"


def test_get_routes_by_the_query():
    assert FLEET.route(b"GET", b"/props?model=qwen", None) == Routed("qwen2.5:7b", b"/props?model=qwen")
    assert FLEET.route(b"GET", b"/slots?x=1&model=gemma", None).model == "gemma"


def test_upstream_passes_anything_to_one_model():
    assert FLEET.route(b"GET", b"/upstream/gemma/slots?id=1", None) == Routed("gemma", b"/slots?id=1")
    assert FLEET.route(b"POST", b"/upstream/qwen/completion", {"model": "gemma"}).model == "qwen2.5:7b"
    assert error(lambda: FLEET.route(b"GET", b"/upstream/nope/props", None)).status == 404


def test_the_child_path_is_the_path_without_the_upstream_prefix():
    assert child_path(b"/upstream/gemma/v1/chat/completions") == b"/v1/chat/completions"
    assert child_path(b"/upstream/gemma") == b"/"
    assert child_path(b"/v1/completions") == b"/v1/completions"
    assert child_path(b"/upstreams/v1/completions") == b"/upstreams/v1/completions"


def test_a_post_body_that_names_no_model_goes_by_the_query():
    assert FLEET.route(b"POST", b"/tokenize?model=g", {"content": "x"}).model == "gemma"
    assert FLEET.route(b"POST", b"/tokenize?model=g", {"model": "qwen"}).model == "qwen2.5:7b"  # the body first


def test_no_model_with_several_and_no_default_is_400_naming_the_choices():
    err = error(lambda: FLEET.route(b"POST", b"/v1/completions", {"prompt": "x"}))
    assert (err.status, err.code, err.param) == (400, "model_required", "model")
    assert "g, gemma, qwen, qwen2.5:7b" in err.message


def test_unknown_model_is_404_listing_the_ids():
    err = error(lambda: FLEET.route(b"POST", b"/v1/completions", {"model": "gpt-4"}))
    assert (err.status, err.code) == (404, "model_not_found") and "gpt-4" in err.message and "gemma" in err.message


def test_a_model_that_is_not_a_string_is_400():
    assert error(lambda: FLEET.route(b"POST", b"/v1/completions", {"model": ["gemma"]})).status == 400


def test_default_and_one_model():
    with_default = ModelDirectory(["a", "b"], {"b": ["bee"]}, default="bee")
    assert with_default.route(b"POST", b"/v1/completions", {}).model == "b"
    assert ModelDirectory(["only"]).route(b"GET", b"/props", None).model == "only"
    assert error(lambda: ModelDirectory(["only"]).resolve("other")).status == 404


def test_a_one_model_llamad_takes_any_name_as_llama_server_does():
    single = ModelDirectory(["demo"], lenient=True)
    assert single.route(b"POST", b"/v1/chat/completions", {"model": "gpt-3.5-turbo"}).model == "demo"
    assert ModelDirectory(["a", "b"], lenient=True).names.get("zzz") is None  # lenient only with one model


def test_a_model_without_a_name_is_still_the_default():
    # backend.kind = "none" or an unnamed model: one runtime under "", which every request reaches.
    assert ModelDirectory([""], lenient=True).route(b"POST", b"/v1/chat/completions", {}).model == ""
