"""Overlapping alerts end to end: finished broadcasts stay finished, nothing waits on an alert that
is over, cancels never rewrite history, back-to-back alerts queue in order without a retry storm.

Every test runs the daemon with MQTT terminals on their own connections through a real Mosquitto
and at least one serial village on a simulated bus behind a pty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from ebcd.config import Config
from ebcd.control.socket import SOCKET_NAME, ControlClient
from ebcd.daemon.daemon import Daemon
from ebcd.delivery.alerts import Alert
from ebcd.delivery.core import Refused
from ebcd.delivery.state import AState, Bucket, DState, Progress
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.protocols.mqtt.codec import Topics
from ebcd.protocols.serial.frame import Query, ResultStatus
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal
from ebcd.tiers.village import Village
from simulators.faults import Fault, FaultPlan
from simulators.mqtt_fleet import MqttFleet
from simulators.serial_bus import BusFaults, SerialBusSimulator
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for, wait_online

pytestmark = pytest.mark.slow

SERIAL_POLL_S = 1.0  # a heartbeat round on every bus each second: "the serial poll" comes soon
WAITING_FOR = "waiting: the terminal plays alert "  # the cause of a delivery waiting for its terminal


def _config(shipped: Config, *, serial: dict[str, Any] | None = None, **delivery: float) -> Config:
    config = fast_config(shipped, **delivery)
    values = {"poll_interval_s": SERIAL_POLL_S, **(serial or {})}
    return config.model_copy(update={"serial": config.serial.model_copy(update=values)})


def _playing(config: Config, play_time_s: float) -> Config:
    """The same config, for simulators whose broadcasts last `play_time_s`."""
    return config.model_copy(
        update={"simulator": config.simulator.model_copy(update={"play_time_s": play_time_s})}
    )


def _mqtt_villages(district: District, *picks: int) -> list[Village]:
    villages = [v for v in district.villages() if v.link == "mqtt"]
    return [villages[i] for i in picks]


def _serial_village(district: District, pick: int) -> Village:
    villages = [v for v in district.villages() if v.link == "serial"]
    assert villages, "the shipped district has serial rooms"
    return villages[pick]


def _terminals(villages: Iterable[Village]) -> list[Terminal]:
    return [t for v in villages for t in v.terminals]


def _alert(
    villages: Sequence[Village], *, level: int = 2, test: bool = False, text: str = ""
) -> AlertRequest:
    return AlertRequest(
        level=level,
        event_type="11B03",
        targets=[parse_target(f"village:{v.code}") for v in villages],
        text=text or f"暴雨预警（{level}级）：请注意防范",
        test=test,
        ttl_s=600,
    )


def _bus_of(fleet: MqttFleet, code: str) -> SerialBusSimulator:
    return next(bus for bus in fleet.buses if code in bus.terminals)


def _serial_status(fleet: MqttFleet, alert: Alert, code: str) -> ResultStatus:
    """What a serial terminal itself says about the alert (what its loudspeaker does)."""
    query = Query(alert.ebmid, alert.id, alert.revision)
    return _bus_of(fleet, code).terminals[code].result(query, asyncio.get_running_loop().time()).status


def _listed(answer: dict[str, Any], alert_id: str) -> dict[str, Any]:
    """The alert's entry in `ebcd alert list --json`."""
    assert answer["ok"], answer
    return next(a for a in answer["alerts"] if a["id"] == alert_id)


def _retries(daemon: Daemon, transport: str) -> float:
    value = daemon.metrics.registry.get_sample_value("ebcd_delivery_retries_total", {"transport": transport})
    return value or 0.0


def _commands(daemon: Daemon, addressing: str) -> float:
    value = daemon.metrics.registry.get_sample_value(
        "ebcd_commands_published_total", {"addressing": addressing}
    )
    return value or 0.0


async def _one_serial_poll_round(daemon: Daemon, village: Village, timeout_s: float = 30) -> None:
    """Wait until the village's bus master has polled every terminal at least once more from now."""
    master = daemon.serial_masters[village.code]
    start = master.counters.frames_sent
    await wait_for(lambda: master.counters.frames_sent >= start + 2 * len(village.terminals), timeout_s)


