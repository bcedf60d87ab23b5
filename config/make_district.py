#!/usr/bin/env python3
"""Regenerate the shipped demonstration district's ledgers (rooms.csv, terminals.csv).

The default district is fictional but shaped like a real one: 7 towns, 149 villages and 769
terminals under county area code 341523. Run from this folder: `python make_district.py`.
The output is deterministic, so the ledgers in git are exactly what this script writes.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

COUNTY = "341523"
CENTER = (31.46, 116.95)
TOWNS = [  # (name, villages, own terminals, the villages' link)
    ("城关镇", 24, 4, "mqtt"),
    ("杭埠镇", 23, 4, "mqtt"),
    ("千人桥镇", 22, 4, "mqtt"),
    ("百神庙镇", 21, 3, "mqtt"),
    ("桃溪镇", 20, 3, "mqtt"),
    ("万佛湖镇", 20, 3, "adapter"),
    ("晓天镇", 19, 3, "serial"),
]
FIRST = "东西南北上下前后新老大小高龙凤双桥河湖山石松柏桃李杨柳"
SECOND = "岗湾塘庄冲圩店铺港畈坝岭集园洼埠"
LOUDSPEAKER = "0314"
# Simulated buses: `ebcd run` and `ebcd simulate` expand {run_dir} to one folder per run
# (ebcd.protocols.serial.ports); a real room names its device instead, e.g. /dev/ttyUSB0.
SERIAL_PORT_DIR = "{run_dir}"
# Simulated adapters: each binds a free port on 127.0.0.1 and publishes it in {run_dir}
# (ebcd.protocols.adapter.address); a real room names its adapter, e.g. tcp://10.3.1.20:7000.
ADAPTER_PORT = "tcp://127.0.0.1:{run_dir}"


def main() -> None:
    """Write rooms.csv and terminals.csv next to this script."""
    rng = random.Random(341523)
    here = Path(__file__).resolve().parent
    rooms: list[list[str]] = []
    terms: list[list[str]] = []
    used_names: set[str] = set()
    for ti, (tname, nvill, nown, link) in enumerate(TOWNS):
        serial = link == "serial"
        tarea = f"{COUNTY}{100 + ti:03d}000"
        tcode = f"5{tarea}{LOUDSPEAKER}010101"
        rooms.append(["town", tcode, tname, "", "mqtt", ""])
        angle = 2 * math.pi * ti / len(TOWNS)
        tlat = CENTER[0] + (0 if ti == 0 else 0.14 * math.sin(angle))
        tlon = CENTER[1] + (0 if ti == 0 else 0.16 * math.cos(angle))
        for k in range(1, nown + 1):
            terms.append(
                _terminal(
                    f"5{tarea}{LOUDSPEAKER}0104{k:02d}", f"{tname}{k}号", tcode, tlat, tlon, 0.01, rng, ""
                )
            )
        for vi in range(1, nvill + 1):
            varea = f"{COUNTY}{100 + ti:03d}{vi:03d}"
            vcode = f"6{varea}{LOUDSPEAKER}010101"
            while (vname := rng.choice(FIRST) + rng.choice(SECOND) + "村") in used_names:
                pass
            used_names.add(vname)
            port = {"serial": f"{SERIAL_PORT_DIR}/{vcode}", "adapter": ADAPTER_PORT}.get(link, "")
            rooms.append(["village", vcode, vname, tcode, link, port])
            vlat = tlat + rng.uniform(-0.05, 0.05)
            vlon = tlon + rng.uniform(-0.05, 0.05)
            count = 5 + (0 if vi == nvill and nvill % 2 else (1 if vi % 2 else -1))
            for k in range(1, count + 1):
                terms.append(
                    _terminal(
                        f"6{varea}{LOUDSPEAKER}0104{k:02d}",
                        f"{vname}{k}号",
                        vcode,
                        vlat,
                        vlon,
                        0.004,
                        rng,
                        str(k) if serial else "",
                    )
                )
    _write(here / "rooms.csv", ["tier", "code", "name", "parent", "link", "port"], rooms)
    _write(here / "terminals.csv", ["code", "name", "room", "lat", "lon", "bus_address"], terms)


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


if __name__ == "__main__":
    main()
