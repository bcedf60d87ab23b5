#!/usr/bin/env python3
"""Regenerate the shipped demonstration district's ledgers (rooms.csv, terminals.csv).

The default district is fictional but shaped like a real one: 7 towns, 149 villages and 769
terminals under county area code 341523. Run from a source checkout: `python config/make_district.py`.
The code rules are `ebcd.tiers.generate`'s (the same as `ebcd topology generate`); the output is
deterministic, so the ledgers in git are exactly what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without ebcd installed

from ebcd.tiers.generate import TownShape, build

TOWNS = [  # name, villages, own terminals, the villages' link
    TownShape("城关镇", 24, 4, "mqtt"),
    TownShape("杭埠镇", 23, 4, "mqtt"),
    TownShape("千人桥镇", 22, 4, "mqtt"),
    TownShape("百神庙镇", 21, 3, "mqtt"),
    TownShape("桃溪镇", 20, 3, "mqtt"),
    TownShape("万佛湖镇", 20, 3, "adapter"),
    TownShape("晓天镇", 19, 3, "serial"),
]


def terminals_in_village(town: TownShape, n: int) -> int:
    """Four to six per village: odd villages six, even four, the last of an odd count five."""
    return 5 + (0 if n == town.villages and town.villages % 2 else (1 if n % 2 else -1))


def main() -> None:
    """Write rooms.csv and terminals.csv next to this script."""
    build(TOWNS, terminals_in_village).write(Path(__file__).resolve().parent)


if __name__ == "__main__":
    main()
