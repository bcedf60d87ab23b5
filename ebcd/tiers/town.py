"""A town room (镇级广播室): its villages and the terminals it drives itself."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ebcd.tiers.rollup import Tally
from ebcd.tiers.terminal import Terminal
from ebcd.tiers.village import Village


@dataclass(slots=True)
class Town:
    """A town room with its villages; knows the coverage of its villages."""

    code: str
    name: str
    area: str
    villages: dict[str, Village] = field(default_factory=dict)
    own_terminals: list[Terminal] = field(default_factory=list)

    def terminals(self) -> Iterator[Terminal]:
        """Every terminal in the town: its own, then its villages'."""
        yield from self.own_terminals
        for v in self.villages.values():
            yield from v.terminals

    def tally(self, buckets: Mapping[str, str]) -> Tally:
        """How an alert stands in this town (own terminals and all villages)."""
        t = Tally()
        for term in self.terminals():
            bucket = buckets.get(term.code)
            if bucket is not None:
                t.add(bucket)
        return t

    def village_tallies(self, buckets: Mapping[str, str]) -> dict[str, Tally]:
        """Per-village tallies for the villages the alert reaches."""
        out = {}
        for v in self.villages.values():
            tv = v.tally(buckets)
            if tv.targets:
                out[v.code] = tv
        return out
