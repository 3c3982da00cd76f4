"""Token usage: asking the child for it, reading it, and hiding the event the client did not ask for."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire import DONE, EVENTS, FINAL, USAGE, chunk_event

from llamad.gateway.usage import USAGE_OPTION_ROUTES, UsageTap, ask_for_usage

# --- ask_for_usage ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(USAGE_OPTION_ROUTES))
def test_asks_for_usage_on_streamed_openai_routes(path):
    payload = {"stream": True, "messages": []}
    assert ask_for_usage(path, payload) == (True, True)
    assert payload == {"stream": True, "messages": [], "stream_options": {"include_usage": True}}


def test_the_openai_routes():
    """llama-server's ``/completions`` answers in its own shape, like ``/completion``: no usage option."""
    assert USAGE_OPTION_ROUTES == {b"/v1/chat/completions", b"/v1/completions", b"/chat/completions"}


@pytest.mark.parametrize("payload", [{}, {"stream": False}, {"stream": "true"}, {"stream": 1}])
def test_leaves_unstreamed_requests_alone(payload):
    before = dict(payload)
    assert ask_for_usage(b"/v1/chat/completions", payload) == (False, False) and payload == before


@pytest.mark.parametrize("path", [b"/v1/embeddings", b"/completion", b"/completions", b"/infill", b"/v1/responses",
                                  b"/v1/messages"])
def test_leaves_other_routes_alone(path):
    """They report their usage unasked."""
    payload = {"stream": True}
    assert ask_for_usage(path, payload) == (False, False) and payload == {"stream": True}


