"""Real CAP feeds through a real broker and daemon: EDXL-DE envelopes judged part by part, signed
alerts pretty-printed after signing, and Updates that end an alert."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lxml import etree  # type: ignore[import-untyped]

from ebcd.config import Config, IngestConfig, UpstreamConfig, UpstreamSender
from ebcd.daemon.daemon import Daemon
from ebcd.journal.journal import Received
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, wait_for
from tests.ingest.cap_docs import alert, area, envelope, info
from tests.ingest.large_docs import audio_alert
from tests.ingest.test_xmldsig import EC_CERT, EC_KEY, cert_pem, sign

pytestmark = pytest.mark.slow

SENDER = "ews@example.gov.cn"
TOWN_AREA = "341523101000"
EMPTY = "<contentObject><xmlContent><embeddedXMLContent/></xmlContent></contentObject>"


def cap(identifier: str, *, sender: str = SENDER, expires_in_s: float = 1800, **fields: Any) -> bytes:
    now = datetime.now(UTC).replace(microsecond=0)
    return alert(
        identifier=identifier,
        sender=sender,
        sent=now.isoformat(),
        infos=[
            info(
                expires=(now + timedelta(seconds=expires_in_s)).isoformat(),
                areas=[area(geocodes=[("AreaCode", TOWN_AREA)])],
            )
        ],
        **fields,
    )


async def verdict(daemon: Daemon, payload: bytes) -> Received:
    """The journal's row for `payload`, once it has a verdict."""
    for _ in range(200):
        for row in await daemon.journal.list_received(20):
            if row.payload == payload and row.outcome is not None:
                return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"no verdict on {payload[:60]!r}")


