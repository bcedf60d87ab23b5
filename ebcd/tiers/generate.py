"""Writing district ledgers (`rooms.csv`, `terminals.csv`) of any size, by the shipped district's rules.

One set of code rules for every generated district: a town's area is the county's six digits,
a three-digit town number (100 up) and `000`; a village's adds a three-digit village number; a
room's own code is `<level><area>0314010101` and a terminal's `<level><area>03140104NN`. Names
and positions come from one seeded random stream, so the same shape always gives the same bytes
(`config/make_district.py` writes the shipped district with these functions).
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ebcd.config import MqttConfig

COUNTY = "341523"
CENTER = (31.46, 116.95)
SEED = 341523
FIRST = "东西南北上下前后新老大小高龙凤双桥河湖山石松柏桃李杨柳"
SECOND = "岗湾塘庄冲圩店铺港畈坝岭集园洼埠"
LOUDSPEAKER = "0314"
FIRST_TOWN_NUMBER = 100
MAX_TOWNS = 1000 - FIRST_TOWN_NUMBER  # three digits of the area code
MAX_VILLAGES_PER_TOWN = 999
MAX_TERMINALS_PER_ROOM = 99  # the two-digit subtype sequence of the terminal's code
ROOM_HEADER = ["tier", "code", "name", "parent", "link", "port"]
TERMINAL_HEADER = ["code", "name", "room", "lat", "lon", "bus_address"]
# Simulated buses and adapters: `ebcd run` and `ebcd simulate` expand {run_dir} (see the shipped
# config/make_district.py); a real room names its device or its adapter's address instead.
SERIAL_PORT = "{run_dir}"
ADAPTER_PORT = "tcp://127.0.0.1:{run_dir}"


class ShapeError(ValueError):
    """A district shape the code rules cannot number."""


@dataclass(frozen=True)
class TownShape:
    """One town: its name, how many villages, its own terminals, and the link of its villages."""

    name: str
    villages: int
    own_terminals: int
    link: str = "mqtt"


@dataclass
class Ledgers:
    """The rows of `rooms.csv` and `terminals.csv`."""

    rooms: list[list[str]]
    terminals: list[list[str]]

    def write(self, folder: Path) -> None:
        """Write both ledgers into `folder` (made if missing)."""
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "rooms.csv", ROOM_HEADER, self.rooms)
        _write(folder / "terminals.csv", TERMINAL_HEADER, self.terminals)


def uniform_towns(towns: int, villages_per_town: int, terminals_per_town: int = 0) -> list[TownShape]:
    """`towns` towns of `villages_per_town` villages each, every village on MQTT."""
    return [TownShape(town_name(ti), villages_per_town, terminals_per_town) for ti in range(towns)]


def town_name(index: int) -> str:
    """A generated town's name: unique by its number."""
    return f"第{index + 1}镇"


def build(towns: Sequence[TownShape], terminals_in_village: Callable[[TownShape, int], int]) -> Ledgers:
    """The ledgers of a district of `towns`; `terminals_in_village(town, n)` for village n (1 up)."""
    _check_shape(towns, terminals_in_village)
    rng = random.Random(SEED)
    rooms: list[list[str]] = []
    terms: list[list[str]] = []
    used_names: set[str] = set()
    for ti, town in enumerate(towns):
        tarea = f"{COUNTY}{FIRST_TOWN_NUMBER + ti:03d}000"
        tcode = f"5{tarea}{LOUDSPEAKER}010101"
        rooms.append(["town", tcode, town.name, "", "mqtt", ""])
        angle = 2 * math.pi * ti / len(towns)
        tlat = CENTER[0] + (0 if ti == 0 else 0.14 * math.sin(angle))
        tlon = CENTER[1] + (0 if ti == 0 else 0.16 * math.cos(angle))
        for k in range(1, town.own_terminals + 1):
            terms.append(
                _terminal(
                    f"5{tarea}{LOUDSPEAKER}0104{k:02d}", f"{town.name}{k}号", tcode, tlat, tlon, 0.01, rng, ""
                )
            )
        for vi in range(1, town.villages + 1):
            varea = f"{COUNTY}{FIRST_TOWN_NUMBER + ti:03d}{vi:03d}"
            vcode = f"6{varea}{LOUDSPEAKER}010101"
            vname = _village_name(rng, used_names, varea)
            port = {"serial": f"{SERIAL_PORT}/{vcode}", "adapter": ADAPTER_PORT}.get(town.link, "")
            rooms.append(["village", vcode, vname, tcode, town.link, port])
            vlat = tlat + rng.uniform(-0.05, 0.05)
            vlon = tlon + rng.uniform(-0.05, 0.05)
            for k in range(1, terminals_in_village(town, vi) + 1):
                address = str(k) if town.link == "serial" else ""
                code = f"6{varea}{LOUDSPEAKER}0104{k:02d}"
                terms.append(_terminal(code, f"{vname}{k}号", vcode, vlat, vlon, 0.004, rng, address))
    return Ledgers(rooms, terms)