def _waiting_on_what_is_over(daemon: Daemon) -> list[str]:
    """Deliveries waiting for a terminal that nothing live holds: they would wait forever."""
    alerts = daemon.runner.alerts
    wrong = []
    for alert in alerts.values():
        if alert.closed:
            continue
        for code, d in alert.deliveries.items():
            if d.state not in (DState.WAITING, DState.PREEMPTED) or d.finished:
                continue
            holder_id = daemon.core.holders.holder_of(code)
            holder = alerts.get(holder_id) if holder_id else None
            if holder is None or holder.id == alert.id or holder.closed or not holder.deliveries[code].holds:
                wrong.append(f"{alert.id}/{code}: {d.state} ({d.cause}), held by {holder_id}")
    return wrong


def _reported_waiting_on_what_is_over(daemon: Daemon) -> list[str]:
    """What `ebcd report ID` says of the alerts still dispatching: a terminal "waiting: the terminal
    plays alert X" where alert X is over on that terminal (played out, or ended) is misreported."""
    alerts = daemon.runner.alerts
    wrong = []
    for alert in list(alerts.values()):
        if alert.state is not AState.DISPATCHING:
            continue
        for problem in daemon.control.report(alert)["problems"]:
            cause, code = problem["cause"] or "", problem["terminal"]
            if not cause.startswith(WAITING_FOR):
                continue
            named = alerts.get(cause.removeprefix(WAITING_FOR))
            on_it = named.deliveries.get(code) if named is not None else None
            if on_it is None or not on_it.holds:
                what = f"{named.state}, its delivery {on_it.state if on_it else None}" if named else "unknown"
                wrong.append(f"{alert.id}/{code}: reported {cause!r} while that alert is {what}")
    return wrong


# -- 1. a finished broadcast is never played again -------------------------------------------------
async def test_a_finished_broadcast_is_not_played_again_after_a_higher_alert_takes_its_terminals(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = _config(shipped_config)
    serial = _serial_village(district, 0)
    villages = [serial, *_mqtt_villages(district, 0, 25, 50)]
    terminals = _terminals(villages)
    codes = [t.code for t in terminals]
    mqtt_codes = {t.code for t in terminals if t.link == "mqtt"}
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, terminals, mosquitto.host, mosquitto.port) as fleet,
    ):
        await wait_online(daemon, len(terminals), 30)
        first = await daemon.submit(
            _alert(villages, level=3, test=True, text="应急广播系统测试"), source="cli", actor="duty officer"
        )
        # every terminal played it to the end and said so (serial ones when polled for their result)
        await wait_for(lambda: all(first.deliveries[c].progress is Progress.DONE for c in codes), 30)
        assert first.state is AState.COMPLETED

        higher_villages = villages[:2]  # the serial village and one MQTT village
        taken = [t.code for t in _terminals(higher_villages)]
        higher = await daemon.submit(
            _alert(higher_villages, level=1, text="暴雨红色预警：立即转移"),
            source="cli",
            actor="duty officer",
        )
        await wait_for(lambda: all(higher.deliveries[c].progress is Progress.DONE for c in taken), 30)
        assert higher.state is AState.COMPLETED
        await _one_serial_poll_round(daemon, serial)  # and a heartbeat round on the bus after that

        plays = fleet.plays()
        assert {c: plays.get((c, first.id, 1), 0) for c in codes} == dict.fromkeys(codes, 1)
        assert {c: plays.get((c, higher.id, 1), 0) for c in taken} == dict.fromkeys(taken, 1)
        resumes = {s.terminal.code: s.behaviour.resumes[(first.id, 1)] for s in fleet.terminals}
        assert resumes == dict.fromkeys(mqtt_codes, 0)
        assert all(first.id not in s.behaviour.stopped for s in fleet.terminals)
        for c in codes:  # the daemon never sent it again: one attempt, finished, nothing to resume
            d = first.deliveries[c]
            assert (d.state, d.acked, d.finished, d.resume, d.attempts) == (
                DState.ACKNOWLEDGED,
                True,
                True,
                False,
                1,
            ), c

        daemon.runner.flush_states()
        doc = first.state_doc(district, daemon.runner.clock())
        listed = _listed(await ControlClient(tmp_path / SOCKET_NAME).request("list"), first.id)
        for state in (doc, listed):
            assert (state["state"], state["acked"], state["targets"], state["coverage"]) == (
                "completed",
                len(codes),
                len(codes),
                1.0,
            )
            assert (state["pending"], state["cancelled"], state["uncertain"], state["failed"]) == (0, 0, 0, 0)


