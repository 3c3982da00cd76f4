"""The one helper for the delayed calls every component keeps."""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancel(call: IDelayedCall | None) -> None:
    """Cancel ``call`` if it is still pending; returns None, to clear the attribute holding it."""
    if call is not None and call.active():
        call.cancel()
    return None
