"""systemd's sd_notify protocol, spoken directly over ``NOTIFY_SOCKET`` (no dependency).

READY=1 once both sites listen, STATUS= on backend state changes, STOPPING=1
at shutdown, and WATCHDOG=1 at half ``WATCHDOG_USEC`` from a reactor timer, so
a reactor that stops turning gets the unit restarted.  Outside systemd every
call is a no-op.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="llamad.notify")


class Notifier(MultiService):
    name = "notify"

    def __init__(self, clock: IReactorTime, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path  # '@': abstract namespace
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
        watchdog_usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if self.sock is not None and watchdog_usec > 0 and watchdog_pid in ("", str(os.getpid())):
            timer = TimerService(watchdog_usec / 2e6, self.send, "WATCHDOG=1")
            timer.clock = clock
            timer.setServiceParent(self)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> None:
        """One datagram of ``KEY=value`` lines; a lost datagram is logged, never raised."""
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.warn("sd_notify to {path} failed: {err}", path=self.address, err=e)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    def stopService(self) -> object:
        result = super().stopService()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        return result
