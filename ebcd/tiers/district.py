"""The district platform: resolves targets to terminals and rolls up coverage per town."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ebcd.model.alert import CircleTarget, CodeTarget, PolygonTarget
from ebcd.model.codes import AREA_CODE_DIGITS, EBRID_DIGITS, Level, area_level
from ebcd.tiers.rollup import Tally
from ebcd.tiers.terminal import Terminal
from ebcd.tiers.town import Town
from ebcd.tiers.village import Village

if TYPE_CHECKING:  # numpy (geo) is loaded by the first polygon or circle target, not at start-up
    from ebcd.tiers import geo

AnyTarget = CodeTarget | PolygonTarget | CircleTarget


@dataclass(frozen=True, slots=True)
class Resolution:
    """The terminals a list of targets names, in ledger order, without duplicates."""

    terminals: tuple[Terminal, ...]
    unknown: tuple[str, ...] = ()


@dataclass(slots=True)
class District:
    """The district platform and everything below it."""

    code: str
    name: str
    area: str
    towns: dict[str, Town] = field(default_factory=dict)
    _terminals: dict[str, Terminal] = field(default_factory=dict)
    _town_of: dict[str, str] = field(default_factory=dict)  # terminal -> its town, for the roll-up
    _villages: dict[str, Village] = field(default_factory=dict)
    _by_area: dict[str, Town | Village] = field(default_factory=dict)
    _ledger: tuple[Terminal, ...] = ()  # the terminals in ledger order, as `_points` numbers them
    _points: geo.PointSet | None = None  # built by the first polygon or circle target

    def index(self) -> None:
        """Build the lookup tables after the ledgers are loaded."""
        self._terminals = {t.code: t for town in self.towns.values() for t in town.terminals()}
        self._town_of = {code: t.town for code, t in self._terminals.items()}
        self._ledger = tuple(self._terminals.values())
        self._points = None
        self._villages = {v.code: v for t in self.towns.values() for v in t.villages.values()}
        self._by_area = {t.area: t for t in self.towns.values()}
        self._by_area.update({v.area: v for v in self._villages.values()})

    # -- lookups ---------------------------------------------------------------------------
    def terminals(self) -> Iterator[Terminal]:
        """Every terminal of the district in ledger order."""
        return iter(self._terminals.values())

    def terminal(self, code: str) -> Terminal | None:
        """The terminal with this resource code."""
        return self._terminals.get(code)

    def villages(self) -> Iterator[Village]:
        """Every village room."""
        return iter(self._villages.values())

    def village(self, code: str) -> Village | None:
        """A village room by resource code or area code."""
        if len(code) == AREA_CODE_DIGITS:
            found = self._by_area.get(code)
            return found if isinstance(found, Village) else None
        return self._villages.get(code)

    def town(self, code: str) -> Town | None:
        """A town room by resource code or area code."""
        if len(code) == AREA_CODE_DIGITS:
            found = self._by_area.get(code)
            return found if isinstance(found, Town) else None
        return self.towns.get(code)

    def room_of(self, terminal: Terminal) -> Town | Village:
        """The room that drives a terminal."""
        return self._villages.get(terminal.room) or self.towns[terminal.town]

    def __len__(self) -> int:
        return len(self._terminals)

    # -- resolution ------------------------------------------------------------------------
    def resolve(self, targets: Sequence[AnyTarget]) -> Resolution:
        """The terminals the targets name; targets naming nothing are listed in `unknown`."""
        chosen: dict[str, Terminal] = {}
        unknown: list[str] = []
        for target in targets:
            found = list(self._resolve_one(target))
            if not found and isinstance(target, CodeTarget):
                unknown.append(str(target))
            for term in found:
                chosen.setdefault(term.code, term)
        ordered = tuple(t for t in self._terminals.values() if t.code in chosen)
        return Resolution(ordered, tuple(unknown))

    def _resolve_one(self, target: AnyTarget) -> Iterable[Terminal]:
        if isinstance(target, PolygonTarget):
            return self._chosen(self._point_set().in_polygon(target.points))
        if isinstance(target, CircleTarget):
            return self._chosen(self._point_set().within_km(target.lat, target.lon, target.radius_km))
        code = target.code or ""
        if target.kind == "all":
            return self._terminals.values()
        if target.kind == "terminal":
            term = self._terminals.get(code)
            return [term] if term else []
        if target.kind == "town":
            town = self.town(code)
            return town.terminals() if town else []
        if target.kind == "village":
            village = self.village(code)
            return village.terminals if village else []
        return self._resolve_area(code)

    def _point_set(self) -> geo.PointSet:
        """The terminals' coordinates as arrays, made once (the ledger does not change at run time)."""
        if self._points is None:
            from ebcd.tiers import geo  # numpy: only areas drawn on the map need it

            self._points = geo.PointSet([t.lat for t in self._ledger], [t.lon for t in self._ledger])
        return self._points

    def _chosen(self, mask: geo.BoolArray) -> list[Terminal]:
        """The terminals a mask over `_points` selects, in ledger order."""
        ledger = self._ledger
        return [ledger[i] for i in mask.nonzero()[0].tolist()]

    def _resolve_area(self, code: str) -> Iterable[Terminal]:
        if len(code) == EBRID_DIGITS:
            code = code[1:13]
        if len(code) != AREA_CODE_DIGITS:
            return []
        if code == self.area:
            return self._terminals.values()
        try:
            level = area_level(code)
        except ValueError:
            return []
        room = self._by_area.get(code)
        if room is None:
            return []
        if level is Level.TOWN and isinstance(room, Town):
            return room.terminals()
        return room.terminals if isinstance(room, Village) else []

    # -- roll-up ---------------------------------------------------------------------------
    def tally(self, buckets: Mapping[str, str]) -> Tally:
        """How an alert stands across the whole district."""
        t = Tally()
        for bucket in buckets.values():
            t.add(bucket)
        return t

    @property
    def town_of(self) -> Mapping[str, str]:
        """terminal code -> the code of its town."""
        return self._town_of

    def town_tallies(self, buckets: Mapping[str, str]) -> dict[str, Tally]:
        """Per-town tallies for the towns an alert reaches (`buckets`: terminal -> bucket)."""
        town_of = self._town_of
        counts = Counter((town_of.get(code), bucket) for code, bucket in buckets.items())
        out: dict[str, Tally] = {}
        for (town, bucket), n in counts.items():
            if town is not None:
                out.setdefault(town, Tally()).add(bucket, n)
        return out
