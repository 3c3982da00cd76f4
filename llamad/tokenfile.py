"""Each key's token use, saved on the volume so that a restart does not hand out a fresh quota.

``tokens_per_day`` means little if a restart (a crash, a new config, a
redeploy) forgets the day.  The token windows of keys with a quota are
written to ``{data_dir}/state/token_use.json`` every :data:`SAVE_INTERVAL`
seconds and at shutdown, and added back at start; buckets that have left
their window by then are dropped.  A crash loses at most the last interval.
No database: one small JSON file, replaced atomically, written off the reactor.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llamad.policy import Policy

log = Logger(namespace="llamad.tokens")

SAVE_INTERVAL = 60.0
FILE_NAME = os.path.join("state", "token_use.json")


def read_state(path: str) -> dict[str, dict[str, list[list[float]]]]:
    """The saved windows, or nothing (with a warning) when the file is missing or not what it should be."""
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warn("token use: {path} cannot be read ({e}); quotas start from zero", path=path, e=e)
        return {}
    state: dict[str, dict[str, list[list[float]]]] = {}
    if not isinstance(raw, dict):
        log.warn("token use: {path} is not a JSON object; quotas start from zero", path=path)
        return {}
    for key_id, windows in raw.items():
        try:
            state[key_id] = {name: [[float(start), int(tokens)] for start, tokens in windows.get(name, [])]
                             for name in ("minute", "day")}
        except (AttributeError, TypeError, ValueError):
            log.warn("token use: {path} has a bad entry for key {key!r}; it is skipped", path=path, key=key_id)
    return state


def write_state(path: str, state: dict[str, Any]) -> None:
    """Replace the file at once (a reader or a crash never sees half of it)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".token_use-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class TokenFile(Service):
    """Loads the saved windows at start, saves them every ``interval`` seconds and at stop."""

    name = "token-file"

    def __init__(self, policy: Policy, path: str, clock: IReactorTime, interval: float = SAVE_INTERVAL,
                 in_thread: Callable[..., Deferred[Any]] = threads.deferToThread) -> None:
        self.policy = policy
        self.path = path
        self.interval = interval
        self.in_thread = in_thread
        self.loop = LoopingCall(self.save)
        self.loop.clock = clock
        self.saved: dict[str, Any] | None = None  # the last state written (nothing new: no write)
        self._lock = threading.Lock()
        self._taken = 0  # states taken to write, numbered
        self._written = 0  # the newest one written: an older one landing later is not written

    def _write(self, number: int, state: dict[str, Any]) -> None:
        with self._lock:
            if number > self._written:
                write_state(self.path, state)
                self._written = number

    def startService(self) -> None:
        super().startService()
        state = read_state(self.path)  # small, once, before the first request
        if state:
            self.policy.restore_tokens(state)
            log.info("token use: restored the windows of {n} key(s) from {path}", n=len(state), path=self.path)
        self.saved = self.policy.token_state()
        self.loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        state = self.policy.token_state()
        if state != self.saved:
            self._taken += 1
            try:
                self._write(self._taken, state)  # shutting down: nothing else to wait for
            except OSError as e:
                log.warn("token use: cannot write {path}: {e}", path=self.path, e=e)

    def save(self) -> Deferred[Any] | None:
        """Write the windows if they changed, in a thread (the loop waits for one write to end before
        it starts the next interval)."""
        state = self.policy.token_state()
        if state == self.saved:
            return None
        self._taken += 1
        d = self.in_thread(self._write, self._taken, state)

        def written(_: object) -> None:
            self.saved = state

        def failed(failure: Any) -> None:
            log.warn("token use: cannot write {path}: {e}", path=self.path, e=failure.getErrorMessage())

        return d.addCallbacks(written, failed)
