"""The alert an upstream system or the duty officer asks for, validated at the boundary.

`AlertRequest` is what every ingest path (JSON over MQTT, CAP 1.2, the CLI) produces; the
daemon resolves its targets against the topology and hands it to the delivery engine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ebcd.model import events

MAX_TEXT_CHARS = 2000
MAX_TARGETS = 1000
DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 7 * 24 * 3600.0
ALERT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class MsgType(StrEnum):
    """CAP's msgType, reduced to what ebcd acts on."""

    ALERT = "alert"
    UPDATE = "update"
    CANCEL = "cancel"


class Origin(StrEnum):
    """Which tier originates a broadcast; a higher tier pre-empts a lower one."""

    DISTRICT = "district"
    TOWN = "town"
    VILLAGE = "village"


TIER_RANK = {Origin.DISTRICT: 3, Origin.TOWN: 2, Origin.VILLAGE: 1}


def rank(request: AlertRequest, order: Sequence[str]) -> tuple[int, ...]:
    """The request's priority as a tuple (higher wins), by the configured `order` of criteria."""
    keys = {
        "emergency": 1 if request.event_type.startswith("1") else 0,
        "tier": TIER_RANK[request.origin],
        "level": 5 - request.level,
    }
    return tuple(keys[k] for k in order)


class CodeTarget(BaseModel):
    """`all`, or a town, village or terminal named by resource code or area code."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["all", "town", "village", "terminal", "area"]
    code: str | None = None

    @model_validator(mode="after")
    def _code_matches_kind(self) -> CodeTarget:
        if self.kind == "all":
            if self.code is not None:
                raise ValueError("target 'all' takes no code")
        elif not self.code or not self.code.isdigit():
            raise ValueError(f"target {self.kind} needs a numeric code, got {self.code!r}")
        return self

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.code}"


class PolygonTarget(BaseModel):
    """The terminals inside a closed polygon of (lat, lon) points (CAP `<polygon>`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["polygon"] = "polygon"
    # real feeds draw warning areas with 41,009 points; geometry is vectorised (ebcd.tiers.geo)
    points: list[tuple[float, float]] = Field(min_length=4, max_length=100_000)

    @field_validator("points")
    @classmethod
    def _closed(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if v[0] != v[-1]:
            raise ValueError("a polygon's first and last points must be the same")
        for lat, lon in v:
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError(f"point {lat},{lon} is not a latitude,longitude")
        return v

    def __str__(self) -> str:
        return f"polygon({len(self.points) - 1} vertices)"


class CircleTarget(BaseModel):
    """The terminals within `radius_km` of a (lat, lon) centre (CAP `<circle>`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["circle"] = "circle"
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    radius_km: float = Field(ge=0, le=20_000)

    def __str__(self) -> str:
        return f"circle({self.lat},{self.lon} {self.radius_km} km)"


Target = Annotated[CodeTarget | PolygonTarget | CircleTarget, Field(discriminator="kind")]


def parse_target(text: str) -> CodeTarget:
    """Parse the CLI form `all | town:CODE | village:CODE | terminal:CODE | area:CODE`."""
    text = text.strip()
    if text == "all":
        return CodeTarget(kind="all")
    kind, sep, code = text.partition(":")
    if not sep or kind not in ("town", "village", "terminal", "area"):
        raise ValueError(
            f"target {text!r}: expected all, town:CODE, village:CODE, terminal:CODE or area:CODE"
        )
    return CodeTarget(kind=kind, code=code.strip())  # type: ignore[arg-type]


class AlertRequest(BaseModel):
    """An alert as asked for: what to say, where, how urgent, for how long."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identifier: str | None = Field(default=None, max_length=256)
    sender: str | None = Field(default=None, max_length=256)
    msg_type: MsgType = MsgType.ALERT
    references: list[str] = Field(default_factory=list, max_length=100)
    level: int = Field(ge=1, le=4)
    event_type: str = Field(min_length=5, max_length=5)
    targets: list[Target] = Field(default_factory=list, max_length=MAX_TARGETS)
    text: str = Field(default="", max_length=MAX_TEXT_CHARS)
    test: bool = False
    ttl_s: float = Field(default=DEFAULT_TTL_S, gt=0, le=MAX_TTL_S)
    volume: int = Field(default=0xFF, ge=0, le=0xFF)
    origin: Origin = Origin.DISTRICT
    origin_room: str | None = Field(default=None, pattern=r"^\d{23}$")  # the town or village room speaking
    language: str | None = None

    @field_validator("references", "language")
    @classmethod
    def _unicode_text(cls, v: list[str] | str | None) -> list[str] | str | None:
        for text in [v] if isinstance(v, str) else v or []:
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode text (a lone surrogate)") from None
        return v

    @field_validator("event_type")
    @classmethod
    def _known_event(cls, v: str) -> str:
        if events.lookup(v) is None:
            raise ValueError(f"event type {v!r} is not in the event type table")
        return v

    @model_validator(mode="after")
    def _shape(self) -> AlertRequest:
        if (self.origin is Origin.DISTRICT) != (self.origin_room is None):
            raise ValueError("a town or village broadcast names its origin_room; a district one does not")
        if self.msg_type is MsgType.ALERT:
            if not self.targets:
                raise ValueError("an alert needs at least one target")
            if not self.text.strip():
                raise ValueError("an alert needs a text for the loudspeakers")
        elif not self.references:
            raise ValueError(f"an {self.msg_type.value} must name the alert it refers to in references")
        return self
