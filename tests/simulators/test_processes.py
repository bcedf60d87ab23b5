"""`ebcd simulate --processes N`: each terminal served by exactly one of N processes, via a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ebcd.config import load_config, shipped_config_path
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.tiers.district import District
from ebcd.tiers.generate import generate
from ebcd.tiers.loader import load_district
from simulators.runner import parse_share, share_of
from tests.conftest import Mosquitto, fast_config
from tests.helpers import running_daemon, settle, wait_for, wait_online

pytestmark = pytest.mark.slow
WAIT_S = 60.0


def _district(folder: Path) -> Path:
    generate(folder, 3, 4, 5, terminals_per_town=1, config_template=shipped_config_path())
    return folder / "ebcd.toml"


def _log(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


async def test_three_processes_serve_every_terminal_once(own_mosquitto: Mosquitto, tmp_path: Path) -> None:
    config_path = _district(tmp_path / "district")
    config = fast_config(load_config(config_path))
    district = load_district(config)
    assert len(district) == 63
    log_path = tmp_path / "sim.log"
    with log_path.open("wb") as log_file:
        sims = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "ebcd", "simulate", "-c", str(config_path), "--broker", own_mosquitto.url,
              "--processes", "3", "--play-time", "0.2", "--log-level", "info"],
            stdout=log_file,
            stderr=log_file,
        )  # fmt: skip
        try:
            async with running_daemon(config, district, own_mosquitto.url, tmp_path / "state") as daemon:
                await wait_online(daemon, 63, timeout_s=WAIT_S)
                request = AlertRequest.model_validate(
                    {
                        "level": 4,
                        "event_type": "00000",
                        "test": True,
                        "text": "test",
                        "targets": [parse_target("all")],
                    }
                )
                run = await daemon.submit(request, source="test", actor="pytest")
                state = await settle(daemon, run.id, timeout_s=WAIT_S, until="completed")
                assert (state["state"], state["acked"], state["coverage"]) == ("completed", 63, 1.0)
        finally:
            sims.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(sims.wait(), WAIT_S) == 0
    records = _log(log_path)
    shares = sorted((str(r["share"]), r["terminals"]) for r in records if r.get("event") == "simulator.share")
    assert shares == [("0/3", 21), ("1/3", 21), ("2/3", 21)]
    played = [
        str(r["terminal"]) for r in records if r.get("event") == "terminal.played" and r["alert_id"] == run.id
    ]
    other = [line for line in log_path.read_text(encoding="utf-8").splitlines() if not line.startswith("{")]
    assert sorted(played) == sorted(t.code for t in district.terminals()), other  # each one, once
    assert sum(1 for r in records if r.get("event") == "simulator.stopped") == 3


async def test_a_child_that_dies_ends_the_others_with_its_code(
    own_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config_path = _district(tmp_path / "district")
    log_path = tmp_path / "sim.log"
    with log_path.open("wb") as log_file:
        sims = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "ebcd", "simulate", "-c", str(config_path), "--broker", own_mosquitto.url,
              "--processes", "2", "--log-level", "info"],
            stdout=log_file,
            stderr=log_file,
        )  # fmt: skip
        try:
            pids: list[int] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while not pids and loop.time() < deadline:
                pids = next(
                    (list(r["pids"]) for r in _log(log_path) if r.get("event") == "simulator.processes"),
                    [],  # type: ignore[call-overload]
                )
                await asyncio.sleep(0.1)
            assert len(pids) == 2
            os.kill(pids[1], signal.SIGKILL)
            assert await asyncio.wait_for(sims.wait(), WAIT_S) == 1
        finally:
            if sims.returncode is None:
                sims.send_signal(signal.SIGTERM)
                await sims.wait()
    ended = [r for r in _log(log_path) if r.get("event") == "simulator.process_ended"]
    assert [(r["pid"], r["exit_code"]) for r in ended] == [(pids[1], -9)]


def test_shares_split_the_mqtt_terminals_and_keep_buses_and_adapters_in_the_first(district: District) -> None:
    everyone = list(district.terminals())
    shares = [share_of(everyone, (i, 4)) for i in range(4)]
    codes = [t.code for s in shares for t in s]
    assert sorted(codes) == sorted(t.code for t in everyone)
    assert all(t.link == "mqtt" for s in shares[1:] for t in s)
    assert {t.link for t in shares[0]} == {"mqtt", "serial", "adapter"}
    assert max(sum(t.link == "mqtt" for t in s) for s in shares) - min(len(s) for s in shares[1:]) <= 1
    assert parse_share("2/4") == (2, 4)
    for bad in ("4/4", "x/2", "1", "-1/2"):
        with pytest.raises(ValueError, match="expected I/N"):
            parse_share(bad)


def _connections_to(port: int) -> Counter[str]:
    """Local address -> established TCP connections to `port` on this host (/proc/net/tcp)."""
    out: Counter[str] = Counter()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            out[socket.inet_ntoa(bytes.fromhex(local.split(":")[0])[::-1])] += 1
    return out


async def test_terminals_connect_from_the_source_addresses_given_in_turn(
    own_mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Past ~28,000 connections on one host the ephemeral ports of one address run out; each extra
    loopback address has its own."""
    config_path = _district(tmp_path / "district")
    sims = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "ebcd", "simulate", "-c", str(config_path), "--broker", own_mosquitto.url,
          "--processes", "2", "--source-address", "127.0.0.2,127.0.0.3", "--log-level", "warning"],
    )  # fmt: skip
    try:
        await wait_for(lambda: sum(_connections_to(own_mosquitto.port).values()) >= 63, WAIT_S)
        # the two shares (32 and 31 terminals) each take the addresses in turn
        assert _connections_to(own_mosquitto.port) == {"127.0.0.2": 32, "127.0.0.3": 31}
    finally:
        sims.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sims.wait(), WAIT_S) == 0


def test_a_source_address_that_is_not_one_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ebcd", "simulate", "-c", str(_district(tmp_path)), "--broker",
         "mqtt://127.0.0.1:9", "--source-address", "127.0.0.2,host-b"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--source-address: 'host-b' is not an IP address" in done.stderr
