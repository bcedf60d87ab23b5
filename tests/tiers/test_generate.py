"""`ebcd topology generate`: districts of any size by the shipped rules, accepted by `topology check`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ebcd.cli.commands import app
from ebcd.config import load_config
from ebcd.model.codes import Level, ResourceCode
from ebcd.tiers.generate import ShapeError, build, uniform_towns
from ebcd.tiers.loader import load_district

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _generate(out: Path, *shape: int, town_terminals: int = 0) -> str:
    towns, villages, terminals = shape
    result = runner.invoke(
        app,
        [
            "topology", "generate", "--towns", str(towns), "--villages-per-town", str(villages),
            "--terminals-per-village", str(terminals), "--terminals-per-town", str(town_terminals),
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def test_the_shipped_ledgers_are_what_the_shared_rules_write(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_district", ROOT / "config" / "make_district.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build(module.TOWNS, module.terminals_in_village).write(tmp_path)
    for name in ("rooms.csv", "terminals.csv"):
        assert (tmp_path / name).read_bytes() == (ROOT / "config" / name).read_bytes(), name


def test_a_generated_district_of_ten_thousand_passes_topology_check(tmp_path: Path) -> None:
    out = _generate(tmp_path / "d", 20, 50, 10, town_terminals=2)
    assert "20 towns, 1000 villages, 10040 terminals" in out
    check = runner.invoke(app, ["topology", "check", "-c", str(tmp_path / "d" / "ebcd.toml"), "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.output) == {
        "district": 1,
        "towns": 20,
        "villages": 1000,
        "terminals": 10040,
        "serial_rooms": 0,
        "adapter_rooms": 0,
    }
    config = load_config(tmp_path / "d" / "ebcd.toml")
    # a restart re-sends to every terminal not reached yet: the queue holds them twice over
    assert config.mqtt.outgoing_queue_size == 2 * 10040
    district = load_district(config)
    assert all(t.link == "mqtt" for t in district.terminals())
    names = [v.name for v in district.villages()]
    assert len(set(names)) == len(names) == 1000
    for t in district.terminals():
        code = ResourceCode.parse(t.code)
        assert (code.resource_type, code.subtype) == ("0314", "04")
        assert code.level is (Level.VILLAGE if t.village else Level.TOWN)


def test_the_same_shape_writes_the_same_bytes_and_another_shape_others(tmp_path: Path) -> None:
    _generate(tmp_path / "a", 3, 4, 5)
    _generate(tmp_path / "b", 3, 4, 5)
    _generate(tmp_path / "c", 3, 4, 6)
    for name in ("ebcd.toml", "rooms.csv", "terminals.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "terminals.csv").read_bytes() != (tmp_path / "c" / "terminals.csv").read_bytes()
    assert len(load_district(load_config(tmp_path / "c" / "ebcd.toml"))) == 3 * 4 * 6
    assert load_config(tmp_path / "c" / "ebcd.toml").mqtt.outgoing_queue_size == 20_000  # the shipped


def test_a_shape_the_codes_cannot_number_is_refused_with_the_reason(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["topology", "generate", "--towns", "2", "--villages-per-town", "3", "--terminals-per-village",
         "100", "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "terminals per village: 100 is not between 0 and 99" in result.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ShapeError, match="towns: 901"):
        build(uniform_towns(901, 1), lambda _t, _n: 1)
