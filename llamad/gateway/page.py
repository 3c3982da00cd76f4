"""The status page (``/ui/``): its files, shipped in the package and read once, and the child log tail it shows.

The page's routes are llamad's own (``gateway/app.py``); what they read is here, off the reactor where it
touches a file.
"""

from __future__ import annotations

import os
from importlib import resources

# The page's own files only: no inline script or style, no other origin, never framed.
PAGE_POLICY = (b"default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
               b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
# Read once at import (a few KiB, shipped in the package), so that no request reads a file on the reactor.
PAGE_FILES: dict[bytes, tuple[bytes, bytes]] = {
    path: (resources.files("llamad.gateway").joinpath("ui", name).read_bytes(), content_type)
    for path, name, content_type in (
        (b"/ui", "index.html", b"text/html; charset=utf-8"),
        (b"/ui/", "index.html", b"text/html; charset=utf-8"),
        (b"/ui/app.js", "app.js", b"text/javascript; charset=utf-8"),
        (b"/ui/style.css", "style.css", b"text/css; charset=utf-8"),
    )
}
# What the page polls: kept out of the recent requests, or its own polling would crowd out what it shows.
PAGE_ROUTES = frozenset({"/ui", "/ui/", "/ui/app.js", "/ui/style.css", "/admin/status", "/admin/logs",
                         "/admin/requests", "/admin/keys"})
RECENT_REQUESTS = 200  # access lines kept in memory for /admin/requests
LOG_TAIL_BYTES = 65536  # the most of a child's log one /admin/logs answer reads


def read_log_tail(path: str, after: int | None, limit: int = LOG_TAIL_BYTES) -> tuple[list[str], int]:
    """In a thread: the complete lines of ``path`` from byte ``after`` on (None: its last lines), at most
    ``limit`` bytes of them, and the offset to ask from next time.

    A file shorter than ``after`` was rotated, so its last lines come again; a line still being
    written waits for its newline.  No file yet: no lines.
    """
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return [], 0
    with file:
        size = os.fstat(file.fileno()).st_size
        from_line = after is not None and after <= size  # else: the last lines (first call, or rotated)
        start = after if after is not None and from_line else max(0, size - limit)
        if size - start > limit:  # more arrived than one answer holds: its newest lines
            start, from_line = size - limit, False
        partial = not from_line and start > 0
        if partial:
            start -= 1  # the byte before: a newline there means the first line is whole
        file.seek(start)
        data = file.read(size - start)
    if partial:
        cut = data.find(b"\n")
        data, start = (data[cut + 1:], start + cut + 1) if cut >= 0 else (b"", start + len(data))
    end = data.rfind(b"\n") + 1
    lines = data[:end - 1].split(b"\n") if end else []
    return [line.decode("utf-8", "replace") for line in lines], start + end
