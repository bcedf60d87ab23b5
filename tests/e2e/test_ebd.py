"""End to end under a simulated city platform: EBMs down over EBD, state, coverage and logs up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.daemon.daemon import Daemon
from ebcd.protocols.ebd.documents import ebm_body
from ebcd.protocols.ebd.signature import public_pem
from ebcd.security.signing import Sm2SigningKey
from ebcd.tiers.district import District
from simulators.city_platform import CityPlatform
from tests.conftest import Mosquitto, fast_config
from tests.ebd_helpers import city_platform, ebd_url, with_ebd
from tests.helpers import running_daemon, running_fleet, wait_for, wait_online

pytestmark = pytest.mark.slow


def _final(city: CityPlatform, ebmid: str) -> dict[str, object] | None:
    """The last EBMStateResponse of a broadcast if it says success with coverage 1."""
    states = city.states_of(ebmid)
    if states and states[-1].body["BrdStateCode"] == "3":
        return states[-1].body  # type: ignore[no-any-return]
    return None


async def test_live_ebm_for_two_towns_plays_there_only_and_coverage_and_log_reach_the_city(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    towns = list(district.towns.values())[1:3]
    async with city_platform(shipped_config, district.code) as city:
        config = with_ebd(fast_config(shipped_config), tmp_path, city.url)
        city.to_url = ebd_url(config)
        async with (
            running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
            running_fleet(
                config, district, list(district.terminals()), mosquitto.host, mosquitto.port
            ) as fleet,
        ):
            await wait_online(daemon, 769)
            ebm = city.ebm(areas=[t.area for t in towns], level=2, event="11B03")
            code, desc = await city.send(ebm)
            assert code == 1, desc
            await city.wait(lambda: _final(city, ebm.ebmid) is not None, 120)
            await city.wait(
                lambda: any(
                    g.body["EBMBrdItem"]["EBM"]["EBMID"] == ebm.ebmid for g in city.of_type("EBMBrdLog")
                ),
                30,
            )
            (run,) = [a for a in daemon.runner.alerts.values() if a.request.identifier == ebm.ebmid]
            expected = {t.code for town in towns for t in town.terminals()}
            played = {code for (code, alert, _r), n in fleet.plays().items() if alert == run.id and n}
            assert played == expected
            assert all(n == 1 for (_c, alert, _r), n in fleet.plays().items() if alert == run.id)
            final = _final(city, ebm.ebmid)
            assert final is not None
            cov = final["Coverage"]
            assert cov["CoverageRate"] == "1.0000"  # type: ignore[index]
            assert cov["ResBrdStat"] == f"{len(expected)},{len(expected)}"  # type: ignore[index]
            rooms = {t.room for t in district.terminals() if t.code in expected}
            items = final["ResBrdInfo"]["ResBrdItem"]  # type: ignore[index]
            assert {i["EBRBS"]["EBRID"] for i in items} == rooms  # one item per room
            assert all(i["EBRBS"]["BrdStateCode"] == "3" for i in items)
            first = city.states_of(ebm.ebmid)[0].body
            assert first["BrdStateCode"] in ("1", "2")  # accepted: waiting or playing
            assert all(g.signed_by for g in city.got)

            drill = city.ebm(areas=[towns[0].area], msg_type=4, level=4, event="00000", title="演练")
            assert (await city.send(drill))[0] == 1
            (drill_run,) = [a for a in daemon.runner.alerts.values() if a.request.identifier == drill.ebmid]
            assert drill_run.request.test
            await city.wait(lambda: _final(city, drill.ebmid) is not None, 120)
            assert not city.refused


async def test_city_down_for_a_while_gets_every_state_report_in_order_when_back(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    town = list(district.towns.values())[3]
    async with city_platform(shipped_config, district.code) as city:
        config = with_ebd(fast_config(shipped_config), tmp_path, city.url, retry_max_s=2.0)
        city.to_url = ebd_url(config)
        async with (
            running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
            running_fleet(config, district, list(town.terminals()), mosquitto.host, mosquitto.port),
        ):
            await wait_online(daemon, len(list(town.terminals())))
            await city.wait(lambda: bool(city.of_type("EBRDTInfo")), 20)
            await city.down()
            ebm = city.ebm(areas=[town.area])
            assert (await city.send(ebm))[0] == 1  # the city's own client still reaches ebcd
            (run,) = [a for a in daemon.runner.alerts.values() if a.request.identifier == ebm.ebmid]
            await wait_for(lambda: run.state.value == "completed", 120)
            await wait_for(lambda: daemon.ebd is not None and daemon.ebd.uplink.up is False, 30)
            waiting = await _unsent_until(daemon, "EBMBrdLog", 30)  # the end reported into the outbox
            assert {t for _i, _e, t, _p in waiting} >= {"EBMStateResponse", "EBMBrdLog"}
            await asyncio.sleep(3.0)  # the city stays away a while longer (a minute in the field)
            await city.up()
            await city.wait(lambda: {w[1] for w in waiting} <= {g.header.ebdid for g in city.got}, 60)
            order = [g.header.ebdid for g in city.got if g.header.ebdid in {w[1] for w in waiting}]
            assert order == [w[1] for w in waiting]  # every one, in the order they were made
            assert _final(city, ebm.ebmid) is not None
            for _ in range(200):  # and the journal learns they were answered (just after the city has them)
                unsent = {e for _i, e, _t, _p in await daemon.journal.ebd_unsent(1000)}
                if not unsent & {w[1] for w in waiting}:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"still unsent in the journal: {unsent & {w[1] for w in waiting}}")


async def _unsent_until(daemon: Daemon, ebd_type: str, timeout_s: float) -> list[tuple[int, str, str, bytes]]:
    """The journal's unsent packages, once one of them is of `ebd_type`."""
    async with asyncio.timeout(timeout_s):
        while True:
            unsent = await daemon.journal.ebd_unsent(1000)
            if any(t == ebd_type for _i, _e, t, _p in unsent):
                return unsent
            await asyncio.sleep(0.05)


