"""A key's token quota in front of the real llama-server, on every gated route: each route's tokens are
counted in its own usage shape, streamed or not (a stream that asked for no usage included), until the key
is refused; once the quota is spent, every inference route answers 429."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_for

from llamad.gateway.app import INFERENCE_ROUTES

pytestmark = pytest.mark.integration

KEY = "quota-key-0123456789abc"
QUOTA = 120
PROMPT = "Hello"  # with 16 tokens out, a request takes 20 to 45 tokens (a chat template's included)
OUT = 16


def start(start_llamad, tmp_path: Path, quota: int = QUOTA, backend: dict[str, Any] | None = None):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.q]\nkey = "{KEY}"\ntokens_per_day = {quota}\n')
    return start_llamad(backend={"parallel": 1, **(backend or {})},
                        toml=f'[auth]\nenabled = true\nkeys_file = "{keys}"\n')


def post(daemon, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.api_port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body),
                     {"content-type": "application/json", "authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def access_lines(daemon, route: str) -> list[dict[str, Any]]:
    """The access log's lines of the key's requests on ``route``."""
    latest = daemon.data_dir / "logs" / "access" / "latest.txt"
    lines = [json.loads(line) for line in (latest.read_bytes() if latest.exists() else b"").splitlines() if line]
    return [line for line in lines if line["key_id"] == "q" and line["route"] == route]


CHAT = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": OUT, "ignore_eos": True}
PROMPTED = {"prompt": PROMPT, "max_tokens": OUT, "ignore_eos": True}
NATIVE = {"prompt": PROMPT, "n_predict": OUT, "ignore_eos": True}
RESPONSES = {"input": PROMPT, "max_output_tokens": OUT, "ignore_eos": True}
MESSAGES = CHAT
NO_USAGE = {"stream_options": {"include_usage": False}}
USAGE = {"stream_options": {"include_usage": True}}

# (route, body, stream): every route that runs the demo model, in each way it can answer (``/infill``
# needs a model with fill-in-the-middle tokens: the demo has none, and its answer is llama.cpp's own shape).
CASES = [
    ("/v1/chat/completions", CHAT, None),
    ("/v1/chat/completions", CHAT, {}),
    ("/v1/chat/completions", CHAT, NO_USAGE),
    ("/v1/chat/completions", CHAT, USAGE),
    ("/chat/completions", CHAT, None),
    ("/chat/completions", CHAT, NO_USAGE),
    ("/v1/completions", PROMPTED, None),
    ("/v1/completions", PROMPTED, {}),
    ("/v1/completions", PROMPTED, NO_USAGE),
    ("/completions", NATIVE, None),
    ("/completions", NATIVE, {}),
    ("/completion", NATIVE, None),
    ("/completion", NATIVE, {}),
    ("/completion", {**NATIVE, "response_fields": ["content"]}, None),
    ("/completion", {**NATIVE, "response_fields": ["content"]}, {}),
    ("/v1/responses", RESPONSES, None),
    ("/v1/responses", RESPONSES, {}),
    ("/responses", RESPONSES, {}),
    ("/v1/messages", MESSAGES, None),
    ("/v1/messages", MESSAGES, {}),
]


def case_id(case) -> str:
    route, body, stream = case
    mode = "plain" if stream is None else "stream" + (
        "" if not stream else "-usage" if stream["stream_options"]["include_usage"] else "-no-usage")
    return f"{route}-{mode}" + ("-fields" if "response_fields" in body else "")


def spend(daemon, route: str, body: dict[str, Any], limit: int = 12) -> tuple[list[bytes], dict[str, Any]]:
    """Requests until the key is refused: the answers it got first, and the refusal."""
    answers = []
    for _ in range(limit):
        status, data = post(daemon, route, body)
        if status == 429:
            return answers, json.loads(data)
        assert status == 200, (status, data[:500])
        answers.append(data)
    raise AssertionError(f"{limit} requests on {route} and the key of {QUOTA} tokens a day was never refused")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_route_counts_its_tokens_until_the_key_is_refused(start_llamad, tmp_path, case):
    route, body, stream = case
    daemon = start(start_llamad, tmp_path)
    request = body if stream is None else {**body, "stream": True, **stream}
    answers, refusal = spend(daemon, route, request)
    assert refusal["error"]["code"] == "token_quota_exceeded" and len(answers) >= 2
    if stream is not None:
        # The client gets the usage event exactly when it asked for it.
        events = [line for line in answers[0].splitlines() if line.startswith(b"data: {")]
        usage_only = [e for e in events if b'"choices":[]' in e and b'"usage"' in e]
        assert len(usage_only) == (1 if stream == USAGE else 0), answers[0][-600:]
    if "response_fields" in body and stream is None:
        assert set(json.loads(answers[0])) == {"content", "tokens_evaluated", "tokens_predicted"}
    # The access log has each answer's tokens.
    served = wait_for(lambda: len(found := access_lines(daemon, route)) > len(answers) and found, 30,
                      "the access log")
    assert [line["status"] for line in served] == [200] * len(answers) + [429], served
    assert all(line["prompt_tokens"] > 0 and line["completion_tokens"] > 0 for line in served[:-1]), served
    used = [line["prompt_tokens"] + line["completion_tokens"] for line in served[:-1]]
    assert sum(used[:-1]) < QUOTA <= sum(used)  # refused right after the request that crossed the quota


def test_every_gated_route_is_refused_once_the_quota_is_spent(start_llamad, tmp_path):
    daemon = start(start_llamad, tmp_path, quota=10)
    assert post(daemon, "/completion", NATIVE)[0] == 200  # over 20 tokens: the 10 are spent
    for route in sorted(INFERENCE_ROUTES):
        status, data = post(daemon, route, {"stream": True, **CHAT, **NATIVE})
        assert status == 429 and json.loads(data)["error"]["code"] == "token_quota_exceeded", (route, data)


def test_embeddings_count_their_prompt_tokens(start_llamad, tmp_path):
    daemon = start(start_llamad, tmp_path, quota=20, backend={"embeddings": True})
    answers, refusal = spend(daemon, "/v1/embeddings", {"input": PROMPT})
    assert refusal["error"]["code"] == "token_quota_exceeded"
    used = [json.loads(answer)["usage"]["prompt_tokens"] for answer in answers]
    assert sum(used[:-1]) < 20 <= sum(used)  # refused right after the request that crossed the quota


def test_a_stream_through_the_upstream_prefix_is_counted_as_its_route(start_llamad, tmp_path):
    daemon = start(start_llamad, tmp_path)
    path = f"/upstream/{daemon.health()['model']}/v1/chat/completions"
    answers, refusal = spend(daemon, path, {**CHAT, "stream": True, **NO_USAGE})
    assert refusal["error"]["code"] == "token_quota_exceeded" and len(answers) >= 2
    assert b'"usage"' not in answers[0]
