"""A village room (行政村/社区广播室) and the terminals it drives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ebcd.tiers.rollup import Tally
from ebcd.tiers.terminal import LinkKind, Terminal


@dataclass(slots=True)
class Village:
    """A village room: its area, its link and its terminals."""

    code: str
    name: str
    area: str
    town: str
    link: LinkKind = "mqtt"
    port: str | None = None
    terminals: list[Terminal] = field(default_factory=list)

    def tally(self, buckets: Mapping[str, str]) -> Tally:
        """How an alert stands among this village's terminals that it targets."""
        t = Tally()
        for term in self.terminals:
            bucket = buckets.get(term.code)
            if bucket is not None:
                t.add(bucket)
        return t
