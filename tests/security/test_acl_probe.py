"""The start-up probe: may an anonymous client publish on a terminal's report topic? Asked of real
Mosquitto brokers: an open one, the shipped config and ACL, and the shipped ACL with anonymous
logins allowed (refused by MQTT 5 PUBACK reason 0x87, and on MQTT 3.1.1 by the subscriber-side
check)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ebcd.protocols.messages import AckStatus
from ebcd.protocols.mqtt import codec
from ebcd.protocols.mqtt.codec import Topics
from ebcd.protocols.mqtt.link import ProbeAnswer, probe_publish
from ebcd.security.acl_probe import (
    ACL_PROBE_ALERT_ID,
    AclProbeError,
    anonymous_can_publish_reports,
    is_acl_probe,
    probe_report_acl,
)
from tests.conftest import Mosquitto, free_port, make_mosquitto
from tests.deploy.test_mosquitto_acl import DISTRICT, MOSQUITTO, T1, broker_config, need
from tests.helpers import mqtt_client, wait_for

QUICK_S = 1.0  # how long the 3.1.1 check waits for its publish to come back


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto with the shipped conf.d/ebcd.conf and ACL (allow_anonymous false)."""
    passwd = tmp_path / "ebcd.passwd"
    made = subprocess.run(
        [need("mosquitto_passwd"), "-c", "-b", str(passwd), "ebcd", "not-the-probe's"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    server = Mosquitto("127.0.0.1", port, broker_config(tmp_path, port, passwd), tmp_path / "mosquitto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def acl_only_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """Anonymous logins allowed, but the shipped ACL: nobody without a user name may write reports."""
    acl = tmp_path / "ebcd.acl"
    shutil.copy(MOSQUITTO / "ebcd.acl", acl)
    # Mosquitto started as root drops to the user mosquitto: it must reach the ACL (as broker_config does)
    for path in (tmp_path, *tmp_path.parents) if os.geteuid() == 0 else ():
        if path == Path("/tmp") or path == path.parent:
            break
        path.chmod(path.stat().st_mode | 0o011)
    server = make_mosquitto(tmp_path, extra=f"acl_file {acl}\n")
    server.start()
    yield server
    server.stop()


def mqtt311(*args: Any, **kwargs: Any) -> Any:
    """link.probe_publish as with a broker that does not speak MQTT 5."""
    return probe_publish(*args, **{**kwargs, "protocol": "3.1.1", "timeout_s": QUICK_S})


async def test_an_open_broker_lets_anyone_publish_reports(mosquitto: Mosquitto) -> None:
    topics = Topics(DISTRICT)
    async with mqtt_client(mosquitto.host, mosquitto.port, topics.report(T1)) as (_, seen):
        assert await anonymous_can_publish_reports(mosquitto.host, mosquitto.port, None, DISTRICT, T1)
        await wait_for(lambda: seen, 5)
    # what ebcd hears of it: a report it recognises as the probe's, for no alert of its own
    (topic, body), *_ = seen
    assert topic == topics.report(T1)
    heard = codec.decode_report(T1, json.dumps(body).encode())
    assert is_acl_probe(heard)
    assert (heard.alert_id, heard.revision, heard.status) == (ACL_PROBE_ALERT_ID, 0, AckStatus.RECEIVED)


async def test_an_open_broker_is_found_open_over_mqtt311_too(mosquitto: Mosquitto) -> None:
    result = await probe_report_acl(mosquitto.host, mosquitto.port, None, DISTRICT, T1, publish=mqtt311)
    assert result.open
    assert result.protocol == "3.1.1"
    assert "came back" in result.evidence


async def test_the_shipped_config_refuses_the_anonymous_probe(shipped_broker: Mosquitto) -> None:
    host, port = shipped_broker.host, shipped_broker.port
    assert not await anonymous_can_publish_reports(host, port, None, DISTRICT, T1)
    result = await probe_report_acl(host, port, None, DISTRICT, T1)
    assert result.protocol == "5"
    assert "anonymous login refused" in result.evidence
    over_311 = await probe_report_acl(host, port, None, DISTRICT, T1, publish=mqtt311)
    assert not over_311.open
    assert "anonymous login refused" in over_311.evidence


async def test_the_shipped_acl_refuses_anonymous_reports_even_when_anonymous_may_log_in(
    acl_only_broker: Mosquitto,
) -> None:
    host, port = acl_only_broker.host, acl_only_broker.port
    result = await probe_report_acl(host, port, None, DISTRICT, T1)
    assert not result.open
    assert result.protocol == "5"
    assert "PUBACK reason 0x87" in result.evidence
    # MQTT 3.1.1 acknowledges a refused publish as any other: the subscriber-side check decides
    over_311 = await probe_report_acl(host, port, None, DISTRICT, T1, publish=mqtt311)
    assert not over_311.open
    assert "did not come back" in over_311.evidence


async def test_the_probe_answer_of_the_link(acl_only_broker: Mosquitto, mosquitto: Mosquitto) -> None:
    topic, payload = Topics(DISTRICT).report(T1), b'{"alert":"acl-probe","rev":0,"status":"received"}'
    refused = await probe_publish(acl_only_broker.host, acl_only_broker.port, topic=topic, payload=payload)
    assert refused == ProbeAnswer("5", puback_reason=0x87, detail="PUBACK reason 0x87")
    accepted = await probe_publish(mosquitto.host, mosquitto.port, topic=topic, payload=payload)
    assert accepted.echoed
    assert accepted.puback_reason is not None
    assert accepted.puback_reason < 0x80


async def test_no_broker_is_an_error_not_a_verdict() -> None:
    with pytest.raises(AclProbeError, match="cannot probe the broker"):
        await anonymous_can_publish_reports("127.0.0.1", free_port(), None, DISTRICT, T1, timeout_s=2.0)
