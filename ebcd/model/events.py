"""The 5-character emergency broadcast event types (data/event_types.tsv)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

TEST_EVENT = "00000"
DAILY_BROADCAST_EVENT = "20000"


@dataclass(frozen=True, slots=True)
class EventType:
    """One row of the event type table."""

    code: str
    name: str
    is_leaf: bool
    parent: str


@cache
def event_types() -> dict[str, EventType]:
    """All event types by code, read once from the packaged table."""
    text = resources.files("ebcd").joinpath("data/event_types.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    return {r["code"]: EventType(r["code"], r["name"], r["is_leaf"] == "1", r["parent"]) for r in rows}


def lookup(code: str) -> EventType | None:
    """The event type for a code, or None when the code is not in the table."""
    return event_types().get(code)
