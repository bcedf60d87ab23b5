"""Scheduled test broadcasts (例行测试): when they fire, and what one achieved. Pure: no I/O, no asyncio.

A district tests its loudspeakers on a fixed weekly slot, e.g. every Monday at 10:00 local time.
In `ebcd.toml`::

    [test_broadcast]
    weekly = "MON 10:00"                 # or a list: ["MON 10:00", "THU 16:30"]
    timezone = "Asia/Shanghai"           # IANA name; the default
    text = "这是应急广播系统例行测试。"
    targets = ["all"]                    # the default; or town:CODE, village:CODE, …
    silent = false                       # true: volume 0, terminals acknowledge without sound

The daemon keeps the time of the last test it fired (in its journal) and asks `due(spec,
last_fired, now)` on a timer. A slot missed while the daemon was down fires once when it comes
back, not once per missed week; `max_late_s` bounds how late that may be. With no record at all
(`last_fired` None) nothing is due: enabling a schedule never sets off every loudspeaker of the
district on the spot. The daemon records `now` as its baseline then, and the next slot fires.

Every instant is compared in UTC, so slots keep their meaning across a zone's DST changes too: a
slot in a skipped hour fires once at the instant its wall time maps to (Python's fold=0), a slot in
a repeated hour fires once, at its first occurrence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ebcd.model.alert import AlertRequest, parse_target
from ebcd.model.events import TEST_EVENT

DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")  # index = datetime.weekday()
DEFAULT_TIMEZONE = "Asia/Shanghai"
DEFAULT_TEXT = "这是应急广播系统例行测试，请勿惊慌。"
TEST_LEVEL = 4  # blue: the least severe; a real alert always pre-empts a test
MAX_LOGGED_MISSED = 100  # a log line names at most this many terminals; the report has them all

_SLOT_RE = re.compile(r"^\s*([A-Za-z]{3})\s+(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True, slots=True, order=True)
class Slot:
    """One weekly slot: a weekday (0 Monday … 6 Sunday) and a local wall-clock time."""

    weekday: int
    at: time

    def __str__(self) -> str:
        return f"{DAYS[self.weekday]} {self.at:%H:%M}"


def parse_slot(text: str) -> Slot:
    """`"MON 10:00"` -> Slot; ValueError saying what a slot looks like."""
    m = _SLOT_RE.match(text)
    if m is None:
        raise ValueError(
            f"slot {text!r}: expected 'DAY HH:MM' with DAY one of {', '.join(DAYS)}, e.g. 'MON 10:00'"
        )
    day, hour, minute = m.group(1).upper(), int(m.group(2)), int(m.group(3))
    if day not in DAYS:
        raise ValueError(f"slot {text!r}: day {m.group(1)!r} is not one of {', '.join(DAYS)}")
    if hour > 23 or minute > 59:
        raise ValueError(f"slot {text!r}: {hour}:{minute:02d} is not a time of day (00:00 to 23:59)")
    return Slot(DAYS.index(day), time(hour, minute))


class TestBroadcastConfig(BaseModel):
    """`[test_broadcast]`: when the district's routine test broadcast fires, to whom, and how loud."""

    __test__: ClassVar[bool] = False  # a config model, not a pytest test class

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    weekly: tuple[str, ...] = Field(max_length=7 * 24 * 60)
    timezone: str = DEFAULT_TIMEZONE
    text: str = Field(default=DEFAULT_TEXT, min_length=1, max_length=2000)
    targets: tuple[str, ...] = Field(default=("all",), max_length=1000)
    silent: bool = False
    ttl_s: float = Field(default=600.0, gt=0, le=24 * 3600)
    max_late_s: float | None = Field(default=None, gt=0)

    @field_validator("weekly", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v

    @field_validator("weekly")
    @classmethod
    def _slots(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("weekly needs at least one 'DAY HH:MM' slot, e.g. 'MON 10:00'")
        seen: dict[Slot, str] = {}
        for text in v:
            slot = parse_slot(text)
            if slot in seen:
                raise ValueError(f"slot {text!r} is the same as {seen[slot]!r}: list each slot once")
            seen[slot] = text
        return tuple(str(s) for s in sorted(seen))

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {v!r} is not an IANA time zone name, e.g. 'Asia/Shanghai'") from None
        return v

    @field_validator("text")
    @classmethod
    def _words(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a test broadcast needs a text for the loudspeakers")
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _target_list(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("targets needs at least one target, e.g. 'all'")
        out = []
        for text in v:
            try:
                out.append(str(parse_target(text)))
            except ValidationError as e:  # a code that is not a code
                why = e.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"target {text!r}: {why}") from None
        return tuple(out)

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's time zone."""
        return ZoneInfo(self.timezone)

    @property
    def slots(self) -> tuple[Slot, ...]:
        """The weekly slots, Monday first."""
        return tuple(parse_slot(s) for s in self.weekly)

    @property
    def volume(self) -> int | None:
        """0 for a silent test; None leaves the alert's default (0xFF: each terminal keeps its own volume)."""
        return 0 if self.silent else None

    def to_request(self) -> AlertRequest:
        """The alert a test broadcast sends: the test event, level 4 (blue), marked as a test."""
        fields: dict[str, object] = {
            "level": TEST_LEVEL,
            "event_type": TEST_EVENT,
            "targets": [parse_target(t) for t in self.targets],
            "text": self.text,
            "test": True,
            "ttl_s": self.ttl_s,
        }
        if self.volume is not None:
            fields["volume"] = self.volume
        return AlertRequest.model_validate(fields)


def _aware(name: str, value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(UTC)), got {value.isoformat()}")
    return value.astimezone(UTC)


def _local(day: date, at: time, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, at, tzinfo=zone)


def next_fire(spec: TestBroadcastConfig, after: datetime) -> datetime:
    """The first slot strictly after `after` (timezone-aware), in the schedule's zone."""
    after_utc = _aware("after", after)
    zone = spec.zone
    today = after_utc.astimezone(zone).date()
    candidates = [
        _local(today + timedelta(days=offset), slot.at, zone)
        for offset in range(8)  # today, the coming week, and today's weekday again
        for slot in spec.slots
        if (today + timedelta(days=offset)).weekday() == slot.weekday
    ]
    return min(c for c in candidates if c.astimezone(UTC) > after_utc)


def previous_fire(spec: TestBroadcastConfig, at: datetime) -> datetime:
    """The last slot at or before `at` (timezone-aware), in the schedule's zone."""
    at_utc = _aware("at", at)
    zone = spec.zone
    today = at_utc.astimezone(zone).date()
    candidates = [
        _local(today - timedelta(days=offset), slot.at, zone)
        for offset in range(8)
        for slot in spec.slots
        if (today - timedelta(days=offset)).weekday() == slot.weekday
    ]
    return max(c for c in candidates if c.astimezone(UTC) <= at_utc)


def due(spec: TestBroadcastConfig, last_fired: datetime | None, now: datetime) -> bool:
    """Whether a test broadcast should fire now.

    True when a slot lies after `last_fired` and at or before `now`: however many slots were
    missed, one test fires, and once it is recorded as fired nothing is due until the next slot.
    False when the schedule is disabled, when `last_fired` is None (no baseline: the daemon records
    `now` and waits for the next slot), or when the latest slot is more than `max_late_s` old.
    """
    now_utc = _aware("now", now)
    if not spec.enabled or last_fired is None:
        return False
    latest = previous_fire(spec, now_utc).astimezone(UTC)
    if latest <= _aware("last_fired", last_fired):
        return False
    return spec.max_late_s is None or (now_utc - latest).total_seconds() <= spec.max_late_s


@dataclass(frozen=True, slots=True)
class TestOutcome:
    """What a test broadcast achieved: how many terminals it addressed, acknowledged and missed."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    alert_id: str
    targets: int
    acked: int
    missed: tuple[str, ...]  # terminal codes without acknowledgement, sorted
    slot: datetime | None = None  # the scheduled slot it was fired for

    def __post_init__(self) -> None:
        if list(self.missed) != sorted(set(self.missed)):
            raise ValueError("missed must be sorted terminal codes, each once")
        if self.acked < 0 or self.acked + len(self.missed) != self.targets:
            raise ValueError(f"{self.acked} acked + {len(self.missed)} missed != {self.targets} targets")

    @classmethod
    def of(
        cls, alert_id: str, expected: Iterable[str], acked: Iterable[str], slot: datetime | None = None
    ) -> TestOutcome:
        """The outcome from the terminals addressed and those that acknowledged (others are ignored)."""
        addressed = set(expected)
        answered = addressed.intersection(acked)
        return cls(alert_id, len(addressed), len(answered), tuple(sorted(addressed - answered)), slot)

    @property
    def coverage(self) -> float:
        """acked / targets, 1.0 for a test that addressed nobody."""
        return self.acked / self.targets if self.targets else 1.0

    @property
    def complete(self) -> bool:
        """Every terminal addressed acknowledged."""
        return not self.missed

    def to_log_fields(self) -> dict[str, object]:
        """Fields for one structured log line (at most MAX_LOGGED_MISSED terminal codes named)."""
        fields: dict[str, object] = {
            "alert_id": self.alert_id,
            "targets": self.targets,
            "acked": self.acked,
            "missed": len(self.missed),
            "coverage": round(self.coverage, 4),
            "missed_terminals": list(self.missed[:MAX_LOGGED_MISSED]),
        }
        if len(self.missed) > MAX_LOGGED_MISSED:
            fields["missed_terminals_truncated"] = True
        if self.slot is not None:
            fields["slot"] = self.slot.isoformat()
        return fields
