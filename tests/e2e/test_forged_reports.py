"""Forged terminal traffic through a real broker that lets anyone publish (no ACL), with terminal keys.

The daemon knows every terminal's public key (`[security] terminal_keys_dir`); the simulated
terminals sign with theirs (`[simulator] terminal_keys_dir`), as `ebcd simulate` does. A forger
is a plain MQTT client on the same broker: it claims `done` for terminals that never heard the
alert, unsigned and signed with a key of its own, refuses on behalf of terminals that played, and
announces a live terminal offline with a session far ahead. None of it moves the alert or the
terminal, and every forged message is counted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ebcd.config import Config
from ebcd.daemon.daemon import Daemon
from ebcd.delivery.liveness import Live
from ebcd.protocols.messages import AckStatus, Liveness, TerminalPresence, TerminalReport
from ebcd.protocols.mqtt import codec
from ebcd.protocols.mqtt.codec import Topics
from ebcd.security.reports import generate_terminal_keys, load_terminal_signers, sign_presence, sign_report
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for


def _unexpected(daemon: Daemon, kind: str) -> float:
    value = daemon.metrics.registry.get_sample_value("ebcd_unexpected_messages_total", {"kind": kind})
    return value or 0.0


async def test_forged_reports_and_presence_are_dropped_and_counted_when_terminals_sign(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    village = next(v for v in district.villages() if v.link == "mqtt" and len(v.terminals) >= 4)
    codes = [t.code for t in village.terminals]
    public, private = generate_terminal_keys(tmp_path / "keys", codes, "ed25519", 1)
    _, other_private = generate_terminal_keys(tmp_path / "forger", codes, "ed25519", 2)
    forger_keys = load_terminal_signers(other_private, codes)
    base = fast_config(shipped_config)
    config = base.model_copy(
        update={
            "security": base.security.model_copy(update={"terminal_keys_dir": str(public)}),
            "simulator": base.simulator.model_copy(update={"terminal_keys_dir": str(private)}),
        }
    )
    absent = village.terminals[:2]  # never connected: they cannot have played anything
    present = village.terminals[2:]
    victim = present[0]
    topics = Topics(district.code)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path / "state") as daemon,
        running_fleet(config, district, present, mosquitto.host, mosquitto.port),
        mqtt_client(mosquitto.host, mosquitto.port) as (forger, _seen),
    ):
        await wait_for(lambda: daemon.core.liveness.state(victim.code) is Live.ONLINE, 30)
        offline = TerminalPresence(victim.code, Liveness.OFFLINE, session=1_000_000_000_000)
        await forger.publish(topics.presence(victim.code), codec.encode_presence(offline), qos=1)
        signed_offline = dataclasses.replace(
            offline, signature=sign_presence(forger_keys[victim.code], offline, now=time.time())
        )
        await forger.publish(topics.presence(victim.code), codec.encode_presence(signed_offline), qos=1)
        await wait_for(lambda: _unexpected(daemon, "unverified_presence") >= 2, 20)
        assert daemon.core.liveness.state(victim.code) is Live.ONLINE

        alert = {
            "identifier": "forged-1",
            "sender": "s",
            "level": 2,
            "event_type": "11B03",
            "targets": [f"village:{village.code}"],
            "text": "暴雨橙色预警",
        }
        await forger.publish(topics.alerts_in, json.dumps(alert), qos=1)
        await wait_for(lambda: len(daemon.runner.alerts) == 1, 20)
        (run,) = daemon.runner.alerts.values()
        for t in absent:  # "done" for terminals that never heard it, unsigned and with the forger's key
            done = TerminalReport(t.code, run.id, 1, AckStatus.DONE, None, 1)
            await forger.publish(topics.report(t.code), codec.encode_report(done), qos=1)
            forged = dataclasses.replace(
                done, signature=sign_report(forger_keys[t.code], done, now=time.time())
            )
            await forger.publish(topics.report(t.code), codec.encode_report(forged), qos=1)
        await wait_for(lambda: _unexpected(daemon, "unverified_report") >= 2 * len(absent), 20)

        state = await settle(daemon, run.id, timeout_s=120)
        assert state["state"] == "partial"
        assert (state["acked"], state["targets"]) == (len(present), len(codes))
        assert all(run.deliveries[t.code].bucket.value != "acked" for t in absent)

        before = _unexpected(daemon, "unverified_report")
        for t in present:  # refusals on behalf of terminals that played it
            refusal = TerminalReport(t.code, run.id, 1, AckStatus.REFUSED, "busy", 2)
            await forger.publish(topics.report(t.code), codec.encode_report(refusal), qos=1)
        await wait_for(lambda: _unexpected(daemon, "unverified_report") >= before + len(present), 20)
        daemon.runner.flush_states()
        after = run.state_doc(daemon.district, daemon.runner.clock())
        assert (after["acked"], after["coverage"]) == (state["acked"], state["coverage"])
        assert daemon.core.liveness.state(victim.code) is Live.ONLINE
