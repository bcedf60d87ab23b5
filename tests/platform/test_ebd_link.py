"""The EBD link through a running daemon: hostile packages refused over HTTP, the daemon serving on."""

from __future__ import annotations

import tarfile
from pathlib import Path

import aiohttp
import pytest

from ebcd.config import Config
from ebcd.delivery.state import Bucket
from ebcd.protocols.ebd import ResultCode
from ebcd.protocols.ebd.documents import build, ebm_body
from ebcd.tiers.district import District
from simulators.city_platform import CityPlatform
from tests.conftest import Mosquitto, fast_config
from tests.ebd_helpers import city_platform, ebd_url, with_ebd
from tests.helpers import running_daemon, running_fleet, settle, wait_for, wait_online
from tests.protocols.ebd_fixtures import city_signer, ebds, raw_tar


def _doc(city: CityPlatform, ebdid: str, **ebm: object) -> bytes:
    header = city._header("EBM")
    header = type(header)(**{**{f: getattr(header, f) for f in header.__slots__}, "ebdid": ebdid})
    return build(header, ebm_body(city.ebm(**ebm)))  # type: ignore[arg-type]


def _signed(city: CityPlatform, ebdid: str, doc: bytes) -> bytes:
    return raw_tar([(f"EBDB_{ebdid}.xml", doc), (f"EBDS_EBDB_{ebdid}.xml", ebds(city.signer, ebdid, doc))])


async def test_hostile_packages_are_refused_with_their_result_codes_and_the_daemon_keeps_serving(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    village = next(district.villages())
    area = [village.area]
    async with city_platform(shipped_config, district.code) as city:
        config = with_ebd(fast_config(shipped_config), tmp_path, city.url, max_package_bytes=2 * 1024 * 1024)
        city.to_url = ebd_url(config)
        async with (
            running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
            running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port),
        ):
            await wait_online(daemon, len(village.terminals))
            ids = iter(range(1, 1000))

            def ebdid() -> str:
                return f"10{city.code}20261203{next(ids):08d}"

            cases: dict[str, tuple[str, bytes, ResultCode]] = {}
            e = ebdid()
            doc = _doc(city, e, areas=area)
            sig = ebds(city_signer(seed=5), e, doc)  # signed by a key the daemon does not trust
            cases["other key"] = (e, raw_tar([(f"EBDB_{e}.xml", doc), (f"EBDS_EBDB_{e}.xml", sig)]), 4)
            e = ebdid()
            doc = _doc(city, e, areas=area)
            sig = ebds(city.signer, e, doc).replace(b"<SignatureValue>", b"<SignatureValue>AAAA")
            cases["bad signature"] = (e, raw_tar([(f"EBDB_{e}.xml", doc), (f"EBDS_EBDB_{e}.xml", sig)]), 4)
            e = ebdid()
            doc = _doc(city, e, areas=area)
            sig = ebds(city.signer, e, doc)
            changed = doc.replace(b"<Severity>2<", b"<Severity>1<")
            cases["changed after signing"] = (
                e,
                raw_tar([(f"EBDB_{e}.xml", changed), (f"EBDS_EBDB_{e}.xml", sig)]),
                4,
            )
            e = ebdid()
            cases["../ path"] = (e, raw_tar([(f"../EBDB_{e}.xml", _doc(city, e, areas=area))]), 2)
            e = ebdid()
            link = tarfile.TarInfo(f"EBDR_{e}.mp3")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
            cases["symlink"] = (e, raw_tar([(f"EBDB_{e}.xml", _doc(city, e, areas=area)), link]), 2)
            e = ebdid()
            cases["10,000 files"] = (e, raw_tar([(f"EBDR_{n}.bin", b"") for n in range(10_000)]), 5)
            e = ebdid()
            bomb = (
                b'<?xml version="1.0"?><!DOCTYPE EBD [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">'
                b"]><EBD><EBDID>&b;</EBDID></EBD>"
            )
            cases["entity bomb"] = (e, _signed(city, e, bomb), 2)
            e = ebdid()
            cases["missing EBDB"] = (e, raw_tar([(f"EBDS_EBDB_{e}.xml", b"<Signature/>")]), 3)
            e = ebdid()
            cases["another district"] = (e, _signed(city, e, _doc(city, e, areas=["341502101000"])), 5)

            for what, (e, tar, code) in cases.items():
                got, desc = await city.post(e, tar)
                assert (what, got) == (what, code), desc
                assert desc, what

            # 50 MB body: refused after reading the limit, answered, the daemon up
            body = (
                b"--b\r\nContent-Type: application/x-tar\r\n\r\n" + bytes(50 * 1024 * 1024) + b"\r\n--b--\r\n"
            )
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    city.to_url, data=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
                ) as resp,
            ):
                answer = await resp.read()
            assert b"<ResultCode>5</ResultCode>" in answer
            assert b"max_package_bytes" in answer

            # a good one is accepted and plays; the same package again is a replay
            e = ebdid()
            good = _signed(city, e, _doc(city, e, areas=area))
            assert (await city.post(e, good))[0] == 1
            code, desc = await city.post(e, good)
            assert code == 5
            assert "received before" in desc
            (run,) = [a for a in daemon.runner.alerts.values() if a.source == "ebd"]
            state = await settle(daemon, run.id, until="completed")
            assert state["targets"] == len(village.terminals)
            assert state["state"] == "completed"

            rejected = daemon.metrics.rejected
            for reason, n in {
                "bad_signature": 3,
                "bad_package": 2,
                "too_large": 2,
                "forbidden_xml": 1,
                "missing_content": 1,
                "no_target_in_district": 1,
                "replayed": 1,
            }.items():
                assert rejected.labels(reason)._value.get() == n, reason
            received = [r for r in await daemon.journal.list_received(100) if r.source == "ebd"]
            assert len(received) == len(cases) + 3
            assert all(r.outcome is not None for r in received)
            await wait_for(lambda: bool(city.states_of(run.request.identifier or "")), 10)


