"""Adapter rooms in the ledger: what the loader accepts, what it refuses, and where."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ebcd.config import load_config
from ebcd.protocols.adapter.address import AddressError, parse
from ebcd.tiers.district import District
from ebcd.tiers.loader import TopologyError, load_district

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_district_drives_one_towns_villages_through_adapters(district: District) -> None:
    rooms = [v for v in district.villages() if v.link == "adapter"]
    assert len(rooms) == 20
    assert {v.town for v in rooms} == {"53415231050000314010101"}
    assert all(t.link == "adapter" for v in rooms for t in v.terminals)
    assert sum(len(v.terminals) for v in rooms) == 100


def test_an_adapter_room_without_a_tcp_port_is_refused_with_its_line(tmp_path: Path) -> None:
    for name in ("ebcd.toml", "rooms.csv", "terminals.csv"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    rooms = tmp_path / "rooms.csv"
    lines = rooms.read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if ",adapter," in line)
    lines[at] = lines[at].rsplit(",", 1)[0] + ",10.0.0.5:7000"
    rooms.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TopologyError) as err:
        load_district(load_config(tmp_path / "ebcd.toml"))
    assert err.value.errors[0] == (
        f"rooms.csv:{at + 1}: village {lines[at].split(',')[1]} is driven by an adapter but names no "
        "tcp://HOST:PORT port"
    )
    # and its terminals are named as having no room, each with its line
    assert all("does not exist" in e for e in err.value.errors[1:])


def test_addresses_parse_or_say_what_is_wrong(tmp_path: Path) -> None:
    assert parse("tcp://10.3.1.20:7000").resolve("x") == ("10.3.1.20", 7000)
    assert parse("0.0.0.0:7100", scheme=False).port == 7100
    folder = parse(f"tcp://127.0.0.1:{tmp_path}")
    with pytest.raises(AddressError, match="no port published there yet"):
        folder.resolve("adapter-1.port")
    (tmp_path / "adapter-1.port").write_text("41234\n")
    assert folder.resolve("adapter-1.port") == ("127.0.0.1", 41234)
    (tmp_path / "adapter-1.port").write_text("junk")
    with pytest.raises(AddressError, match="is not a TCP port"):
        folder.resolve("adapter-1.port")
    with pytest.raises(AddressError, match="never expanded"):
        parse("tcp://127.0.0.1:{run_dir}")
    with pytest.raises(AddressError, match="expected tcp://HOST:PORT"):
        parse("10.0.0.1:80")
    with pytest.raises(AddressError, match="not 0-65535"):
        parse("tcp://h:99999")
