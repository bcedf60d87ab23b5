"""`ebcd report ID --map` and `ebcd terminals --map` against the running daemon of test_commands.

The maps of a completed and of a partial alert are kept in EBCD_ARTEFACTS (if set) for a person
to look at; the README's pictures were made this way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from ebcd.tiers.district import District
from tests.cli.test_commands import TOWN_AREA, UNSIMULATED_TOWN, Cli, _explain, cli

__all__ = ["cli"]  # the module's daemon and simulators

pytest.importorskip("matplotlib")


def _keep(path: Path) -> None:
    where = os.environ.get("EBCD_ARTEFACTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(where) / path.name)


def _legend(svg: str) -> dict[str, int]:
    """The legend's 'label (count)' entries of an SVG map."""
    return {m[0]: int(m[1]) for m in re.findall(r">([a-z ]+) \((\d+)\)<", svg)}


def test_map_of_a_completed_alert_shows_every_target_acknowledged(
    cli: Cli, district: District, tmp_path: Path
) -> None:
    sent = cli.send(f"town:{TOWN_AREA}", "--wait", "--json", text="地图测试：全部应答")
    assert sent.returncode == 0, _explain(sent)
    state = json.loads(sent.stdout)
    svg = tmp_path / "map-completed.svg"
    done = cli.run("report", state["id"], "--map", str(svg))
    assert done.returncode == 0, _explain(done)
    text = svg.read_text(encoding="utf-8")
    assert text.lstrip().startswith(("<?xml", "<svg"))
    legend = _legend(text)
    assert legend["acknowledged"] == state["targets"] == len(cli.simulated)
    assert legend["not targeted"] == len(district) - state["targets"]
    assert "uncertain" not in legend
    assert state["id"] in text
    assert "coverage 100.0%" in text
    for town in district.towns.values():
        assert town.name in text  # every town named
    assert f"map {svg}" in done.stderr
    _keep(svg)
    png = tmp_path / "map-completed.png"
    assert cli.run("report", state["id"], "--map", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _keep(png)


def test_map_of_a_partial_alert_shows_who_did_not_acknowledge(
    cli: Cli, district: District, tmp_path: Path
) -> None:
    silent = next(iter(district.towns[UNSIMULATED_TOWN].villages.values()))
    sent = cli.send(f"town:{TOWN_AREA}", "--target", f"village:{silent.code}", "--wait", "--json",
                    text="地图测试：部分应答")  # fmt: skip
    assert sent.returncode == 3, _explain(sent)
    state = json.loads(sent.stdout)
    svg = tmp_path / "map-partial.svg"
    done = cli.run("report", state["id"], "--map", str(svg))
    assert done.returncode == 0, _explain(done)
    legend = _legend(svg.read_text(encoding="utf-8"))
    assert legend["acknowledged"] == len(cli.simulated)
    assert legend["uncertain"] == len(silent.terminals)
    assert "partial" in svg.read_text(encoding="utf-8")
    _keep(svg)
    png = tmp_path / "map-partial.png"
    assert cli.run("report", state["id"], "--map", str(png)).returncode == 0
    _keep(png)


def test_terminals_map_colours_them_by_liveness(cli: Cli, district: District, tmp_path: Path) -> None:
    svg = tmp_path / "terminals.svg"
    done = cli.run("terminals", "--map", str(svg))
    assert done.returncode == 0, _explain(done)
    legend = _legend(svg.read_text(encoding="utf-8"))
    assert legend["online"] == len(cli.simulated)
    assert legend["unknown"] == len(district) - len(cli.simulated)


def test_a_map_file_that_is_neither_svg_nor_png_exits_2_before_asking(cli: Cli, tmp_path: Path) -> None:
    done = cli.run("report", "20261203-0001", "--map", str(tmp_path / "map.jpg"))
    assert done.returncode == 2, _explain(done)
    assert ".svg or .png" in done.stderr
