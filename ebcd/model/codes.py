"""Resource codes (EBRID), area codes and broadcast message ids (EBMID).

An EBRID is 23 decimal digits: level(1) + area code(12) + resource type(4) + type seq(2) +
subtype(2) + subtype seq(2). An area code is the 12-digit administrative division code:
county(6) + town(3) + village(3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

EBRID_DIGITS = 23
AREA_CODE_DIGITS = 12
EBMID_DIGITS = 35

RESOURCE_TYPE_COUNTY_PLATFORM = "0104"
RESOURCE_TYPE_LOUDSPEAKER = "0314"
SUBTYPE_OWN_LEVEL = "01"
SUBTYPE_ADAPTER = "02"
SUBTYPE_EQUIPMENT = "03"
SUBTYPE_TERMINAL = "04"

_DIGITS = re.compile(r"\d+")


class Level(IntEnum):
    """The administrative level carried in an EBRID's first digit."""

    NATIONAL = 1
    PROVINCE = 2
    CITY = 3
    COUNTY = 4
    TOWN = 5
    VILLAGE = 6


class CodeError(ValueError):
    """A code that is not a well-formed resource code or area code."""


@dataclass(frozen=True, slots=True)
class ResourceCode:
    """A parsed 23-digit EBRID."""

    level: Level
    area: str
    resource_type: str
    type_seq: str
    subtype: str
    subtype_seq: str

    @classmethod
    def parse(cls, text: str) -> ResourceCode:
        """Parse 23 digits; raise CodeError saying what is wrong."""
        if not _DIGITS.fullmatch(text):
            raise CodeError(f"resource code {text!r} must be decimal digits only")
        if len(text) != EBRID_DIGITS:
            raise CodeError(f"resource code {text!r} has {len(text)} digits, expected {EBRID_DIGITS}")
        try:
            level = Level(int(text[0]))
        except ValueError:
            raise CodeError(f"resource code {text!r} has level digit {text[0]}, expected 1-6") from None
        return cls(level, text[1:13], text[13:17], text[17:19], text[19:21], text[21:23])

    def __str__(self) -> str:
        return (
            f"{int(self.level)}{self.area}{self.resource_type}{self.type_seq}{self.subtype}{self.subtype_seq}"
        )


def area_level(area: str) -> Level:
    """The level an area code names: county (…000000), town (…000) or village."""
    check_area_code(area)
    if area[6:] == "000000":
        return Level.COUNTY
    if area[9:] == "000":
        return Level.TOWN
    return Level.VILLAGE


def check_area_code(area: str) -> str:
    """Return the area code if it is 12 digits, else raise CodeError."""
    if not _DIGITS.fullmatch(area) or len(area) != AREA_CODE_DIGITS:
        raise CodeError(f"area code {area!r} must be {AREA_CODE_DIGITS} digits")
    if area[6:9] == "000" and area[9:] != "000":
        raise CodeError(f"area code {area!r} names a village under town 000")
    return area


def town_area_of(area: str) -> str:
    """The town-level area code containing a town or village area code."""
    return area[:9] + "000"


def county_area_of(area: str) -> str:
    """The county-level area code containing any area code."""
    return area[:6] + "000000"


def ebmid(platform: str, day: str, seq: int) -> str:
    """Broadcast message id: platform EBRID(23) + YYYYMMDD + 4-digit sequence."""
    if len(platform) != EBRID_DIGITS or len(day) != 8 or not 0 <= seq <= 9999:
        raise CodeError(f"cannot build an EBMID from {platform!r}, {day!r}, {seq}")
    return f"{platform}{day}{seq:04d}"