# -- 2. an alert that ended partial holds nothing ------------------------------------------------
async def test_a_second_alert_to_terminals_that_are_down_is_sent_at_once_and_reaches_them_later(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    max_attempts = 2
    config = _config(
        shipped_config,
        serial={"response_timeout_s": 0.3, "attempts": 2},  # a dead terminal costs the bus 0.6 s
        ack_timeout_s=1.0,
        max_attempts=max_attempts,
        retry_initial_s=0.2,
    )
    serial = min(
        (v for v in district.villages() if v.link == "serial"), key=lambda v: (len(v.terminals), v.code)
    )
    up_village, *down_mqtt = _mqtt_villages(district, 3, 28, 53)
    down_villages = [serial, *down_mqtt]
    villages = [up_village, *down_villages]
    up = [t.code for t in up_village.terminals]
    down = [t.code for t in _terminals(down_villages)]
    dead = frozenset(t.code for t in serial.terminals)
    targets = len(up) + len(down)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(
            config,
            district,
            [*up_village.terminals, *serial.terminals],
            mosquitto.host,
            mosquitto.port,
            bus_faults=BusFaults(dead=dead),
        ) as fleet,
    ):
        await wait_online(daemon, len(up), 30)
        first = await daemon.submit(_alert(villages, level=2), source="cli", actor="duty officer")
        state = await settle(daemon, first.id, 30)
        assert (state["state"], state["acked"], state["uncertain"]) == ("partial", len(up), len(down))

        # the terminals are still down: the second alert is not held behind the first, which is over
        second = await daemon.submit(_alert(villages, level=2), source="cli", actor="duty officer")
        for c in down:
            d = second.deliveries[c]
            assert d.attempts >= 1, (c, d.state, d.cause)
            assert not (d.cause or "").startswith("waiting"), (c, d.cause)
            assert d.state in (DState.SENT, DState.UNCERTAIN), (c, d.state)
        state = await settle(daemon, second.id, 30)
        assert (state["state"], state["acked"], state["uncertain"]) == ("partial", len(up), len(down))
        for c in down:  # within its retry budget, and given up on
            d = second.deliveries[c]
            assert (d.state, d.attempts, d.due) == (DState.UNCERTAIN, max_attempts, None), c
        assert not any(
            (d.cause or "").startswith("waiting") for a in (first, second) for d in a.deliveries.values()
        )

        # the terminals come back: the serial ones answer their bus again, the MQTT ones connect
        _bus_of(fleet, serial.terminals[0].code).faults = BusFaults()
        on_mqtt = _terminals(down_mqtt)
        async with running_fleet(config, district, on_mqtt, mosquitto.host, mosquitto.port) as comeback:
            await wait_for(lambda: second.state is AState.COMPLETED, 60)
            await wait_for(lambda: first.state is AState.COMPLETED, 60)
            for alert in (first, second):
                assert (alert.counts[Bucket.ACKED], alert.targets) == (targets, targets)
            plays = {**fleet.plays(), **comeback.plays()}
            assert {c: plays.get((c, second.id, 1), 0) for c in down} == dict.fromkeys(down, 1)
            assert {c: plays.get((c, first.id, 1), 0) for c in down} == dict.fromkeys(down, 1)
            assert {c: plays.get((c, second.id, 1), 0) for c in up} == dict.fromkeys(up, 1)
            for s in comeback.terminals:  # the returning loudspeakers played both, in order of acceptance
                assert list(s.behaviour.plays) == [(first.id, 1), (second.id, 1)], s.terminal.code


