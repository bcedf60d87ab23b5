"""systemd's notify protocol (sd_notify): a datagram to $NOTIFY_SOCKET, nothing more."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends state lines to systemd; does nothing when not run by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_env(cls) -> Notifier:
        """The notifier for $NOTIFY_SOCKET (an abstract socket if it starts with '@')."""
        return cls(os.environ.get("NOTIFY_SOCKET") or None)

    def send(self, state: str) -> bool:
        """Send `state` (e.g. "READY=1"); False if there is no socket or it failed."""
        if not self.address:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall(state.encode())
        except OSError:
            return False
        return True


def watchdog_interval_s() -> float | None:
    """The watchdog interval systemd asks for ($WATCHDOG_USEC), if it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000
    except ValueError:
        return None
