"""Token counts from each route's own usage report, without changing what the client gets.

llama-server reports the tokens of an answer in one of four shapes, each counted as prompt + completion:

* OpenAI (``/v1/chat/completions``, ``/v1/completions``, embeddings, rerank, transcriptions):
  ``usage.prompt_tokens`` and ``completion_tokens``.  A streamed chat answer carries it only when the
  request asked with ``stream_options.include_usage``, in one extra event (``"choices": []`` plus
  ``usage``) after each result's last chunk.
* The Responses API (``/v1/responses``): ``usage.input_tokens`` and ``output_tokens``; streamed, in the
  ``response.completed`` event.
* Anthropic (``/v1/messages``): ``usage.input_tokens`` (plus ``cache_read_input_tokens``, the prompt
  tokens the cache held) and ``output_tokens``; streamed, ``message_start`` carries the input tokens and
  ``message_delta`` the output tokens, each a count so far.
* llama.cpp's own (``/completion``, ``/completions``, ``/infill``): ``tokens_evaluated`` and
  ``tokens_predicted`` at the top of each result (an array of them for several prompts); streamed, every
  event carries its result's counts so far.

A streamed request on an OpenAI route that did not ask for usage, or asked for none, is asked on its
client's behalf, and the extra event is removed from the stream, so the client sees exactly what it asked
for: a quota cannot be escaped by not asking.  Likewise a llama.cpp ``response_fields`` list always
keeps the two counts.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Routes whose streamed responses follow OpenAI's include_usage convention.  (llama-server's
# ``/completions`` is its own ``/completion``, not OpenAI's.)
USAGE_OPTION_ROUTES = frozenset({b"/v1/chat/completions", b"/v1/completions", b"/chat/completions"})
# Routes answered in llama.cpp's own shape, where ``response_fields`` may filter the final result.
NATIVE_ROUTES = frozenset({b"/completion", b"/completions", b"/infill"})
NATIVE_COUNTS = ("tokens_evaluated", "tokens_predicted")
PROMPT_KEYS = ("prompt_tokens", "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
COMPLETION_KEYS = ("completion_tokens", "output_tokens")
MAX_EVENT = 1 << 20  # bytes of an unfinished SSE event kept for reading; a longer one is not read
# A count in a JSON body: a key right after "{" or "," (so never inside a string, where a quote is
# escaped) and a whole number; one that may go on in the next chunk waits for it.
_BODY_COUNT = re.compile(
    rb'[{,]\s{0,16}"(' + b"|".join(k.encode() for k in (*PROMPT_KEYS, *COMPLETION_KEYS, *NATIVE_COUNTS))
    + rb')"\s{0,16}:\s{0,16}(\d{1,18})(?=[\s,}\]])')
CARRY = 128  # bytes longer than any count, kept from one chunk to the next
_INDEX = re.compile(rb'"index":(\d+)')  # in llama.cpp's own events, the result's number comes first


def ask_for_usage(path: bytes, payload: dict[str, Any]) -> tuple[bool, bool]:
    """Make ``payload`` (changed in place) report its tokens.  Returns (changed, strip): whether the body
    must be sent re-encoded, and whether the stream's usage event is llamad's to remove."""
    if path in NATIVE_ROUTES:
        return _keep_native_counts(payload), False
    if path not in USAGE_OPTION_ROUTES or payload.get("stream") is not True:
        return False, False
    options = payload.get("stream_options")
    if isinstance(options, dict):
        # What llama-server reads as "no usage": absent, null or false (another value it refuses).
        asked = options.get("include_usage")
        if asked is not None and asked is not False:
            return False, False
    payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True, True


def _keep_native_counts(payload: dict[str, Any]) -> bool:
    """A ``response_fields`` list keeps only the fields it names: add the two counts to it."""
    fields = payload.get("response_fields")
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
        return False  # none (every field comes), or one llama-server refuses
    missing = [name for name in NATIVE_COUNTS if name not in fields]
    if missing:
        payload["response_fields"] = [*fields, *missing]
    return bool(missing)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _side(usage: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    """The sum of the counts ``usage`` has of ``keys``; None if it has none."""
    counts = [c for c in (_count(usage.get(key)) for key in keys) if c is not None]
    return sum(counts) if counts else None


class _StreamCounts:
    """The counts in an SSE stream's events, each shape combined as it means them."""

    def __init__(self) -> None:
        self.seen = False
        self.finished = [0, 0]  # OpenAI and Responses: one report per finished result, added up
        self.message = [0, 0]  # Anthropic: the one message's counts so far
        self.results: dict[int, tuple[int, int]] = {}  # llama.cpp's own: each result's counts so far
        self.latest: dict[bytes, bytes] = {}  # llama.cpp's own: each result's last event, not yet parsed

    def read(self, event: bytes) -> bool:
        """Take the counts of one event; True if it is an extra usage-only event."""
        if b'"tokens_' in event:
            # llama.cpp's own shape: each event carries its result's counts so far, so only each
            # result's last one is parsed, when the counts are asked for (not once per token).
            index = _INDEX.search(event)
            self.latest[index.group(1) if index else b"0"] = event
            return False
        return self.event(_data(event))

    def event(self, doc: Any) -> bool:
        """Take the counts of one event's data; True if it is an extra usage-only event."""
        if not isinstance(doc, dict):
            return False
        kind = doc.get("type")
        if kind == "message_start" or kind == "message_delta":
            message = doc.get("message") if kind == "message_start" else doc
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                for i, keys in enumerate((PROMPT_KEYS, COMPLETION_KEYS)):
                    count = _side(usage, keys)
                    if count is not None:
                        self.message[i], self.seen = count, True
            return False
        usage = doc.get("usage")
        response = doc.get("response")
        if usage is None and isinstance(response, dict):
            usage = response.get("usage")  # response.completed
        if isinstance(usage, dict):
            prompt, completion = _side(usage, PROMPT_KEYS), _side(usage, COMPLETION_KEYS)
            if prompt is None and completion is None:
                return False
            self.finished[0] += prompt or 0
            self.finished[1] += completion or 0
            self.seen = True
            return doc.get("choices") == []
        evaluated, predicted = _count(doc.get(NATIVE_COUNTS[0])), _count(doc.get(NATIVE_COUNTS[1]))
        if evaluated is not None or predicted is not None:
            index = doc.get("index")
            self.results[index if _count(index) is not None else 0] = (evaluated or 0, predicted or 0)
            self.seen = True
        return False

    def total(self) -> tuple[int, int] | None:
        if self.latest:
            latest, self.latest = self.latest, {}
            for event in latest.values():
                self.event(_data(event))
        if not self.seen:
            return None
        results = self.results.values()
        return (self.finished[0] + self.message[0] + sum(r[0] for r in results),
                self.finished[1] + self.message[1] + sum(r[1] for r in results))


