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
import math
import os
import reprlib
import tempfile
import threading
from typing import Any, Callable, Collection

from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llamad.keys.apikey import KEY_ID
from llamad.keys.policy import Policy

log = Logger(namespace="llamad.tokens")

SAVE_INTERVAL = 60.0
FILE_NAME = os.path.join("state", "token_use.json")
# The most buckets a saved window can hold: one per step of its span (policy.KeyUse: 1 s for the
# minute, 60 s for the day) and the one that straddles its start, twice over for a clock that jumped.
WINDOWS = {"minute": 2 * 61, "day": 2 * 1441}
# One key that used tokens in every minute of the last day takes about 33 KB: this holds some 250 of
# them.  The worst 8 MiB of JSON still parses in about 3 s and 200 MB on a slow core (50 MB: 18 s, 1.4 GB).
MAX_BYTES = 8 << 20
MAX_TOKENS = 1 << 53  # per bucket: beyond any real count, and exact as a JSON number everywhere
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40


def read_state(path: str, known: Collection[str] | None = None) -> dict[str, dict[str, list[list[float]]]]:
    """The saved windows of the keys in ``known`` (None: any key).

    The file is llamad's own, but it lives on a volume that others can write:
    nothing in it may stop the boot or count as credit.  A missing, oversized
    (not read at all) or unparsable file gives nothing; a bad bucket, an
    unknown field or a key that is not in ``known`` is dropped, each with a
    warning naming it, and the rest is kept.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = b"" if size > MAX_BYTES else f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warn("token use: {path} cannot be read ({e}); quotas start from zero", path=path, e=e)
        return {}
    if size > MAX_BYTES or len(data) > MAX_BYTES:
        log.warn("token use: {path} is larger than {max} bytes, far more than llamad writes: it is ignored and "
                 "quotas start from zero", path=path, max=MAX_BYTES)
        return {}
    try:
        raw = json.loads(data)
    except RecursionError:
        log.warn("token use: {path} cannot be read (nested too deeply); quotas start from zero", path=path)
        return {}
    except ValueError as e:
        log.warn("token use: {path} cannot be read ({e}); quotas start from zero", path=path, e=e)
        return {}
    if not isinstance(raw, dict):
        log.warn("token use: {path} is not a JSON object; quotas start from zero", path=path)
        return {}
    state: dict[str, dict[str, list[list[float]]]] = {}
    unknown: list[str] = []
    for key_id, windows in raw.items():
        if not KEY_ID.match(key_id) or (known is not None and key_id not in known):
            unknown.append(key_id)
            continue
        entry, problems = _windows(windows)
        for problem in problems:
            log.warn("token use: {path}: key {key}: {problem}", path=path, key=key_id, problem=problem)
        if entry is not None:
            state[key_id] = entry
    if unknown:
        log.warn("token use: {path}: dropped the windows of {n} key(s) that are not in the keys file: {keys}",
                 path=path, n=len(unknown), keys=", ".join(_short.repr(k) for k in unknown[:5])
                 + (", ..." if len(unknown) > 5 else ""))
    return state


def _windows(windows: Any) -> tuple[dict[str, list[list[float]]] | None, list[str]]:
    """One key's windows, checked; and what was dropped, one line per window (or for the whole key)."""
    if not isinstance(windows, dict):
        return None, [f"not an object of windows ({_short.repr(windows)}): skipped"]
    problems = []
    extra = [name for name in windows if name not in WINDOWS]
    if extra:
        problems.append(f"unknown field(s) dropped: {', '.join(_short.repr(name) for name in extra[:5])}"
                        + (", ..." if len(extra) > 5 else ""))
    entry: dict[str, list[list[float]]] = {}
    for name, most in WINDOWS.items():
        buckets = windows.get(name, [])
        if not isinstance(buckets, list):
            problems.append(f"{name}: not a list of [start, tokens] ({_short.repr(buckets)}): dropped")
            buckets = []
        elif len(buckets) > most:
            problems.append(f"{name}: {len(buckets)} buckets, more than the window holds ({most}): dropped")
            buckets = []
        kept, bad = [], []
        for item in buckets:
            checked = _bucket(item)
            if isinstance(checked, str):
                bad.append(checked)
            else:
                kept.append(checked)
        if bad:
            problems.append(f"{name}: dropped {len(bad)} bad bucket(s), the first: {bad[0]}")
        entry[name] = kept
    return entry, problems


def _bucket(item: Any) -> list[float] | str:
    """``[start, tokens]`` with a finite start and a token count from 1 to MAX_TOKENS, or what is wrong."""
    if not isinstance(item, list) or len(item) != 2:
        return f"{_short.repr(item)} is not a [start, tokens] pair"
    start, tokens = item
    try:
        finite = not isinstance(start, bool) and isinstance(start, (int, float)) and math.isfinite(start)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        return f"start {_short.repr(start)} is not a finite number of seconds"
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= MAX_TOKENS:
        return f"tokens {_short.repr(tokens)} is not a whole number from 1 to {MAX_TOKENS}"
    return [float(start), tokens]


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
        # Small, once, before the first request; only the keys of the keys file as it is now (the
        # policy has their limits by now): a key that is gone would be kept, and written back, for nothing.
        state = read_state(self.path, known=self.policy.limits.keys())
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
