"""Minimal systemd notify protocol (sd_notify) over $NOTIFY_SOCKET, standard library only.

Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op, so the daemon can call it freely.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING datagrams to the service manager."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        # Linux abstract namespace sockets are written with a leading '@'.
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_interval = self._watchdog_interval(env)
        self._last_ping = 0.0

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if no watchdog is asked for."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 2e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, state: str) -> bool:
        """Send one raw state string (e.g. "READY=1\\nSTATUS=up"); False if not under systemd or it failed."""
        if not self._addr:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(state.encode("utf-8"), self._addr)
            return True
        except OSError as e:
            if not self._warned:  # once: a broken notify socket must not flood the journal
                log.warning("systemd notify to %s failed: %s", self._addr.replace("\0", "@"), e)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self, now: float | None = None) -> bool:
        """Ping the watchdog if one is configured and half its interval has passed since the last ping."""
        if self.watchdog_interval is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_interval:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
