"""Token usage: asking the child for it, reading it, and hiding the event the client did not ask for."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamad.gateway.usage import USAGE_OPTION_ROUTES, UsageTap, ask_for_usage

# --- ask_for_usage ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(USAGE_OPTION_ROUTES))
def test_asks_for_usage_on_streamed_openai_routes(path):
    payload = {"stream": True, "messages": []}
    assert ask_for_usage(path, payload) is True
    assert payload == {"stream": True, "messages": [], "stream_options": {"include_usage": True}}


def test_the_four_routes():
    assert USAGE_OPTION_ROUTES == {b"/v1/chat/completions", b"/v1/completions", b"/chat/completions",
                                   b"/completions"}


@pytest.mark.parametrize("payload", [{}, {"stream": False}, {"stream": "true"}, {"stream": 1}])
def test_leaves_unstreamed_requests_alone(payload):
    before = dict(payload)
    assert ask_for_usage(b"/v1/chat/completions", payload) is False and payload == before


@pytest.mark.parametrize("path", [b"/v1/embeddings", b"/completion", b"/infill", b"/v1/responses"])
def test_leaves_other_routes_alone(path):
    payload = {"stream": True}
    assert ask_for_usage(path, payload) is False and payload == {"stream": True}


def test_keeps_the_clients_other_stream_options():
    payload = {"stream": True, "stream_options": {"continuous_usage_stats": False}}
    assert ask_for_usage(b"/v1/completions", payload) is True
    assert payload["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


@pytest.mark.parametrize("choice", [True, False])
def test_respects_the_clients_own_include_usage(choice):
    payload = {"stream": True, "stream_options": {"include_usage": choice}}
    assert ask_for_usage(b"/v1/chat/completions", payload) is False
    assert payload["stream_options"] == {"include_usage": choice}


# --- streams -----------------------------------------------------------------------------


def chunk_event(n: int, content: str) -> bytes:
    body = {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": content}}], "created": 1,
            "id": "chatcmpl-1", "model": "demo", "object": "chat.completion.chunk"}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


FINAL = (b'data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"created":1,"id":"chatcmpl-1",'
         b'"model":"demo","object":"chat.completion.chunk","timings":{"predicted_n":3}}\n\n')
USAGE = (b'data: {"choices":[],"created":1,"id":"chatcmpl-1","model":"demo","object":"chat.completion.chunk",'
         b'"usage":{"completion_tokens":3,"prompt_tokens":12,"total_tokens":15}}\n\n')
DONE = b"data: [DONE]\n\n"
EVENTS = [chunk_event(0, "Hel"), chunk_event(1, "lo \"usage\" \n\n"), chunk_event(2, "!"), FINAL]
STREAM = b"".join(EVENTS) + USAGE + DONE


def relay(tap: UsageTap, chunks: list[bytes]) -> bytes:
    return b"".join(tap.feed(c) for c in chunks) + tap.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in pairwise(points)]


def test_plain_json_split_across_chunks_is_unchanged_and_usage_read_at_finish():
    body = json.dumps({"choices": [{"message": {"content": "x" * 10000}}], "object": "chat.completion",
                       "usage": {"completion_tokens": 7, "prompt_tokens": 5, "total_tokens": 12}}).encode()
    tap = UsageTap(sse=False, strip_usage_event=True)
    chunks = split(body, list(range(0, len(body), 997)))
    out = [tap.feed(c) for c in chunks]
    assert out == chunks and tap.usage is None
    assert tap.finish() == b"" and tap.usage == (5, 7)


def test_plain_json_without_usage_records_none():
    tap = UsageTap(sse=False, strip_usage_event=False)
    assert relay(tap, [b'{"object": "list", ', b'"data": []}']) == b'{"object": "list", "data": []}'
    assert tap.usage is None


def test_sse_without_stripping_is_unchanged_and_records_usage():
    tap = UsageTap(sse=True, strip_usage_event=False)
    chunks = [e for e in EVENTS] + [USAGE, DONE]
    assert [tap.feed(c) for c in chunks] == chunks and tap.finish() == b""
    assert tap.usage == (12, 3)


def test_sse_without_stripping_reads_usage_split_across_chunks():
    at = STREAM.index(b'"prompt_tokens"')
    tap = UsageTap(sse=True, strip_usage_event=False)
    assert relay(tap, [STREAM[:at], STREAM[at:]]) == STREAM
    assert tap.usage == (12, 3)


def test_sse_stripping_removes_only_the_usage_event():
    tap = UsageTap(sse=True, strip_usage_event=True)
    assert relay(tap, [STREAM]) == b"".join(EVENTS) + DONE
    assert tap.usage == (12, 3)


def test_sse_stripping_reassembles_events_split_across_chunks():
    tap = UsageTap(sse=True, strip_usage_event=True)
    usage_at = STREAM.index(USAGE)
    cuts = [5, len(EVENTS[0]) + 1, usage_at + 20, usage_at + len(USAGE) - 1, len(STREAM) - 3]
    out = [tap.feed(c) for c in split(STREAM, cuts)]
    assert b"".join(out) + tap.finish() == b"".join(EVENTS) + DONE
    assert all(o == b"" or o.endswith(b"\n\n") for o in out)  # only whole events are relayed
    assert tap.usage == (12, 3)


def test_sse_stripping_keeps_a_usage_event_that_also_has_choices():
    """Some servers put usage on the last chunk: the client must still get that chunk."""
    event = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
             b'"usage":{"completion_tokens":2,"prompt_tokens":4}}\n\n')
    tap = UsageTap(sse=True, strip_usage_event=True)
    assert relay(tap, [EVENTS[0], event, DONE]) == EVENTS[0] + event + DONE
    assert tap.usage == (4, 2)


def test_sse_stripping_relays_an_unfinished_last_event_at_finish():
    tap = UsageTap(sse=True, strip_usage_event=True)
    assert tap.feed(EVENTS[0] + b"data: [DO") == EVENTS[0]
    assert tap.finish() == b"data: [DO"


@settings(max_examples=300, deadline=None)
@given(
    contents=st.lists(st.text(max_size=12), min_size=1, max_size=6),
    prompt=st.integers(0, 10**6),
    completion=st.integers(0, 10**6),
    cuts=st.lists(st.integers(min_value=1, max_value=10**4), max_size=25),
)
def test_any_split_of_a_stream_loses_nothing_but_the_usage_event(contents, prompt, completion, cuts):
    events = b"".join(chunk_event(i, c) for i, c in enumerate(contents)) + FINAL
    usage = b"data: " + json.dumps({"choices": [], "object": "chat.completion.chunk", "usage": {
        "completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion}}).encode()
    stream = events + usage + b"\n\n" + DONE
    tap = UsageTap(sse=True, strip_usage_event=True)
    assert relay(tap, split(stream, [c % len(stream) for c in cuts if c % len(stream)])) == events + DONE
    assert tap.usage == (prompt, completion)