@pytest.fixture
async def daemon(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> AsyncIterator[tuple[Daemon, Any, list[tuple[str, Any]]]]:
    topics = Topics(district.code)
    async with (
        running_daemon(fast_config(shipped_config), district, mosquitto.url, tmp_path / "state") as d,
        mqtt_client(mosquitto.host, mosquitto.port, topics.rejected) as (client, seen),
    ):
        yield d, client, seen


async def test_an_envelopes_valid_alerts_are_accepted_beside_its_empty_and_invalid_ones(
    daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    d, client, seen = daemon
    good = cap("ENV-GOOD-1")
    expired = cap("ENV-OLD-1", expires_in_s=-60)
    broken = cap("ENV-BROKEN-1").replace(b"<scope>Public</scope>", b"")
    also_good = cap("ENV-GOOD-2")
    payload = envelope(good, EMPTY, expired, broken, also_good, distribution_id="EDXL-MIX-1")
    await client.publish(d.topics.alerts_in, payload, qos=1)
    row = await verdict(d, payload)

    accepted = {a.request.identifier: a.id for a in d.runner.alerts.values()}
    assert set(accepted) == {"ENV-GOOD-1", "ENV-GOOD-2"}
    assert row.outcome == "partial"
    assert row.alert_id == f"{accepted['ENV-GOOD-1']},{accepted['ENV-GOOD-2']}"
    assert row.detail is not None
    assert row.detail.startswith("EDXL-DE 'EDXL-MIX-1', 5 part(s): ")
    for said in (
        f"contentObject[0]/xmlContent/embeddedXMLContent[0] accepted alert as {accepted['ENV-GOOD-1']}",
        "contentObject[1]/xmlContent/embeddedXMLContent[0] rejected schema: is empty",
        "contentObject[2]/xmlContent/embeddedXMLContent[0] rejected expired:",
        "contentObject[3]/xmlContent/embeddedXMLContent[0] rejected schema: alert: missing required <scope>",
        f"contentObject[4]/xmlContent/embeddedXMLContent[0] accepted alert as {accepted['ENV-GOOD-2']}",
    ):
        assert said in row.detail

    await wait_for(lambda: len([t for t, _ in seen if t == d.topics.rejected]) == 3, 10)
    rejected = [doc for t, doc in seen if t == d.topics.rejected]
    assert [r["reason"] for r in rejected] == ["schema", "expired", "schema"]
    assert [r["identifier"] for r in rejected] == [None, "ENV-OLD-1", "ENV-BROKEN-1"]
    assert [r["envelope"]["part"] for r in rejected] == [1, 2, 3]
    assert all(r["envelope"]["distribution_id"] == "EDXL-MIX-1" for r in rejected)
    assert all(r["envelope"]["parts"] == 5 for r in rejected)
    assert rejected[0]["detail"] == "EDXL-DE contentObject[1]/xmlContent/embeddedXMLContent[0]: is empty"
    assert rejected[0]["envelope"]["sha256"] is None
    assert rejected[1]["envelope"]["sha256"] is not None


async def test_an_envelope_of_nothing_but_refusals_is_rejected_and_a_repeat_plays_nothing(
    daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    d, client, _seen = daemon
    good = envelope(cap("ENV-ONCE-1"), distribution_id="EDXL-ONCE-1")
    bad = envelope(EMPTY, distribution_id="EDXL-EMPTY-1")
    await client.publish(d.topics.alerts_in, good, qos=1)
    assert (await verdict(d, good)).outcome == "accepted"
    await client.publish(d.topics.alerts_in, bad, qos=1)
    assert (await verdict(d, bad)).outcome == "rejected"
    again = good.replace(b"EDXL-ONCE-1", b"EDXL-ONCE-2")  # the same alert in a new envelope
    await client.publish(d.topics.alerts_in, again, qos=1)
    row = await verdict(d, again)
    assert row.outcome == "rejected"
    assert "rejected duplicate" in (row.detail or "")
    assert len(d.runner.alerts) == 1


async def test_a_pretty_printed_ecdsa_signed_alert_is_accepted_only_from_a_tolerant_sender(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    (tmp_path / "ec.pem").write_bytes(cert_pem(EC_CERT))
    outcomes = []
    for tolerant in (False, True):
        root = etree.fromstring(sign(cap(f"PRETTY-{tolerant}"), EC_KEY, EC_CERT, algorithm="ecdsa-sha256"))
        etree.indent(root)
        pretty = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
        sender = UpstreamSender(
            sender=SENDER, signed_by=[str(tmp_path / "ec.pem")], whitespace_tolerant=tolerant
        )
        config = fast_config(shipped_config).model_copy(update={"upstream": UpstreamConfig(senders=[sender])})
        async with running_daemon(config, district, mosquitto.url, tmp_path / f"state-{tolerant}") as d:
            async with mqtt_client(mosquitto.host, mosquitto.port) as (client, _seen):
                await client.publish(d.topics.alerts_in, pretty, qos=1)
                row = await verdict(d, pretty)
            outcomes.append((row.outcome, (row.detail or "").split(":")[0]))
    assert outcomes == [("rejected", "bad_signature"), ("accepted", "alert")]


def ending_update(identifier: str, references: str, *, sender: str = SENDER) -> bytes:
    """A tsunami centre's last word: msgType Update, urgency Past, expires = sent."""
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    return alert(
        identifier=identifier,
        sender=sender,
        sent=now.isoformat(),
        msg_type="Update",
        references=references,
        infos=[info(urgency="Past", expires=now.isoformat(), headline="警报解除", areas=[area()])],
    )


async def test_an_update_whose_expires_has_passed_ends_the_alert_it_references(
    daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    d, client, seen = daemon
    tsunami = "http://wcatwc.example.gov/tsuPortal/"
    first = cap("PAAQ-1-end", sender=tsunami)
    await client.publish(d.topics.alerts_in, first, qos=1)
    assert (await verdict(d, first)).outcome == "accepted"
    (warning,) = d.runner.alerts.values()
    # the centre names itself by its office code in <references>, by a URL in <sender>
    end = ending_update("PAAQ-2-end", "PAAQ,PAAQ-1-end,2024-01-01T00:00:00-00:00", sender=tsunami)
    await client.publish(d.topics.alerts_in, end, qos=1)
    row = await verdict(d, end)
    assert (row.outcome, row.detail, row.alert_id) == ("accepted", "update-ends", warning.id)
    assert warning.state.value == "cancelled"
    assert "ended by Update PAAQ-2-end" in (warning.reason or "")
    assert len(d.runner.alerts) == 1  # nothing new was sent

    # once ended, the same Update again is a duplicate; a fresh one finds nothing active to end
    await client.publish(d.topics.alerts_in, end, qos=1)
    later = ending_update("PAAQ-3-end", f"{tsunami},PAAQ-1-end,2024-01-01T00:00:00-00:00", sender=tsunami)
    await client.publish(d.topics.alerts_in, later, qos=1)
    await wait_for(lambda: len([t for t, _ in seen if t == d.topics.rejected]) == 2, 10)
    rejected = [doc for t, doc in seen if t == d.topics.rejected]
    assert [r["reason"] for r in rejected] == ["duplicate", "expired"]
    assert (
        "references no active alert of 'http://wcatwc.example.gov/tsuPortal/' to end" in rejected[1]["detail"]
    )


async def test_an_expired_update_never_ends_another_senders_alert(
    daemon: tuple[Daemon, Any, list[tuple[str, Any]]],
) -> None:
    d, client, _seen = daemon
    first = cap("OWN-1")
    await client.publish(d.topics.alerts_in, first, qos=1)
    assert (await verdict(d, first)).outcome == "accepted"
    (warning,) = d.runner.alerts.values()
    forged = ending_update("OTHER-2", f"{SENDER},OWN-1,2024-01-01T00:00:00+08:00", sender="other@example.com")
    await client.publish(d.topics.alerts_in, forged, qos=1)
    row = await verdict(d, forged)
    assert row.outcome == "rejected"
    assert (row.detail or "").startswith("expired: info[0]/expires:")
    assert "references no active alert of 'other@example.com' to end" in (row.detail or "")
    assert warning.state.value != "cancelled"


CN = Path(__file__).resolve().parents[1] / "fixtures" / "cap-cn"
_CST_TIME = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\+08:00")


def cn_fixture(name: str, delta: timedelta) -> bytes:
    """A hand-made Chinese fixture with every +08:00 time moved by `delta`."""

    def move(match: re.Match[bytes]) -> bytes:
        when = datetime.fromisoformat(match.group(0).decode()) + delta
        return when.isoformat().encode()

    return _CST_TIME.sub(move, (CN / name).read_bytes())


async def test_a_chinese_feeds_alert_update_and_cancel_act_on_one_alert(
    daemon: tuple[Daemon, Any, list[tuple[str, Any]]], district: District
) -> None:
    d, client, _seen = daemon
    first_sent = datetime.fromisoformat("2024-07-01T08:00:00+08:00")
    delta = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1) - first_sent
    county = cn_fixture("cn-county-rainstorm-red-zh-en.xml", delta)
    await client.publish(d.topics.alerts_in, county, qos=1)
    assert (await verdict(d, county)).outcome == "accepted"
    (warning,) = d.runner.alerts.values()
    assert (warning.request.identifier, warning.targets) == ("34152341600000_20240701080000", len(district))

    update = cn_fixture("cn-village-flood-update-zh-en.xml", delta - timedelta(hours=2))  # sent now
    await client.publish(d.topics.alerts_in, update, qos=1)
    row = await verdict(d, update)
    assert (row.outcome, row.alert_id) == ("accepted", warning.id)
    assert (warning.revision, warning.request.event_type) == (2, "11A01")
    assert warning.request.text.startswith("暴雨预警调整：桥畈村、石岗村洪水橙色预警")

    cancel = cn_fixture("cn-cancel.xml", delta - timedelta(hours=10))
    await client.publish(d.topics.alerts_in, cancel, qos=1)
    assert (await verdict(d, cancel)).outcome == "accepted"
    assert warning.state.value == "cancelled"
    assert len(d.runner.alerts) == 1


async def test_a_500_kb_alert_is_accepted_and_the_configured_limit_refuses_it(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    document = (
        audio_alert(500_000)
        .replace(b"2024-07-01T08:00:00+08:00", now.isoformat().encode())
        .replace(b"2024-07-01T20:00:00+08:00", (now + timedelta(hours=1)).isoformat().encode())
    )
    outcomes = []
    for limit in (None, 256 * 1024):
        config = fast_config(shipped_config)
        if limit is not None:
            config = config.model_copy(update={"ingest": IngestConfig(max_payload_bytes=limit)})
        async with (
            running_daemon(config, district, mosquitto.url, tmp_path / f"state-{limit}") as d,
            mqtt_client(mosquitto.host, mosquitto.port) as (client, _seen),
        ):
            await client.publish(d.topics.alerts_in, document, qos=1)
            row = await verdict(d, document)
            outcomes.append((row.outcome, (row.detail or "")[:90]))
    assert outcomes == [
        ("accepted", "alert"),
        ("rejected", f"too_large: payload of {len(document)} bytes exceeds {256 * 1024} bytes"),
    ]