# -- 3. cancel never rewrites history --------------------------------------------------------------
async def test_cancel_keeps_what_was_acknowledged_stops_the_loudspeakers_and_is_refused_twice(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = _config(shipped_config, ack_timeout_s=5.0)  # the missing terminals stay in flight a while
    town = min(
        (
            t
            for t in district.towns.values()
            if all(v.link == "mqtt" for v in district.villages() if v.town == t.code)
        ),
        key=lambda t: (sum(1 for _ in t.terminals()), t.code),
    )
    serial = _serial_village(district, 2)
    in_town = list(town.terminals())
    offline = {t.code for t in in_town if t.room == town.code}  # the town room's own loudspeakers are off
    assert offline
    plan = FaultPlan(dict.fromkeys(offline, Fault.OFFLINE))
    terminals = [*in_town, *serial.terminals]
    targets = len(terminals)
    live = targets - len(offline)
    live_mqtt = {t.code for t in in_town} - offline
    request = AlertRequest(
        level=2,
        event_type="11B03",
        targets=[parse_target(f"town:{town.area}"), parse_target(f"village:{serial.code}")],
        text="暴雨橙色预警：请注意防范",
        ttl_s=600,
    )
    fleet_config = _playing(config, 30.0)  # the loudspeakers are still playing when a cancel comes
    client = ControlClient(tmp_path / SOCKET_NAME)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(fleet_config, district, terminals, mosquitto.host, mosquitto.port, plan) as fleet,
    ):

        def silent(alert: Alert, codes: Iterable[str]) -> bool:
            """Every loudspeaker among `codes` the alert went out to was stopped and plays it no more."""
            wanted = set(codes)
            mqtt = all(
                alert.id in s.behaviour.stopped and s.behaviour.current != (alert.id, 1)
                for s in fleet.terminals
                if s.terminal.code in wanted and s.terminal.code in live_mqtt
            )
            on_bus = [t.code for t in serial.terminals if t.code in wanted]
            return mqtt and all(_serial_status(fleet, alert, c) is ResultStatus.STOPPED for c in on_bus)

        async def check(alert: Alert, acked: int) -> None:
            daemon.runner.flush_states()
            doc = alert.state_doc(district, daemon.runner.clock())
            status = await client.request("status", id=alert.id)
            for state in (doc, status["state"]):
                assert state["state"] == "cancelled"
                assert (state["targets"], state["acked"], state["cancelled"]) == (
                    targets,
                    acked,
                    targets - acked,
                )
                assert (state["failed"], state["uncertain"], state["pending"]) == (0, 0, 0)
                assert state["coverage"] == round(acked / targets, 4)
            assert all(alert.deliveries[c].bucket is Bucket.CANCELLED for c in offline)

        await wait_online(daemon, live, 60)
        # cancelled while the missing ones are still being tried, every other one acknowledged
        run = await daemon.submit(request, source="cli", actor="duty officer")
        await wait_for(lambda: run.counts[Bucket.ACKED] == live, 30)
        assert run.state is AState.DISPATCHING
        await daemon.runner.cancel(run.id, "issued in error")
        await check(run, live)
        await wait_for(lambda: silent(run, run.deliveries), 30)  # every loudspeaker it went out to
        await _one_serial_poll_round(daemon, serial)  # and every report after the stops is in
        await check(run, live)

        # cancelled as soon as the first acknowledgement is in, the others on their way
        early = await daemon.submit(request, source="cli", actor="duty officer")
        await wait_for(lambda: early.counts[Bucket.ACKED] >= 1, 30)
        await daemon.runner.cancel(early.id, "issued in error")
        reached = {c for c, d in early.deliveries.items() if d.acked}
        lowest = len(reached)
        seen: list[int] = []

        def quiet() -> bool:
            seen.append(early.counts[Bucket.ACKED])
            return silent(early, early.deliveries)

        await wait_for(quiet, 30)
        await _one_serial_poll_round(daemon, serial)
        acked = early.counts[Bucket.ACKED]
        assert seen == sorted(seen)  # never taken back
        assert seen[0] >= lowest
        assert reached <= {c for c, d in early.deliveries.items() if d.acked}
        assert lowest <= acked <= live
        await check(early, acked)

        # an alert that completed (every loudspeaker acknowledged, still playing), cancelled in its ttl
        villages = [serial, *(v for v in district.villages() if v.town == town.code)][:4]
        done = await daemon.submit(_alert(villages, level=2), source="cli", actor="duty officer")
        codes = [t.code for t in _terminals(villages)]
        assert (await settle(daemon, done.id, 30, until="completed"))["state"] == "completed"
        in_villages = [s for s in fleet.terminals if s.terminal.code in codes]
        assert all(s.behaviour.current == (done.id, 1) for s in in_villages)  # playing now
        await daemon.runner.cancel(done.id, "the storm passed")
        daemon.runner.flush_states()
        doc = done.state_doc(district, daemon.runner.clock())
        assert (doc["state"], doc["acked"], doc["targets"], doc["coverage"], doc["cancelled"]) == (
            "cancelled",
            len(codes),
            len(codes),
            1.0,
            0,
        )
        await wait_for(lambda: silent(done, codes), 30)
        assert all(s.behaviour.current is None for s in in_villages)
        assert not any((done.id, 1) in s.behaviour.finished for s in in_villages)  # cut short
        status = await client.request("status", id=done.id)
        assert (status["state"]["state"], status["state"]["acked"], status["state"]["coverage"]) == (
            "cancelled",
            len(codes),
            1.0,
        )

        for alert in (run, early, done):  # an alert that has ended cannot be cancelled again
            with pytest.raises(Refused) as refused:
                await daemon.runner.cancel(alert.id, "again")
            assert refused.value.code == "ended"
            answer = await client.request("cancel", id=alert.id)
            assert (answer["ok"], answer["error"]) == (False, "ended")
        assert [a.counts[Bucket.ACKED] for a in (run, early, done)] == [live, acked, len(codes)]