# Another SM2 key listed this many times before the city's: every package is tried against each
# (gmssl: ~12 ms a verification), so judging takes seconds after the raw row is journalled, and
# the kill lands between journalling and answering on a loaded machine too.
OTHER_KEYS = 150


def _slow_to_verify(tmp_path: Path, city_keys: list[str]) -> list[str]:
    other = tmp_path / "other-city.pem"
    other.write_bytes(public_pem(Sm2SigningKey.from_scalar(0x5EED).public_key()))
    return [str(other)] * OTHER_KEYS + city_keys


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ebcd", *args], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env
    )


async def test_kill_9_between_accepting_an_ebm_and_answering_loses_nothing(
    own_mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    """The daemon dies after journalling the package, before its answer: at restart the EBM is judged,
    plays once, and the city gets its state; the city's retry of the same package is a replay."""
    town = next(iter(district.towns.values()))
    async with city_platform(shipped_config, district.code) as city:
        config = with_ebd(shipped_config, tmp_path, city.url)
        toml = (shipped_config.base_dir / "ebcd.toml").read_text(encoding="utf-8")
        e = config.ebd
        toml += (
            f'\n[ebd]\nlisten = "{e.listen}"\nupstream_url = "{e.upstream_url}"\n'
            f'upstream_code = "{e.upstream_code}"\n'
            f"verify_with = {json.dumps(_slow_to_verify(tmp_path, e.verify_with))}\n"
            "report_interval_s = 0.2\nretry_max_s = 1.0\n"
        )
        conf = shipped_config.base_dir / f"{tmp_path.name}-ebd.toml"  # beside the session's ledgers
        conf.write_text(toml, encoding="utf-8")
        city.to_url = ebd_url(config)
        state = tmp_path / "state"
        run = [
            "run",
            "-c",
            str(conf),
            "--broker",
            own_mosquitto.url,
            "--state-dir",
            str(state),
            "--metrics-port",
            "-1",
        ]
        daemon = _spawn(run, tmp_path / "daemon1.log")
        try:
            async with running_fleet(
                config, district, list(town.terminals()), own_mosquitto.host, own_mosquitto.port
            ) as fleet:
                await city.wait(lambda: bool(city.of_type("EBRDTInfo")), 60)
                db = state / "journal.sqlite3"
                ebm = city.ebm(areas=[town.area])
                ebdid, tar = city.package(ebm_body(ebm), "EBM")
                post = asyncio.create_task(city.post(ebdid, tar))

                def journalled() -> bool:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                        return bool(conn.execute("SELECT 1 FROM received WHERE source = 'ebd'").fetchone())

                await wait_for(journalled, 30, interval_s=0.001)
                daemon.send_signal(signal.SIGKILL)
                daemon.wait(10)
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    (verdict,) = conn.execute("SELECT outcome FROM received WHERE source = 'ebd'").fetchone()
                answered = await asyncio.gather(post, return_exceptions=True)
                assert isinstance(answered[0], Exception), "answered before the kill: the test proves nothing"
                daemon = _spawn(run, tmp_path / "daemon2.log")
                await city.wait(lambda: _final(city, ebm.ebmid) is not None, 120)
                code, desc = await city.post(ebdid, tar)  # the city retries, having had no answer
                assert code == 5
                assert "received before" in desc
                plays = [n for (_c, a, _r), n in fleet.plays().items() if n and a.startswith("20")]
                assert len(plays) == len(list(town.terminals()))
                assert set(plays) == {1}
                log2 = (tmp_path / "daemon2.log").read_text()
                if verdict is None:
                    assert '"ebd.recovered"' in log2
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(30)