def _check_shape(towns: Sequence[TownShape], terminals_in_village: Callable[[TownShape, int], int]) -> None:
    if not 1 <= len(towns) <= MAX_TOWNS:
        raise ShapeError(f"towns: {len(towns)} is not between 1 and {MAX_TOWNS}")
    for town in towns:
        if not 0 <= town.villages <= MAX_VILLAGES_PER_TOWN:
            raise ShapeError(
                f"villages per town: {town.villages} is not between 0 and {MAX_VILLAGES_PER_TOWN}"
            )
        if not 0 <= town.own_terminals <= MAX_TERMINALS_PER_ROOM:
            raise ShapeError(
                f"terminals per town: {town.own_terminals} is not between 0 and {MAX_TERMINALS_PER_ROOM}"
            )
        if town.link not in ("mqtt", "serial", "adapter"):
            raise ShapeError(f"town {town.name}: link {town.link!r} must be mqtt, serial or adapter")
        for vi in range(1, town.villages + 1):
            n = terminals_in_village(town, vi)
            if not 0 <= n <= MAX_TERMINALS_PER_ROOM:
                raise ShapeError(f"terminals per village: {n} is not between 0 and {MAX_TERMINALS_PER_ROOM}")
            if town.link == "serial" and n > 247:
                raise ShapeError("a serial bus holds at most 247 terminals")


def _village_name(rng: random.Random, used: set[str], area: str) -> str:
    """Two random characters and 村, unique; past half the pairs, the village number is appended."""
    if len(used) < len(FIRST) * len(SECOND) // 2:
        while (name := rng.choice(FIRST) + rng.choice(SECOND) + "村") in used:
            pass
    else:  # retrying would take ever longer: a number keeps the name unique instead
        town, village = int(area[6:9]) - FIRST_TOWN_NUMBER + 1, int(area[9:])
        name = f"{rng.choice(FIRST)}{rng.choice(SECOND)}{town}-{village}村"
    used.add(name)
    return name


def _terminal(
    code: str, name: str, room: str, lat: float, lon: float, spread: float, rng: random.Random, address: str
) -> list[str]:
    return [
        code,
        name,
        room,
        f"{lat + rng.uniform(-spread, spread):.6f}",
        f"{lon + rng.uniform(-spread, spread):.6f}",
        address,
    ]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def generate(folder: Path, towns: int, villages_per_town: int, terminals_per_village: int, *,
             terminals_per_town: int = 0, config_template: Path) -> Ledgers:  # fmt: skip
    """Write a config (`ebcd.toml`, from the template) and its two ledgers into `folder`."""
    shape = uniform_towns(towns, villages_per_town, terminals_per_town)
    ledgers = build(shape, lambda _town, _n: terminals_per_village)
    ledgers.write(folder)
    template = config_template.read_text(encoding="utf-8")
    total = len(ledgers.terminals)
    villages = towns * villages_per_town
    head = (
        f"# ebcd: a generated district ({towns} towns, {villages} villages, {total} terminals), written by\n"
        f"# `ebcd topology generate --towns {towns} --villages-per-town {villages_per_town} "
        f"--terminals-per-village {terminals_per_village} --terminals-per-town {terminals_per_town}`.\n"
        "# The settings below are the shipped district's; every room is on MQTT.\n"
    )
    body = "\n".join(line for line in template.splitlines() if not line.startswith("# ebcd: the default"))
    # a restart re-sends to every terminal an alert has not reached yet, each on its own topic: the
    # outgoing queue must hold that many and the state updates beside them, not drop them
    queue = max(MqttConfig.model_fields["outgoing_queue_size"].default, 2 * total)
    body = re.sub(r"^outgoing_queue_size = \d+", f"outgoing_queue_size = {queue}", body, count=1, flags=re.M)
    (folder / "ebcd.toml").write_text(head + body + "\n", encoding="utf-8")
    return ledgers