# -- 7. many alerts in a row: none is left waiting on one that is over ---------------------------
async def test_twelve_alerts_in_a_row_all_complete_and_nothing_waits_on_an_alert_that_is_over(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = _config(shipped_config, ack_timeout_s=5.0, max_attempts=4)
    serial = _serial_village(district, 4)
    villages = [serial, *_mqtt_villages(district, 7, 33, 66)]
    terminals = _terminals(villages)
    codes = [t.code for t in terminals]
    levels = [3, 3, 2, 3, 4, 3, 2, 3, 3, 4, 2, 3]  # a more urgent one now and then pre-empts the others
    stuck: set[str] = set()  # waiting with no live holder
    misreported: set[str] = set()  # reported waiting on an alert that is over on that terminal

    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, terminals, mosquitto.host, mosquitto.port) as fleet,
    ):

        def look() -> None:
            stuck.update(_waiting_on_what_is_over(daemon))
            misreported.update(_reported_waiting_on_what_is_over(daemon))

        await wait_online(daemon, len(terminals), 30)
        alerts: list[Alert] = []
        for i, level in enumerate(levels):
            if alerts:  # 0.6 s apart: 3 s for the default 1 s play time, scaled to 0.2 s
                await asyncio.sleep(0.6)
            request = _alert(villages, level=level, text=f"第{i + 1}次预警")
            alerts.append(await daemon.submit(request, source="cli", actor="ops"))
            look()

        def all_done() -> bool:
            look()
            return all(d.progress is Progress.DONE for a in alerts for d in a.deliveries.values())

        await wait_for(all_done, 90)  # every loudspeaker played every alert to the end
        assert not stuck, sorted(stuck)[:5]
        assert [a.state for a in alerts] == [AState.COMPLETED] * len(alerts)
        assert not daemon.core.holders.held()  # every terminal is free again
        for a in alerts:
            for c, d in a.deliveries.items():
                assert (d.state, d.acked, d.finished) == (DState.ACKNOWLEDGED, True, True), (a.id, c, d.cause)
            doc = a.state_doc(district, daemon.runner.clock())
            assert (doc["acked"], doc["targets"], doc["coverage"]) == (len(codes), len(codes), 1.0)
        plays = fleet.plays()
        for a in alerts:
            assert all(plays.get((c, a.id, 1), 0) >= 1 for c in codes), a.id
        for a in alerts:  # nothing outranks a level 2 alert: it is never interrupted, so never resumed
            if a.request.level == 2:
                assert all(s.behaviour.resumes[(a.id, 1)] == 0 for s in fleet.terminals), a.id
        listed = await ControlClient(tmp_path / SOCKET_NAME).request("list")
        assert [_listed(listed, a.id)["state"] for a in alerts] == ["completed"] * len(alerts)
        # while they queued, the report named for each waiting terminal the alert it really waited for
        pairs = {m.split(":", 1)[0] for m in misreported}
        assert not misreported, (
            f"{len(pairs)} (alert, terminal) pairs misreported, e.g. {sorted(misreported)[:3]}"
        )