class _BodyCounts:
    """The counts in a JSON body, found as its bytes pass (no copy of the body is kept): every
    result's are added up (llama.cpp answers several prompts with an array of results)."""

    def __init__(self) -> None:
        self.sums: dict[bytes, int] = {}
        self.carry = b""

    def scan(self, data: bytes, end: bool = False) -> None:
        buffered = self.carry + data if self.carry else data
        if end:
            buffered += b"\n"  # a count at the very end is whole
        last = 0
        if b'_tokens"' in buffered or b'"tokens_' in buffered:
            for match in _BODY_COUNT.finditer(buffered):
                key = match.group(1)
                self.sums[key] = self.sums.get(key, 0) + int(match.group(2))
                last = match.end()
        self.carry = b"" if end else buffered[max(last, len(buffered) - CARRY):]

    def total(self) -> tuple[int, int] | None:
        """The larger of the two shapes' totals: a response has one, or both alike (llama.cpp's
        ``__verbose``); a count the client slipped into echoed JSON can only add."""
        sums = self.sums
        shapes = [(sum(sums.get(k.encode(), 0) for k in prompt), sum(sums.get(k.encode(), 0) for k in completion))
                  for prompt, completion in ((PROMPT_KEYS, COMPLETION_KEYS), (NATIVE_COUNTS[:1], NATIVE_COUNTS[1:]))
                  if any(k.encode() in sums for k in (*prompt, *completion))]
        return max(shapes, key=sum) if shapes else None


