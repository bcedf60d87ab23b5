"""Reading the topology ledgers (`rooms.csv`, `terminals.csv`) into a `District`.

Every problem is reported with its place (`file:line: what`), all of them at once, so a county
engineer can fix a ledger in one pass.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ebcd.config import Config
from ebcd.model.codes import CodeError, Level, ResourceCode, area_level, town_area_of
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal
from ebcd.tiers.town import Town
from ebcd.tiers.village import Village

ROOM_COLUMNS = ("tier", "code", "name", "parent", "link", "port")
TERMINAL_COLUMNS = ("code", "name", "room", "lat", "lon", "bus_address")


class TopologyError(Exception):
    """A topology that cannot be used; `errors` holds every problem with its place."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(f"{len(errors)} topology error(s): " + "; ".join(errors[:5]))
        self.errors = errors


@dataclass
class _Check:
    errors: list[str] = field(default_factory=list)

    def fail(self, place: str, what: str) -> None:
        self.errors.append(f"{place}: {what}")


def load_district(config: Config) -> District:
    """Build the district from the config's ledgers; raise TopologyError listing every problem."""
    check = _Check()
    d = config.district
    district = District(code=d.code, name=d.name, area=d.area)
    rooms_path = config.base_dir / config.topology.rooms
    terms_path = config.base_dir / config.topology.terminals
    rooms = _read(rooms_path, ROOM_COLUMNS, check)
    terms = _read(terms_path, TERMINAL_COLUMNS, check)
    villages: dict[str, Village] = {}
    seen_codes: dict[str, str] = {d.code: "[district] code"}
    for place, row in rooms:
        _add_room(district, villages, place, row, seen_codes, check)
    bus: dict[tuple[str, int], str] = {}
    for place, row in terms:
        _add_terminal(district, villages, place, row, seen_codes, bus, check)
    if check.errors:
        raise TopologyError(check.errors)
    district.index()
    return district


def _read(path: Path, columns: tuple[str, ...], check: _Check) -> list[tuple[str, dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        check.fail(str(path), f"cannot read: {e.strerror}")
        return []
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        check.fail(f"{path.name}:1", f"missing column(s) {', '.join(missing)}")
        return []
    out = []
    for i, row in enumerate(reader, start=2):
        if not any((v or "").strip() for v in row.values()):
            continue
        out.append((f"{path.name}:{i}", {k: (v or "").strip() for k, v in row.items() if k}))
    return out


def _code(place: str, what: str, text: str, level: Level, check: _Check) -> ResourceCode | None:
    try:
        code = ResourceCode.parse(text)
    except CodeError as e:
        check.fail(place, f"{what}: {e}")
        return None
    if code.level is not level:
        check.fail(
            place, f"{what} {text} has level {int(code.level)}, expected {int(level)} ({level.name.lower()})"
        )
        return None
    return code


def _unique(place: str, code: str, seen: dict[str, str], check: _Check) -> bool:
    if code in seen:
        check.fail(place, f"duplicate code {code} (first at {seen[code]})")
        return False
    seen[code] = place
    return True


def _add_room(
    district: District,
    villages: dict[str, Village],
    place: str,
    row: dict[str, str],
    seen: dict[str, str],
    check: _Check,
) -> None:
    tier = row["tier"]
    if tier not in ("town", "village"):
        check.fail(place, f"tier {tier!r} must be town or village")
        return
    level = Level.TOWN if tier == "town" else Level.VILLAGE
    code = _code(place, f"{tier} code", row["code"], level, check)
    if code is None or not _unique(place, row["code"], seen, check):
        return
    if not code.area.startswith(district.area[:6]):
        check.fail(place, f"{tier} {row['code']} lies outside the district's area {district.area}")
        return
    try:
        if area_level(code.area) is not level:
            check.fail(place, f"{tier} {row['code']} carries area {code.area}, not a {tier}-level area code")
            return
    except CodeError as e:
        check.fail(place, str(e))
        return
    link = row["link"] or "mqtt"
    if link not in ("mqtt", "serial", "adapter"):
        check.fail(place, f"link {link!r} must be mqtt, serial or adapter")
        return
    if tier == "town":
        district.towns[row["code"]] = Town(row["code"], row["name"], code.area)
        return
    town = next((t for t in district.towns.values() if t.code == row["parent"]), None)
    if town is None:
        check.fail(
            place, f"village {row['code']}: parent town {row['parent']!r} does not exist (towns come first)"
        )
        return
    if town_area_of(code.area) != town.area:
        check.fail(
            place, f"village {row['code']} area {code.area} is not inside town {town.code} ({town.area})"
        )
        return
    if link == "serial" and not row["port"]:
        check.fail(place, f"village {row['code']} is on a serial link but names no port")
        return
    if link == "adapter" and not row["port"].startswith("tcp://"):
        check.fail(place, f"village {row['code']} is driven by an adapter but names no tcp://HOST:PORT port")
        return
    village = Village(row["code"], row["name"], code.area, town.code, link, row["port"] or None)  # type: ignore[arg-type]
    town.villages[village.code] = village
    villages[village.code] = village


def _add_terminal(
    district: District,
    villages: dict[str, Village],
    place: str,
    row: dict[str, str],
    seen: dict[str, str],
    bus: dict[tuple[str, int], str],
    check: _Check,
) -> None:
    try:
        code = ResourceCode.parse(row["code"])
    except CodeError as e:
        check.fail(place, f"terminal code: {e}")
        return
    if code.level not in (Level.TOWN, Level.VILLAGE):
        check.fail(place, f"terminal {row['code']} has level {int(code.level)}, expected 5 or 6")
        return
    if not _unique(place, row["code"], seen, check):
        return
    room = row["room"]
    village = villages.get(room)
    town = district.towns.get(room) if village is None else district.towns[village.town]
    if town is None:
        check.fail(place, f"terminal {row['code']}: room {room!r} does not exist")
        return
    room_area = village.area if village else town.area
    if code.area != room_area:
        check.fail(place, f"terminal {row['code']} area {code.area} differs from its room's area {room_area}")
        return
    try:
        lat, lon = float(row["lat"]), float(row["lon"])
    except ValueError:
        check.fail(place, f"terminal {row['code']}: lat/lon {row['lat']!r},{row['lon']!r} are not numbers")
        return
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        check.fail(place, f"terminal {row['code']}: {lat},{lon} is not a latitude,longitude")
        return
    link = village.link if village else "mqtt"
    address: int | None = None
    if link == "serial":
        if not row["bus_address"].isdigit() or not 1 <= int(row["bus_address"]) <= 247:
            check.fail(place, f"terminal {row['code']} on a serial bus needs a bus_address 1-247")
            return
        address = int(row["bus_address"])
        key = (room, address)
        if key in bus:
            check.fail(place, f"bus address {address} already used on room {room} (at {bus[key]})")
            return
        bus[key] = place
    term = Terminal(
        row["code"], row["name"], room, village.code if village else None, town.code, lat, lon, link, address
    )
    if village:
        village.terminals.append(term)
    else:
        town.own_terminals.append(term)
