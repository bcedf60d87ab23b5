"""Terminals obey only ebcd: unsigned, wrongly signed, replayed and stale commands are refused,
over MQTT and over serial, and the reason shows in the alert's report."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.delivery.alerts import Alert
from ebcd.delivery.state import DState
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.protocols.messages import PlayCommand
from ebcd.protocols.mqtt import codec as mqtt_codec
from ebcd.protocols.mqtt.codec import Topics
from ebcd.protocols.serial.frame import (
    BroadcastResult,
    BroadcastStart,
    Frame,
    ResultStatus,
    command_body,
    encode_frame,
)
from ebcd.security.bench import bench_signer
from ebcd.security.replay import quantize_command, sign_command
from ebcd.security.signing import Ed25519SigningKey, Signer
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for, wait_online
from tests.serial_tap import serial_tap

pytestmark = pytest.mark.slow


def _alert(*targets: str) -> AlertRequest:
    return AlertRequest(
        level=2,
        event_type="11B03",
        targets=[parse_target(t) for t in targets],
        text="暴雨橙色预警",
        ttl_s=600,
    )


def _causes(report: dict[str, object]) -> set[str]:
    return {p["cause"] for p in report["problems"]}  # type: ignore[index, union-attr]


def _stale_command(run: Alert, seq: int) -> PlayCommand:
    """A command for the live alert, correctly signed with ebcd's (bench) key, but an hour old."""
    old = quantize_command(
        PlayCommand(run.id, run.ebmid, 1, seq, 1, "11B03", "伪造", 600.0, issued_at=time.time() - 3600)
    )
    return replace(old, signature=sign_command(bench_signer("ed25519"), old))


def _config(shipped: Config, scheme: str = "ed25519") -> Config:
    config = fast_config(shipped, ack_timeout_s=2.0, max_attempts=1)
    return config.model_copy(update={"security": config.security.model_copy(update={"scheme": scheme})})


async def test_wrongly_signed_commands_are_refused_on_both_links(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    mqtt_village = next(v for v in district.villages() if v.link == "mqtt")
    serial_village = next(v for v in district.villages() if v.link == "serial")
    stranger = Signer(Ed25519SigningKey.generate(), "000000000077").verifier()  # trusts another key
    config = _config(shipped_config)
    terminals = mqtt_village.terminals + serial_village.terminals
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(
            config, district, terminals, mosquitto.host, mosquitto.port, verifier=stranger
        ) as fleet,
    ):
        await wait_online(daemon, len(terminals))  # the serial room's bus is open and polled
        run = await daemon.submit(
            _alert(f"village:{mqtt_village.code}", f"village:{serial_village.code}"),
            source="test",
            actor="pytest",
        )
        state = await settle(daemon, run.id, timeout_s=30)
        assert (state["state"], state["acked"]) == ("partial", 0)
        assert all(d.state is DState.REFUSED for d in run.deliveries.values()), [
            (d.state.value, d.cause) for d in run.deliveries.values() if d.state is not DState.REFUSED
        ]
        report = daemon.control.report(run)
        assert _causes(report) == {"signature: unknown_key"}
        assert {p["terminal"] for p in report["problems"]} == {t.code for t in terminals}
        assert not fleet.plays()  # nothing played


async def test_unsigned_commands_are_refused(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    mqtt_village = next(v for v in district.villages() if v.link == "mqtt")
    serial_village = next(v for v in district.villages() if v.link == "serial")
    terminals = mqtt_village.terminals + serial_village.terminals
    codes = {t.code for t in terminals}
    config = _config(shipped_config, scheme="none")  # the daemon does not sign; the terminals insist
    async with (
        running_fleet(
            config,
            district,
            terminals,
            mosquitto.host,
            mosquitto.port,
            verifier=bench_signer("ed25519").verifier(),
        ) as fleet,
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
    ):
        run = await daemon.submit(
            _alert(f"village:{mqtt_village.code}", f"village:{serial_village.code}"),
            source="test",
            actor="pytest",
        )
        state = await settle(daemon, run.id, timeout_s=30)
        assert (state["state"], state["acked"]) == ("partial", 0)
        assert all(d.state is DState.REFUSED for d in run.deliveries.values())
        report = daemon.control.report(run)
        assert _causes(report) == {"unsigned"}
        assert {p["terminal"] for p in report["problems"]} == codes  # every terminal of both links
        assert {t for t, c in run.refusals if c == "unsigned"} == codes
        assert not fleet.plays()


async def test_replayed_and_stale_commands_are_refused_and_reported(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    village = next(v for v in district.villages() if v.link == "mqtt")
    codes = {t.code for t in village.terminals}
    config = _config(shipped_config)
    topics = Topics(district.code)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, village.terminals, mosquitto.host, mosquitto.port) as fleet,
        mqtt_client(mosquitto.host, mosquitto.port, topics.group_cmd(village.code)) as (client, seen),
    ):
        run = await daemon.submit(_alert(f"village:{village.code}"), source="test", actor="pytest")
        assert (await settle(daemon, run.id, until="completed"))[
            "state"
        ] == "completed"  # signed by ebcd: obeyed
        await wait_for(lambda: bool(seen), 5)
        captured = next(body for _t, body in seen if body and body.get("op") == "play")

        # stale: a correctly signed command issued an hour ago, for the live alert
        stale = _stale_command(run, daemon.runner.last_seq + 10)
        await client.publish(topics.group_cmd(village.code), mqtt_codec.encode_command(stale), qos=1)
        await wait_for(lambda: {t for t, c in run.refusals if c == "stale"} == codes, 10)

        # replayed: ebcd's own command, captured off the broker, sent again after the alert was cancelled
        await daemon.runner.cancel(run.id, "over")
        await wait_for(lambda: all(run.id in s.behaviour.stopped for s in fleet.terminals), 10)
        await client.publish(topics.group_cmd(village.code), json.dumps(captured).encode(), qos=1)
        await wait_for(lambda: {t for t, c in run.refusals if c == "replayed"} == codes, 10)
        report = daemon.control.report(run)
        assert {r["cause"] for r in report["refusals"]} == {"stale", "replayed"}
        assert all(n == 1 for n in fleet.plays().values())  # nothing played twice
        assert run.state.value == "cancelled"
        assert all(d.acked and d.finished for d in run.deliveries.values())  # the cancel rewrote nothing
        await asyncio.sleep(0)


