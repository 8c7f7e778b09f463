"""The supervisor's messages to systemd (`Type=notify`): readiness, reloads, status, watchdog.

`sd_notify` without libsystemd: one datagram per state on `NOTIFY_SOCKET`
(an abstract socket when it starts with `@`). A failure to notify is logged
and never stops the daemon.
"""

from __future__ import annotations

import socket
import time

import structlog

__all__ = ["SystemdNotifier"]

log = structlog.get_logger(component="supervisor")


class SystemdNotifier:
    """Sends READY=1, RELOADING=1, STOPPING=1, STATUS= and WATCHDOG=1; a no-op outside systemd."""

    def __init__(self, notify_socket: str | None, watchdog_seconds: float | None) -> None:
        self._socket = notify_socket
        self.watchdog_seconds = watchdog_seconds
        self.watchdog_due = 0.0
        self._status_sent: str | None = None

    def tell(self, summary: str | None, *, stopping: bool) -> None:
        """The watchdog ping when due, and STATUS= whenever the sidecar's summary changed."""
        if not self._socket:
            return
        if self.watchdog_seconds and time.monotonic() >= self.watchdog_due:
            self.notify("WATCHDOG=1")
            self.watchdog_due = time.monotonic() + self.watchdog_seconds / 2
        if summary and summary != self._status_sent and not stopping:
            self.notify(f"STATUS={summary}")
            self._status_sent = summary

    def notify(self, state: str) -> None:
        """Tell systemd about readiness, reloads and stopping."""
        if not self._socket:
            return
        address = self._socket
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(address)
                sock.sendall(state.encode())
        except OSError as exc:
            log.warning("could not notify systemd", state=state, error=str(exc))