def _data(event: bytes) -> Any:
    """The JSON of an SSE event's ``data:`` field (whatever chunk framing comes before it); None if none."""
    at = event.find(b"data:")
    if at < 0:
        return None
    try:
        return json.loads(event[at + 5:])
    except ValueError:
        return None


def _events(data: bytes, end: int) -> list[bytes]:
    """The events of ``data`` up to ``end`` that may hold counts: every shape's count has "tokens" in its
    name (and llama.cpp's own events a ``tokens`` array), a cheap look before parsing."""
    return [event for event in data[:end].split(b"\n\n") if b"tokens" in event]


class UsageTap:
    """Sees each body chunk on its way to the client; counts the tokens its usage reports say."""

    def __init__(self, sse: bool, strip_usage_event: bool) -> None:
        self.sse = sse
        self.strip = sse and strip_usage_event
        self.tail = b""  # stripped streams: an incomplete event, held back from the client
        self.partial = b""  # other streams: an incomplete event, for reading only
        self.stream = _StreamCounts()
        self.body = _BodyCounts()

    @property
    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens so far; None while no count was seen."""
        return self.stream.total() if self.sse else self.body.total()

    def keep_all(self) -> bytes:
        """Remove no event from here on; returns what was held back of an event begun earlier."""
        self.strip = False
        rest, self.tail = self.tail, b""
        self.partial = rest
        return rest

    def passes(self, framed: bytes) -> bool:
        """Whether whole chunks (one SSE event each, as a model server writes them) can go to the
        client unchanged: always, unless the usage event is being removed and they may hold it.
        A stream that keeps every event is read here, chunk framing and all."""
        if not self.strip:
            self._read(framed)
            return True
        return not self.tail and framed.endswith(b"\n\n\r\n") and b'"usage"' not in framed

    def feed(self, data: bytes) -> bytes:
        """The bytes to relay for ``data``."""
        if not self.strip:
            self._read(data)
            return data
        buffered = self.tail + data
        end = buffered.rfind(b"\n\n")
        if end < 0:
            self.tail = buffered
            return b""
        complete, self.tail = buffered[: end + 2], buffered[end + 2:]
        if b'"usage"' not in complete:
            return complete  # a stream that is stripped is OpenAI's: its counts are in usage only
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            if b'"usage"' in event and self.stream.event(_data(event)):
                continue  # the usage-only event llamad asked for
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def _read(self, data: bytes) -> None:
        """Count what ``data`` reports, without changing it."""
        if not self.sse:
            self.body.scan(data)
            return
        if self.partial:
            data, self.partial = self.partial + data, b""
        if data.endswith((b"\n\n", b"\n\n\r\n")):
            end = len(data)  # whole events, as a model server writes them: nothing to keep
        else:
            end = data.rfind(b"\n\n")
            rest = data[end + 2:] if end >= 0 else data
            self.partial = rest if len(rest) <= MAX_EVENT else b""
            if end < 0:
                return
        if b"tokens" in data:
            if data.find(b"\n\n") + 4 >= end:  # one event, as a model server writes them
                self.stream.read(data if end == len(data) else data[:end])
            else:
                for event in _events(data, end):
                    self.stream.read(event)

    def finish(self) -> bytes:
        """Anything still held back; call at the end of the body (again: nothing more)."""
        if not self.sse:
            self.body.scan(b"", end=True)
            return b""
        rest, self.tail = self.tail, b""
        last, self.partial = rest or self.partial, b""
        if b"tokens" in last:
            self.stream.read(last)  # a last event without its blank line
        return rest
