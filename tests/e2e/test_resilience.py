"""Nothing lost: kill -9 of the daemon, broker restarts, flapping and returning terminals, stale wills."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.control.socket import SOCKET_NAME, ControlClient, NoDaemon
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.protocols.messages import Liveness, TerminalPresence
from ebcd.protocols.mqtt import codec as mqtt_codec
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from simulators.faults import Fault, plan
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for, wait_online

pytestmark = pytest.mark.slow


def _alert(target: str = "all") -> AlertRequest:
    return AlertRequest(
        level=1, event_type="11B03", targets=[parse_target(target)], text="山洪红色预警", ttl_s=600
    )


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ebcd", *args], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env
    )


async def _poll(
    client: ControlClient, op: str, pred: object, timeout_s: float, **args: object
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: dict[str, object] = {}
    while loop.time() < deadline:
        try:
            last = await client.request(op, **args)
            if last.get("ok") and pred(last):  # type: ignore[operator]
                return last
        except (NoDaemon, OSError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{op} never satisfied the condition; last answer: {str(last)[:300]}")


async def test_kill_9_mid_alert_resumes_and_every_terminal_plays_exactly_once(
    own_mosquitto: Mosquitto, shipped_config: Config, tmp_path: Path
) -> None:
    config_file = str(shipped_config.base_dir / "ebcd.toml")  # serial buses in this session's folder
    state = tmp_path / "state"
    sim_log = tmp_path / "simulate.log"
    sims = _spawn(
        [
            "simulate",
            "-c",
            config_file,
            "--broker",
            own_mosquitto.url,
            "--faults",
            "slow=50%",
            "--seed",
            "3",
            "--play-time",
            "0.2",
        ],
        sim_log,
    )
    run = ["run", "-c", config_file, "--broker", own_mosquitto.url, "--state-dir", str(state),
           "--metrics-port", "-1"]  # fmt: skip
    daemon = _spawn(run, tmp_path / "daemon1.log")
    client = ControlClient(state / SOCKET_NAME)
    try:
        await _poll(
            client, "terminals", lambda a: sum(t["state"] == "online" for t in a["terminals"]) == 769, 120
        )
        sent = await client.request("send", alert=_alert().model_dump(mode="json"))
        alert_id = sent["id"]
        half = await _poll(client, "status", lambda a: a["state"]["acked"] >= 300, 30, id=alert_id)
        await asyncio.sleep(0.3)  # what was acknowledged this long before the crash must be in the journal
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        acked_at_kill = half["state"]["acked"]  # type: ignore[index]
        assert acked_at_kill < 769, "the alert completed before the kill; the test proves nothing"

        daemon = _spawn(run, tmp_path / "daemon2.log")  # the same daemon, on the same journal
        done = await _poll(client, "status", lambda a: a["state"]["state"] == "completed", 60, id=alert_id)
        assert done["state"]["acked"] == 769  # type: ignore[index]
        recovered = [
            json.loads(line)
            for line in (tmp_path / "daemon2.log").read_text().splitlines()
            if '"alert.recovered"' in line
        ]
        assert recovered
        assert recovered[0]["alert_id"] == alert_id
        assert acked_at_kill <= recovered[0]["acked"] < 769
    finally:
        for p in (daemon, sims):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (daemon, sims):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGUSR2)  # its tasks go to its log, for whoever reads this failure
                await asyncio.sleep(0.5)
                p.send_signal(signal.SIGUSR1)  # and its threads' stacks
                p.wait(2) if p.poll() is not None else None
                p.kill()
                raise
    plays = collections.Counter()
    for line in sim_log.read_text().splitlines():
        if '"terminal.played"' in line or '"sim.play"' in line:  # MQTT terminals, serial buses
            event = json.loads(line)
            plays[(event["terminal"], event["alert_id"])] += 1
    assert len(plays) == 769
    assert set(plays.values()) == {1}


async def test_broker_restart_during_fan_out_still_completes(
    own_mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    async with (
        running_daemon(config, district, own_mosquitto.url, tmp_path) as daemon,
        running_fleet(config, district, list(district.terminals()), own_mosquitto.host, own_mosquitto.port),
    ):
        await wait_online(daemon, 769)
        run = await daemon.submit(_alert(), source="test", actor="pytest")
        own_mosquitto.stop()
        # the daemon notices (on a loaded machine, its loop may take a while to read the close)
        await wait_for(lambda: not daemon.link.connected.is_set(), 30)
        await asyncio.sleep(3)  # the outage itself: several seconds without a broker
        own_mosquitto.start()
        state = await settle(daemon, run.id, timeout_s=90)
        if state["state"] != "completed":
            await wait_for(lambda: run.state.value == "completed", 60)
        assert run.counts["acked"] == 769
        assert daemon.link.connects >= 2


async def test_flapping_terminals_end_with_exact_coverage(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(
        shipped_config, ack_timeout_s=1.0, max_attempts=6, retry_initial_s=0.5, retry_max_s=2.0
    )
    faults = plan([t.code for t in district.terminals()], "flap=10%", seed=5)
    flappers = set(faults.terminals(Fault.FLAP))
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        running_fleet(
            config, district, list(district.terminals()), mosquitto.host, mosquitto.port, faults
        ) as fleet,
    ):
        await wait_online(daemon, 769)
        runs = []
        for _ in range(3):
            runs.append(await daemon.submit(_alert(), source="test", actor="pytest"))
            await asyncio.sleep(1.7)
        for run in runs:
            await wait_for(lambda run=run: run.state.value == "completed", 90)
            state = run.state_doc(district, daemon.runner.clock())
            assert (state["acked"], state["targets"], state["coverage"]) == (769, 769, 1.0)
            assert sum(t["acked"] for t in state["towns"].values()) == 769
        plays = fleet.plays()
        assert all(n == 1 for n in plays.values()), {k: n for k, n in plays.items() if n != 1}
        assert {code for (code, a, _r) in plays if a == runs[0].id} >= flappers


async def test_terminal_offline_at_send_gets_the_alert_when_it_returns(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config, ack_timeout_s=0.5, max_attempts=2, retry_initial_s=0.2)
    village = next(district.villages())
    late, present = village.terminals[0], village.terminals[1:]
    async with running_daemon(config, district, mosquitto.url, tmp_path) as daemon:  # noqa: SIM117  (the fleet ends, the daemon goes on)
        async with running_fleet(config, district, present, mosquitto.host, mosquitto.port):
            await wait_online(daemon, len(present))
            run = await daemon.submit(_alert(f"village:{village.code}"), source="test", actor="pytest")
            state = await settle(daemon, run.id)
            assert state["state"] == "partial"
            assert run.deliveries[late.code].state.value == "uncertain"
            async with running_fleet(config, district, [late], mosquitto.host, mosquitto.port) as comeback:
                await wait_for(lambda: run.state.value == "completed", 20)
                assert comeback.plays() == {(late.code, run.id, 1): 1}
            assert run.counts["acked"] == len(village.terminals)


async def test_a_stale_last_will_does_not_mark_a_live_terminal_offline(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    config = fast_config(shipped_config)
    terminal = next(district.terminals())
    topics = Topics(district.code)
    topic = topics.presence(terminal.code)

    def presence(state: Liveness, session: int) -> bytes:
        return mqtt_codec.encode_presence(TerminalPresence(terminal.code, state, session))

    async with (
        running_daemon(config, district, mosquitto.url, tmp_path) as daemon,
        mqtt_client(mosquitto.host, mosquitto.port) as (client, _seen),
    ):
        live = daemon.core.liveness.terminals[terminal.code]
        assert live.state == "unknown"  # nothing is online before it says so
        await client.publish(topic, presence(Liveness.ONLINE, 7), qos=1)
        await wait_for(lambda: live.state == "online" and live.session == 7, 5)
        await client.publish(topic, presence(Liveness.OFFLINE, 6), qos=1)  # the will of the old session
        await client.publish(topic, presence(Liveness.ONLINE, 7), qos=1)  # a marker behind it
        await asyncio.sleep(0.3)
        assert (live.state, live.session) == ("online", 7)
        await client.publish(topic, presence(Liveness.OFFLINE, 7), qos=1)  # the current session's will
        await wait_for(lambda: live.state == "offline", 5)
