"""Typed messages between ebcd and its terminals, whatever the link.

The MQTT codec (`ebcd.protocols.mqtt.codec`) and the serial frame codec (`ebcd.protocols.serial.frame`)
both turn bytes into these and back; the delivery engine and the simulators only see these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

VOLUME_UNCHANGED = 0xFF


class AckStatus(StrEnum):
    """What a terminal reports about one broadcast."""

    RECEIVED = "received"
    PLAYING = "playing"
    DONE = "done"
    REFUSED = "refused"
    STOPPED = "stopped"


class Liveness(StrEnum):
    """What a terminal says about itself: birth, heartbeat or (last will) death."""

    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class PlayCommand:
    """Start a broadcast on the terminals that receive it.

    `ttl_s` is relative: terminal clocks lie, so expiry is judged on the platform's monotonic
    clock and terminals only learn how long is left. `seq` increases per sender and lets a
    terminal recognise a re-sent command, which it acknowledges again without playing twice.
    """

    alert_id: str
    ebmid: str
    revision: int
    seq: int
    level: int
    event_type: str
    text: str
    ttl_s: float
    volume: int = VOLUME_UNCHANGED
    test: bool = False
    issued_at: float = 0.0
    targets: tuple[str, ...] = ()
    resume: bool = False  # play again after a pre-emption, although this (alert, revision) was played
    signature: bytes = b""  # the 74-byte block over the command's canonical bytes (ebcd.security)


@dataclass(frozen=True, slots=True)
class StopCommand:
    """Stop a broadcast (cancelled, expired, or the terminal left the alert's area)."""

    alert_id: str
    ebmid: str
    revision: int
    seq: int
    reason: str
    issued_at: float = 0.0
    targets: tuple[str, ...] = ()
    signature: bytes = b""


Command = PlayCommand | StopCommand


@dataclass(frozen=True, slots=True)
class TerminalReport:
    """A terminal's acknowledgement or refusal of a broadcast."""

    terminal: str
    alert_id: str
    revision: int
    status: AckStatus
    cause: str | None = None
    seq: int = 0
    signature: bytes = b""  # the terminal's 74-byte block over the report's canonical bytes (MQTT only)


@dataclass(frozen=True, slots=True)
class TerminalPresence:
    """Birth, heartbeat or last will of a terminal; `session` orders a terminal's connections."""

    terminal: str
    state: Liveness
    session: int
    heartbeat: bool = False
    playing: tuple[str, ...] = field(default=())
    signature: bytes = b""  # the terminal's 74-byte block over the presence's canonical bytes (MQTT only)