def test_keeps_the_clients_other_stream_options():
    payload = {"stream": True, "stream_options": {"continuous_usage_stats": False}}
    assert ask_for_usage(b"/v1/completions", payload) == (True, True)
    assert payload["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


def test_a_client_that_asked_for_usage_gets_it_untouched():
    payload = {"stream": True, "stream_options": {"include_usage": True}}
    assert ask_for_usage(b"/v1/chat/completions", payload) == (False, False)
    assert payload["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("choice", [False, None])
def test_a_client_that_asked_for_no_usage_is_asked_for_anyway_and_loses_it_again(choice):
    """Otherwise a stream would escape its key's token quota."""
    payload = {"stream": True, "stream_options": {"include_usage": choice}}
    assert ask_for_usage(b"/v1/chat/completions", payload) == (True, True)
    assert payload["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("value", ["yes", 0, 1, []])
def test_an_include_usage_that_is_no_boolean_is_the_childs_to_refuse(value):
    payload = {"stream": True, "stream_options": {"include_usage": value}}
    assert ask_for_usage(b"/v1/chat/completions", payload) == (False, False)
    assert payload["stream_options"] == {"include_usage": value}


@pytest.mark.parametrize("path", [b"/completion", b"/completions", b"/infill"])
@pytest.mark.parametrize("stream", [True, False])
def test_response_fields_keep_the_native_counts(path, stream):
    """llama-server keeps only the fields ``response_fields`` names in a final result."""
    payload = {"stream": stream, "response_fields": ["content", "tokens_predicted"]}
    assert ask_for_usage(path, payload) == (True, False)
    assert payload["response_fields"] == ["content", "tokens_predicted", "tokens_evaluated"]
    assert ask_for_usage(path, payload) == (False, False)  # both there already


@pytest.mark.parametrize("fields", [[], "content", ["content", 1], None])
def test_response_fields_that_keep_every_field_or_are_refused_are_left_alone(fields):
    payload = {"response_fields": fields}
    assert ask_for_usage(b"/completion", payload) == (False, False) and payload == {"response_fields": fields}


# --- streams -----------------------------------------------------------------------------


STREAM = b"".join(EVENTS) + USAGE + DONE


def relay(tap: UsageTap, chunks: list[bytes]) -> bytes:
    return b"".join(tap.feed(c) for c in chunks) + tap.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in pairwise(points)]


def test_plain_json_split_across_chunks_is_unchanged_and_usage_read_as_it_passes():
    body = json.dumps({"choices": [{"message": {"content": "x" * 10000}}], "object": "chat.completion",
                       "usage": {"completion_tokens": 7, "prompt_tokens": 5, "total_tokens": 12}}).encode()
    tap = UsageTap(sse=False, strip_usage_event=True)
    chunks = split(body, list(range(0, len(body), 997)))
    out = [tap.feed(c) for c in chunks]
    assert out == chunks and tap.usage == (5, 7)
    assert tap.finish() == b"" and tap.usage == (5, 7)
    assert tap.finish() == b"" and tap.usage == (5, 7)  # a second finish adds nothing


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


# --- each route's own shape ---------------------------------------------------------------------
# As llama-server writes them (keys sorted, compact), trimmed of fields that carry no count.


def sse(*docs: dict, event: bool = False) -> list[bytes]:
    """One SSE event per document; ``event``: with its ``event:`` line (Anthropic, Responses)."""
    return [(b"event: " + d["type"].encode() + b"\n" if event else b"")
            + b"data: " + json.dumps(d, separators=(",", ":")).encode() + b"\n\n" for d in docs]


def counted(chunks: list[bytes], sse_: bool, strip: bool = False) -> tuple[bytes, tuple[int, int] | None]:
    tap = UsageTap(sse=sse_, strip_usage_event=strip)
    out = relay(tap, chunks)
    return out, tap.usage


def native(index: int, content: str, evaluated: int, predicted: int, stop: bool = False, **more) -> dict:
    return {"content": content, "id_slot": 0, "index": index, "stop": stop, "tokens": [],
            "tokens_evaluated": evaluated, "tokens_predicted": predicted, **more}


def test_native_body_counts_evaluated_and_predicted():
    body = json.dumps(native(0, "ab", 9, 4, stop=True, generation_settings={"n_predict": 4},
                             timings={"cache_n": 0, "predicted_n": 4, "prompt_n": 9})).encode()
    assert counted(split(body, [10, 200]), False) == (body, (9, 4))


def test_native_body_of_several_prompts_adds_every_result():
    body = json.dumps([native(0, "a", 9, 4, stop=True), native(1, "b", 7, 4, stop=True)]).encode()
    assert counted([body], False)[1] == (16, 8)


def test_native_stream_counts_each_results_last_counts_so_far():
    events = sse(native(0, "a", 5, 1), native(1, "b", 6, 1), native(0, "c", 5, 2), native(1, "", 6, 2, stop=True),
                 native(0, "", 5, 3, stop=True))
    assert counted(events, True) == (b"".join(events), (11, 5))
    assert counted([b"".join(events)], True)[1] == (11, 5)  # several events in one chunk


def test_native_stream_whose_final_result_was_filtered_keeps_the_counts_so_far():
    events = sse(native(0, "a", 5, 1), native(0, "b", 5, 2), {"content": "ab"})
    assert counted(events, True)[1] == (5, 2)


def test_anthropic_body_counts_cached_and_new_input_tokens():
    body = json.dumps({"content": [{"text": "ab", "type": "text"}], "id": "chatcmpl-1", "model": "demo",
                       "role": "assistant", "stop_reason": "max_tokens", "stop_sequence": None, "type": "message",
                       "usage": {"cache_read_input_tokens": 3, "input_tokens": 6, "output_tokens": 4}}).encode()
    assert counted([body], False)[1] == (9, 4)


ANTHROPIC_STREAM = sse(
    {"message": {"content": [], "id": "chatcmpl-1", "model": "demo", "role": "assistant", "stop_reason": None,
                 "stop_sequence": None, "type": "message",
                 "usage": {"cache_read_input_tokens": 2, "input_tokens": 7, "output_tokens": 0}},
     "type": "message_start"},
    {"content_block": {"text": "", "type": "text"}, "index": 0, "type": "content_block_start"},
    {"delta": {"text": "ab", "type": "text_delta"}, "index": 0, "type": "content_block_delta"},
    {"index": 0, "type": "content_block_stop"},
    {"delta": {"stop_reason": "max_tokens", "stop_sequence": None}, "type": "message_delta",
     "usage": {"output_tokens": 5}},
    {"type": "message_stop"}, event=True)


def test_anthropic_stream_takes_input_from_message_start_and_output_from_message_delta():
    assert counted(ANTHROPIC_STREAM, True) == (b"".join(ANTHROPIC_STREAM), (9, 5))


def test_anthropic_counts_are_counts_so_far_not_added_up():
    delta = sse({"type": "message_delta", "usage": {"input_tokens": 7, "cache_read_input_tokens": 2,
                                                    "output_tokens": 6}}, event=True)
    assert counted([*ANTHROPIC_STREAM, *delta], True)[1] == (9, 6)


RESPONSE_USAGE = {"input_tokens": 8, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
                  "total_tokens": 12}


def test_responses_body_counts_input_and_output_tokens():
    body = json.dumps({"completed_at": 1, "created_at": 1, "id": "resp_1", "model": "demo", "object": "response",
                       "output": [{"content": [{"text": "ab", "type": "output_text"}], "type": "message"}],
                       "status": "completed", "usage": RESPONSE_USAGE}).encode()
    assert counted([body], False)[1] == (8, 4)


def test_responses_stream_counts_the_completed_event():
    events = sse({"response": {"id": "resp_1", "object": "response", "status": "in_progress"},
                  "type": "response.created"},
                 {"delta": "ab", "item_id": "msg_1", "type": "response.output_text.delta"},
                 {"response": {"id": "resp_1", "output": [], "status": "completed", "usage": RESPONSE_USAGE},
                  "timings": {"predicted_n": 4}, "type": "response.completed"}, event=True)
    assert counted(events, True) == (b"".join(events), (8, 4))


def test_a_stream_of_several_results_adds_up_their_usage_events():
    """``n`` > 1: each result ends with its own usage event."""
    second = USAGE.replace(b'"completion_tokens":3', b'"completion_tokens":5')
    out, usage = counted([*EVENTS, USAGE, second, DONE], True, strip=True)
    assert out == b"".join(EVENTS) + DONE and usage == (24, 8)


def test_framed_chunks_of_a_stream_are_read_through_their_framing():
    """The front passes the child's chunks as they came, chunk sizes and all."""
    tap = UsageTap(sse=True, strip_usage_event=False)
    framed = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in ANTHROPIC_STREAM) + b"0\r\n\r\n"
    for piece in split(framed, [7, 300, 301, len(framed) - 4]):
        assert tap.passes(piece)
    tap.finish()
    assert tap.usage == (9, 5)


def test_a_count_in_a_string_is_not_counted():
    content = 'say {"prompt_tokens": 999, "tokens_evaluated": 999}'
    body = json.dumps({"choices": [{"message": {"content": content}}], "usage": {
        "completion_tokens": 2, "prompt_tokens": 3}}).encode()
    assert counted([body], False)[1] == (3, 2)


def test_a_count_slipped_into_echoed_json_cannot_lower_the_real_one():
    """llama.cpp echoes a request's settings (a JSON schema, say) before its counts."""
    body = json.dumps(native(0, "a", 9, 4, stop=True, generation_settings={
        "json_schema": {"prompt_tokens": 0, "completion_tokens": 0}})).encode()
    assert counted([body], False)[1] == (9, 4)


def test_both_shapes_in_one_body_count_once():
    """An OpenAI body with llama.cpp's ``__verbose`` copy of its result."""
    body = json.dumps({"__verbose": native(0, "a", 9, 4, stop=True), "choices": [],
                       "usage": {"completion_tokens": 4, "prompt_tokens": 9}}).encode()
    assert counted([body], False)[1] == (9, 4)


def test_a_body_without_counts_has_no_usage():
    """llama-server's own /embedding answers with no token count."""
    assert counted([b'[{"embedding":[[0.5,0.25]],"index":0}]'], False)[1] is None


@settings(max_examples=300, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=4),
       cuts=st.lists(st.integers(min_value=1, max_value=10**4), max_size=25))
def test_any_split_of_a_body_counts_the_same(prompts, cuts):
    body = json.dumps([native(i, "x" * (i * 40), p, c, stop=True) for i, (p, c) in enumerate(prompts)],
                      indent=1 if len(prompts) % 2 else None).encode()
    out, usage = counted(split(body, [c % len(body) for c in cuts if c % len(body)]), False)
    assert out == body and usage == (sum(p for p, _ in prompts), sum(c for _, c in prompts))


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=10**4), max_size=25), strip=st.booleans())
def test_any_split_of_an_anthropic_stream_counts_the_same(cuts, strip):
    stream = b"".join(ANTHROPIC_STREAM)
    out, usage = counted(split(stream, [c % len(stream) for c in cuts if c % len(stream)]), True, strip)
    assert out == stream and usage == (9, 5)