async def test_a_cancel_from_above_and_a_state_request_and_inventory_on_request(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    village = next(district.villages())
    async with city_platform(shipped_config, district.code) as city:
        config = with_ebd(fast_config(shipped_config), tmp_path, city.url)
        config = config.model_copy(
            update={"simulator": config.simulator.model_copy(update={"play_time_s": 60.0})}
        )
        city.to_url = ebd_url(config)
        async with (
            running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
            running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
        ):
            await wait_online(daemon, len(village.terminals))
            await city.wait(lambda: bool(city.of_type("EBRDTInfo")), 10)
            (info,) = city.of_type("EBRDTInfo")
            assert len(info.body["EBRDT"]) == len(district)
            assert info.signed_by is not None

            ebm = city.ebm(areas=[village.area], msg_type=3)  # a drill
            assert (await city.send(ebm))[0] == 1
            (run,) = [a for a in daemon.runner.alerts.values() if a.request.identifier == ebm.ebmid]
            assert run.request.test
            await wait_for(lambda: run.counts[Bucket.ACKED] == len(village.terminals), 20)  # all playing
            code, desc = await city.cancel(ebm.ebmid)
            assert code == 1, desc
            await wait_for(lambda: run.state.value == "cancelled", 10)
            sims = [s for s in fleet.terminals if s.terminal.code in {t.code for t in village.terminals}]
            await wait_for(lambda: all(run.id in s.behaviour.stopped for s in sims), 10)  # they went silent
            await city.wait(lambda: any(g.body["BrdStateCode"] == "5" for g in city.states_of(ebm.ebmid)), 10)
            # the same cancel again is a duplicate, and says so
            assert (await city.cancel(ebm.ebmid))[0] == 5

            before = len(city.of_type("EBRDTInfo"))
            assert (await city.request("OMDRequest", OMDType="EBRDTInfo"))[0] == 1
            await city.wait(lambda: len(city.of_type("EBRDTInfo")) > before, 10)
            n = len(city.states_of(ebm.ebmid))
            assert (await city.request("EBMStateRequest", EBMID=ebm.ebmid))[0] == 1
            await city.wait(lambda: len(city.states_of(ebm.ebmid)) > n, 10)
            assert (await city.request("EBMStateRequest", EBMID="1" * 35))[0] == 5
            await city.wait(lambda: bool(city.of_type("ConnectionCheck")), 10)
            assert not city.refused


@pytest.mark.parametrize("seconds_ahead", [4.0])
async def test_a_future_start_time_waits_then_plays(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path, seconds_ahead: float
) -> None:
    village = next(district.villages())
    async with city_platform(shipped_config, district.code) as city:
        config = with_ebd(fast_config(shipped_config), tmp_path, city.url, start_slack_s=1.0)
        city.to_url = ebd_url(config)
        async with (
            running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
            running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port),
        ):
            await wait_online(daemon, len(village.terminals))
            ebm = city.ebm(areas=[village.area], starts_in_s=seconds_ahead)
            code, desc = await city.send(ebm)
            assert code == 1
            assert "StartTime" in desc
            assert not [a for a in daemon.runner.alerts.values() if a.request.identifier == ebm.ebmid]
            await city.wait(lambda: any(g.body["BrdStateCode"] == "1" for g in city.states_of(ebm.ebmid)), 10)
            await wait_for(
                lambda: any(a.request.identifier == ebm.ebmid for a in daemon.runner.alerts.values()), 30
            )
            await city.wait(lambda: any(g.body["BrdStateCode"] == "3" for g in city.states_of(ebm.ebmid)), 30)
