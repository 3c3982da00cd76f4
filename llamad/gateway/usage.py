"""Token counts from the ``usage`` in responses, without changing what the client gets.

A streamed OpenAI response carries ``usage`` only when the request asked with
``stream_options.include_usage``.  When the client did not ask, llamad asks on
its behalf and removes that one extra event (``"choices": []`` plus
``usage``) from the stream, so the client sees exactly what it asked for.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

# Routes whose streamed responses follow OpenAI's include_usage convention.
USAGE_OPTION_ROUTES = frozenset({b"/v1/chat/completions", b"/v1/completions", b"/chat/completions", b"/completions"})
TAIL_BYTES = 8192
RECENT_CHUNKS = 8
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def ask_for_usage(path: bytes, payload: dict[str, Any]) -> bool:
    """Add ``stream_options.include_usage`` to a streamed request that lacks it; True if added."""
    if path not in USAGE_OPTION_ROUTES or payload.get("stream") is not True:
        return False
    options = payload.get("stream_options")
    if isinstance(options, dict) and "include_usage" in options:
        return False
    payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


def _counts(text: bytes) -> tuple[int, int] | None:
    at = text.rfind(b'"usage"')
    if at < 0:
        return None
    prompt = _PROMPT.search(text, at)
    completion = _COMPLETION.search(text, at)
    if prompt is None and completion is None:
        return None
    return (int(prompt.group(1)) if prompt else 0, int(completion.group(1)) if completion else 0)


class UsageTap:
    """Sees each body chunk on its way to the client; remembers the last usage."""

    def __init__(self, sse: bool, strip_usage_event: bool) -> None:
        self.sse = sse
        self.strip = sse and strip_usage_event
        self.usage: tuple[int, int] | None = None
        self.tail = b""  # stripped streams: an incomplete event
        self.recent: deque[bytes] = deque(maxlen=RECENT_CHUNKS)  # others: read at finish, no copying

    def keep_all(self) -> bytes:
        """Remove no event from here on (the usage is then read from the last bytes at the end);
        returns what was held back of an event begun earlier."""
        self.strip = False
        rest, self.tail = self.tail, b""
        return rest

    def passes(self, framed: bytes) -> bool:
        """Whether whole chunks (one SSE event each, as a model server writes them) can go to the
        client unchanged: always, unless the usage event is being removed and they may hold it."""
        if not self.strip:
            self.recent.append(framed)  # the usage numbers are found in it all the same
            return True
        return not self.tail and framed.endswith(b"\n\n\r\n") and b'"usage"' not in framed

    def feed(self, data: bytes) -> bytes:
        """The bytes to relay for ``data``."""
        if not self.strip:
            self.recent.append(data)
            return data
        buffered = self.tail + data
        end = buffered.rfind(b"\n\n")
        if end < 0:
            self.tail = buffered
            return b""
        complete, self.tail = buffered[: end + 2], buffered[end + 2:]
        if b'"usage"' not in complete:
            return complete
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            if b'"usage"' in event and self._usage_only(event):
                continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def _usage_only(self, event: bytes) -> bool:
        """Record the usage of ``event``; True if it is the extra usage-only event."""
        payload = event.partition(b"data:")[2].strip()
        try:
            parsed = json.loads(payload)
        except ValueError:
            return False
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
        if not isinstance(usage, dict):
            return False
        self.usage = (int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
        return parsed.get("choices") == []

    def finish(self) -> bytes:
        """Anything still held back; call once at the end of the body."""
        if not self.strip:
            # usage sits at the end of a JSON body, or in the last events of a stream.
            self.usage = _counts(b"".join(self.recent)[-TAIL_BYTES:])
            return b""
        rest, self.tail = self.tail, b""
        return rest