async def test_stale_and_replayed_frames_injected_on_a_serial_line_are_refused_and_reported(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    """An attacker clipped onto the RS-485 pair (a tap between the bus master and the bus) injects a
    stale command and a replay of ebcd's own frame; the terminals refuse both and say why in their
    next poll answer, so the refusals reach the alert's report although ebcd never sent those frames."""
    village = next(v for v in district.villages() if v.link == "serial")
    assert village.port is not None
    codes = {t.code for t in village.terminals}
    config = _config(shipped_config)
    config = config.model_copy(update={"serial": config.serial.model_copy(update={"poll_interval_s": 0.2})})
    behind = tmp_path / "bus-behind-the-tap"
    async with (
        running_fleet(
            config,
            district,
            village.terminals,
            mosquitto.host,
            mosquitto.port,
            bus_ports={village.code: str(behind)},
        ) as fleet,
        serial_tap(village.port, behind) as tap,
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
    ):
        (bus,) = fleet.buses
        run = await daemon.submit(_alert(f"village:{village.code}"), source="test", actor="pytest")
        assert (await settle(daemon, run.id, timeout_s=30, until="completed"))[
            "state"
        ] == "completed"  # signed by ebcd: obeyed
        start = next(
            f for f in tap.to_bus.frames if isinstance(f.body, BroadcastStart) and f.body.alert_id == run.id
        )
        assert start.signature is not None
        captured = tap.captured(start)  # the bytes of ebcd's own command, as they crossed the line

        # stale: a correctly signed command issued an hour ago, for the live alert, to the whole bus
        stale = _stale_command(run, daemon.runner.last_seq + 10)
        forged = Frame(
            village.code, tuple(sorted(codes)), command_body(stale), 0x5EED, signature=stale.signature
        )
        await tap.inject(encode_frame(forged))
        await wait_for(lambda: {t for t, c in run.refusals if c == "stale"} == codes, 10)

        # replayed: ebcd's own frame, captured on the line, sent again after the alert was cancelled
        await daemon.runner.cancel(run.id, "over")
        await tap.until(lambda: _results(tap.from_bus.frames, run.id, ResultStatus.STOPPED) == codes, 10)
        await tap.inject(captured)
        await wait_for(lambda: {t for t, c in run.refusals if c == "replayed"} == codes, 10)

        report = daemon.control.report(run)
        assert {r["cause"] for r in report["refusals"]} == {"stale", "replayed"}
        assert {r["terminal"] for r in report["refusals"]} == codes
        # the refusals crossed the line as the terminals' answers to heartbeat polls
        assert _results(tap.from_bus.frames, run.id, ResultStatus.REFUSED, "stale") == codes
        assert _results(tap.from_bus.frames, run.id, ResultStatus.REFUSED, "replayed") == codes
        assert all(
            set(t.refused) == {(run.id, "stale"), (run.id, "replayed")} for t in bus.terminals.values()
        )
        assert all(n == 1 for n in fleet.plays().values())  # nothing played twice
        assert len(fleet.plays()) == len(codes)
        assert run.state.value == "cancelled"
        assert all(d.acked and d.finished for d in run.deliveries.values())  # the cancel rewrote nothing


def _results(frames: list[Frame], alert_id: str, status: ResultStatus, cause: str | None = None) -> set[str]:
    """The terminals that answered with this result for the alert, in the frames seen on a line."""
    return {
        f.source
        for f in frames
        if isinstance(f.body, BroadcastResult)
        and (f.body.alert_id, f.body.status) == (alert_id, status)
        and (cause is None or f.body.cause == cause)
    }