# -- 8. equal alerts queue in order of acceptance, without retries --------------------------------
async def test_five_equal_alerts_complete_in_order_each_after_the_previous_played_out(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = _config(shipped_config, ack_timeout_s=30.0)  # generous: nothing is ever retried
    fleet_config = _playing(config, 1.0)  # longer than the 0.5 s between alerts: they queue everywhere
    serial = _serial_village(district, 6)
    villages = [serial, *_mqtt_villages(district, 11, 40, 77)]
    terminals = _terminals(villages)
    codes = [t.code for t in terminals]
    mqtt_codes = [t.code for t in terminals if t.link == "mqtt"]
    topics = Topics(district.code)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(fleet_config, district, terminals, mosquitto.host, mosquitto.port) as fleet,
        mqtt_client(mosquitto.host, mosquitto.port, f"{topics.prefix}/alerts/+") as (_client, seen),
    ):
        await wait_online(daemon, len(terminals), 30)
        commands_before = _commands(daemon, "terminal") + _commands(daemon, "group")
        alerts: list[Alert] = []
        for i in range(5):
            if alerts:
                await asyncio.sleep(0.5)
            alerts.append(
                await daemon.submit(
                    _alert(villages, level=2, text=f"第{i + 1}次通知"), source="cli", actor="ops"
                )
            )
        await wait_for(lambda: all(a.state is AState.COMPLETED for a in alerts), 60)
        await wait_for(
            lambda: all(d.progress is Progress.DONE for a in alerts for d in a.deliveries.values()), 60
        )

        ids = [a.id for a in alerts]
        await wait_for(
            lambda: {d["id"] for t, d in seen if d and d.get("state") == "completed"} >= set(ids), 10
        )
        completed: list[str] = []  # in the order the state topic announced them
        for _t, d in seen:
            if d and d.get("id") in ids and d.get("state") == "completed" and d["id"] not in completed:
                completed.append(d["id"])
        assert completed == ids

        for s in fleet.terminals:  # each loudspeaker played them one after the other, each to the end
            assert list(s.behaviour.plays) == [(a, 1) for a in ids], s.terminal.code
            assert all((a, 1) in s.behaviour.finished for a in ids), s.terminal.code
        for t in serial.terminals:
            assert [p.alert_id for p in _bus_of(fleet, t.code).terminals[t.code].plays] == ids, t.code
        await daemon.journal.flush()
        histories = [await daemon.journal.history(a) for a in ids]
        waited = {h.terminal for history in histories[1:] for h in history if h.state == "waiting"}
        assert waited & set(mqtt_codes), (
            "no MQTT terminal was busy when the next alert came: this proves nothing"
        )
        assert waited & {t.code for t in serial.terminals}
        for c in codes:  # the next one went out to a terminal only once it reported the previous done
            done_at = [
                min(
                    h.at
                    for h in history
                    if h.terminal == c and h.state == "acknowledged" and h.detail == "done"
                )
                for history in histories
            ]
            sent_at = [min(h.at for h in history if h.terminal == c and h.attempt) for history in histories]
            assert all(done_at[k] <= sent_at[k + 1] for k in range(len(ids) - 1)), c

        assert _retries(daemon, "mqtt") == 0
        assert _retries(daemon, "serial") == 0
        assert all(d.attempts == 1 for a in alerts for d in a.deliveries.values())
        commands = _commands(daemon, "terminal") + _commands(daemon, "group") - commands_before
        assert commands <= len(ids) * len(mqtt_codes)  # at most one command per alert and terminal
        assert not daemon.core.holders.held()
