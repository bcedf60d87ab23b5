"""A loudspeaker terminal as the ledger describes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LinkKind = Literal["mqtt", "serial", "adapter"]


@dataclass(frozen=True, slots=True)
class Terminal:
    """One loudspeaker terminal: its code, where it hangs, how it is reached."""

    code: str
    name: str
    room: str  # the village room (or town room) that drives it
    village: str | None  # village room code, None for a terminal of the town room itself
    town: str  # town room code
    lat: float
    lon: float
    link: LinkKind = "mqtt"
    bus_address: int | None = None
