"""The `{run_dir}` placeholder of rooms.csv: how `ebcd run` and `ebcd simulate` expand it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebcd.cli.commands import _serial_run_dir
from ebcd.config import Config, load_config, shipped_config_path
from ebcd.protocols.serial.ports import RUN_DIR_PLACEHOLDER, default_run_dir, expand_port, uses_run_dir
from ebcd.tiers.district import District
from ebcd.tiers.loader import load_district

SHIPPED = shipped_config_path()
BROKER = "mqtt://127.0.0.1:18830"


def shipped() -> tuple[Config, District]:
    """A fresh copy of the shipped district (expanding its ports changes it)."""
    config = load_config(SHIPPED)
    return config, load_district(config)


def serial_ports(district: District) -> dict[str, str]:
    return {v.code: v.port or "" for v in district.villages() if v.link == "serial"}


def test_the_shipped_serial_rooms_name_the_run_dir() -> None:
    _, district = shipped()
    ports = serial_ports(district)
    assert len(ports) == 19
    assert all(port == f"{RUN_DIR_PLACEHOLDER}/{code}" for code, port in ports.items())


def test_the_default_run_dir_is_one_per_config_file_and_broker(tmp_path: Path) -> None:
    one = default_run_dir(SHIPPED, BROKER, tmp_path)
    assert one == default_run_dir(SHIPPED, BROKER, tmp_path)  # deterministic: run and simulate meet
    assert one.parent == tmp_path
    assert one.name.startswith("ebcd-sim-")
    assert len(one.name) == len("ebcd-sim-") + 8
    assert one != default_run_dir(SHIPPED, "mqtt://127.0.0.1:18831", tmp_path)  # a second demo
    assert one != default_run_dir(tmp_path / "ebcd.toml", BROKER, tmp_path)  # another config


def test_run_and_simulate_expand_to_the_same_buses(tmp_path: Path) -> None:
    config, district = shipped()
    run_dir = _serial_run_dir(config, district, None, BROKER, None)  # as `ebcd run --broker B` does
    config2, district2 = shipped()
    again = _serial_run_dir(config2, district2, SHIPPED, "mqtt://127.0.0.1:18830", None)  # `simulate -c`
    assert run_dir is not None
    assert run_dir == again == default_run_dir(SHIPPED, BROKER)
    assert serial_ports(district) == serial_ports(district2)
    assert serial_ports(district) == {code: f"{run_dir}/{code}" for code in serial_ports(district)}
    # the broker spelled two ways is one broker
    _, district3 = shipped()
    assert _serial_run_dir(config, district3, None, None, None) == default_run_dir(
        SHIPPED, "mqtt://127.0.0.1:1883"
    )
    _, district4 = shipped()
    assert _serial_run_dir(config, district4, None, "mqtt://127.0.0.1", None) == default_run_dir(
        SHIPPED, "mqtt://127.0.0.1:1883"
    )


def test_run_dir_from_the_flag_then_the_config(tmp_path: Path) -> None:
    config, district = shipped()
    assert _serial_run_dir(config, district, None, BROKER, tmp_path / "flag") == tmp_path / "flag"
    configured = config.model_copy(
        update={"simulator": config.simulator.model_copy(update={"run_dir": "buses"})}
    )
    _, district = shipped()
    assert _serial_run_dir(configured, district, None, BROKER, None) == SHIPPED.parent / "buses"
    _, district = shipped()
    assert _serial_run_dir(configured, district, None, BROKER, tmp_path / "flag") == tmp_path / "flag"


@pytest.mark.parametrize("port", ["/dev/ttyUSB0", "socket://10.0.0.7:4001", "/srv/bus/room1"])
def test_other_ports_are_used_as_they_are(tmp_path: Path, port: str) -> None:
    assert not uses_run_dir(port)
    assert expand_port(port, tmp_path) == port
    assert expand_port("{run_dir}/x", tmp_path) == f"{tmp_path}/x"
