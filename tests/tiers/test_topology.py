"""The shipped district, target resolution, roll-up, and ledger errors reported with their place."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebcd.config import load_config
from ebcd.model.alert import CircleTarget, PolygonTarget, parse_target
from ebcd.model.codes import ResourceCode
from ebcd.tiers.district import District
from ebcd.tiers.loader import TopologyError, load_district

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_district_has_the_documented_shape(district: District) -> None:
    assert len(district.towns) == 7
    assert sum(len(t.villages) for t in district.towns.values()) == 149
    assert len(district) == 769
    for t in district.terminals():
        code = ResourceCode.parse(t.code)
        assert code.resource_type == "0314"
        assert code.subtype == "04"
        assert code.area.startswith(district.area[:6])


def test_resolve_by_resource_code_and_area_code_agree(district: District) -> None:
    town = next(iter(district.towns.values()))
    by_code = district.resolve([parse_target(f"town:{town.code}")]).terminals
    by_area = district.resolve([parse_target(f"town:{town.area}")]).terminals
    assert by_code == by_area
    assert len(by_code) == sum(1 for _ in town.terminals())
    village = next(iter(town.villages.values()))
    assert district.resolve([parse_target(f"village:{village.area}")]).terminals == tuple(village.terminals)
    assert len(district.resolve([parse_target(f"area:{district.area}")]).terminals) == 769


def test_targets_do_not_double_count(district: District) -> None:
    town = next(iter(district.towns.values()))
    village = next(iter(town.villages.values()))
    res = district.resolve(
        [
            parse_target(f"town:{town.code}"),
            parse_target(f"village:{village.code}"),
            parse_target(f"terminal:{village.terminals[0].code}"),
        ]
    )
    assert len(res.terminals) == sum(1 for _ in town.terminals())


def test_unknown_targets_are_named(district: District) -> None:
    res = district.resolve(
        [parse_target("village:63415231999990314010101"), parse_target("town:999999999999")]
    )
    assert res.terminals == ()
    assert res.unknown == ("village:63415231999990314010101", "town:999999999999")


def test_polygon_and_circle_select_by_coordinates(district: District) -> None:
    village = next(iter(next(iter(district.towns.values())).villages.values()))
    lats = [t.lat for t in village.terminals]
    lons = [t.lon for t in village.terminals]
    box = [
        (min(lats) - 1e-4, min(lons) - 1e-4),
        (min(lats) - 1e-4, max(lons) + 1e-4),
        (max(lats) + 1e-4, max(lons) + 1e-4),
        (max(lats) + 1e-4, min(lons) - 1e-4),
        (min(lats) - 1e-4, min(lons) - 1e-4),
    ]
    inside = district.resolve([PolygonTarget(points=box)]).terminals
    assert set(village.terminals) <= set(inside)
    t0 = village.terminals[0]
    assert district.resolve([CircleTarget(lat=t0.lat, lon=t0.lon, radius_km=0.0001)]).terminals == (t0,)
    far = district.resolve([CircleTarget(lat=0.0, lon=0.0, radius_km=100)])
    assert far.terminals == ()


def test_town_rolls_up_its_villages(district: District) -> None:
    town = next(iter(district.towns.values()))
    codes = [t.code for t in town.terminals()]
    buckets = {c: ("acked" if i % 3 else "uncertain") for i, c in enumerate(codes)}
    tally = town.tally(buckets)
    assert tally.targets == len(codes)
    assert tally.acked == sum(1 for b in buckets.values() if b == "acked")
    villages = town.village_tallies(buckets)
    assert sum(v.targets for v in villages.values()) + len(town.own_terminals) == tally.targets
    assert district.town_tallies(buckets)[town.code].acked == tally.acked


def _broken_copy(tmp_path: Path) -> Path:
    for name in ("ebcd.toml", "rooms.csv", "terminals.csv"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    return tmp_path / "ebcd.toml"


def _edit(path: Path, line_no: int, old: str, new: str) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert old in lines[line_no - 1]
    lines[line_no - 1] = lines[line_no - 1].replace(old, new, 1)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines[line_no - 1]


def test_every_ledger_error_is_reported_with_its_place(tmp_path: Path) -> None:
    cfg = _broken_copy(tmp_path)
    terms = tmp_path / "terminals.csv"
    rows = terms.read_text(encoding="utf-8").splitlines()
    dup_code = rows[1].split(",")[0]
    _edit(terms, 3, rows[2].split(",")[0], dup_code)  # duplicate of line 2
    room = rows[10].split(",")[2]
    _edit(terms, 11, room, "63415231009990314010101")  # a village that does not exist
    _edit(terms, 21, rows[20].split(",")[0], rows[20].split(",")[0][:-1])  # 22 digits
    rooms = tmp_path / "rooms.csv"
    rrows = rooms.read_text(encoding="utf-8").splitlines()
    _edit(rooms, 3, rrows[2].split(",")[1], "5" + rrows[2].split(",")[1][1:])  # village code with town level
    with pytest.raises(TopologyError) as e:
        load_district(load_config(cfg))
    errors = "\n".join(e.value.errors)
    assert f"terminals.csv:3: duplicate code {dup_code} (first at terminals.csv:2)" in errors
    assert "terminals.csv:11: terminal" in errors
    assert "room '63415231009990314010101' does not exist" in errors
    assert "terminals.csv:21: terminal code:" in errors
    assert "has 22 digits" in errors
    assert "rooms.csv:3: village code" in errors
    assert "has level 5, expected 6" in errors


def test_topology_check_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "ebcd", "topology", "check", "-c", str(ROOT / "config/ebcd.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    for n in ("towns              7", "villages           149", "terminals          769"):
        assert n in ok.stdout
    cfg = _broken_copy(tmp_path)
    rows = (tmp_path / "terminals.csv").read_text(encoding="utf-8").splitlines()
    _edit(tmp_path / "terminals.csv", 5, rows[4].split(",")[2], "nowhere")
    bad = subprocess.run(
        [sys.executable, "-m", "ebcd", "topology", "check", "-c", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "terminals.csv:5: terminal" in bad.stderr
    assert "room 'nowhere' does not exist" in bad.stderr
