"""HTTP-level limits on port 8000, enforced by the front while the request is still arriving.

Each violation gets its specific status, never a bare 400: 413 for a body over the limit (decided
from ``Content-Length`` before the body is read, or while a chunked body
arrives), 414 for a request line over ``max_request_line``, 431 for more than
``max_headers`` headers or a header line over ``max_header_line``, 408 for a
client that does not finish its headers in time (slowloris), stalls while
sending a body, or sends it too slowly in all (one byte every few seconds
never stalls: see :func:`body_deadline`), 400 for an ambiguous body framing
(the stuff of request smuggling), a request target that is not a path, or any
other malformed request, 429 for a client with too many requests still
arriving at once.  A request with a body has its head checked by the guard
(API key included) before the body is read.  Each answer is OpenAI-shaped
JSON, then the connection closes.
"""

from __future__ import annotations

MAX_LINE = 8192  # default of the request line's and of each header line's limit
MAX_HEADERS = 64  # default of the header count's limit
MAX_HEAD_BYTES = 16384  # request line and all headers together (at least the two line limits' sum)
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to its last header
BODY_TIMEOUT = 30.0  # seconds a body may go without a byte
BODY_MIN_RATE = 500  # bytes per second a body must keep up after its first body_timeout seconds; 0 = any rate
MAX_INCOMPLETE_PER_CLIENT = 64  # requests one client IP may have arriving at once; 0 = no limit
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may sit idle
MAX_LENGTH_DIGITS = 18  # a longer Content-Length is over any limit (and too long for int() to be cheap)

REASONS = {408: b"Request Timeout", 413: b"Payload Too Large", 414: b"URI Too Long", 429: b"Too Many Requests",
           431: b"Request Header Fields Too Large"}


def body_deadline(started: float, received: int, body_timeout: float, min_rate: float) -> float:
    """When a body that began at ``started`` and has ``received`` bytes so far must be complete.

    ``body_timeout`` seconds, plus one second per ``min_rate`` bytes received
    (Apache's mod_reqtimeout ``MinRate``): a body trickled a byte at a time,
    which never stalls for ``body_timeout``, is cut once its time is spent,
    while a large body sent at any reasonable speed never is.  ``min_rate``
    0: no bound but the stall one.
    """
    return started + body_timeout + received / min_rate if min_rate > 0 else float("inf")


def slow_body_message(received: int, elapsed: float, body_timeout: float, min_rate: float) -> str:
    return (f"request body too slow: {received} bytes in {elapsed:.0f} s (a body gets {body_timeout:g} s "
            f"plus 1 s per {min_rate:g} bytes)")
