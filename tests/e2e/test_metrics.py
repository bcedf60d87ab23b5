"""The Prometheus endpoint after real alerts: every metric of the contract, values that match, promtool.

The daemon runs in-process on a free metrics port, with the simulated terminals of two villages;
two alerts reach them (one from the CLI's control path, one as JSON over MQTT) and one malformed
payload is published on the ingest topic. The scrape must parse, name every metric of
CONTRACT.md and README, count exactly what happened, and pass `promtool check metrics`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ebcd import __version__
from ebcd.config import Config, load_config, shipped_config_path
from ebcd.daemon.daemon import Daemon
from ebcd.ingest import Reason
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.model.events import TEST_EVENT
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District
from ebcd.tiers.loader import load_district
from tests.conftest import Mosquitto, fast_config
from tests.helpers import mqtt_client, running_daemon, running_fleet, settle, wait_for, wait_online

TOWN = "53415231010000314010101"  # 杭埠镇: MQTT villages
SWEEP_TIMEOUT_S = 20.0  # the daemon refreshes ebcd_terminals every 5 s

# name -> Prometheus type; CONTRACT.md's metrics first, then the rest of README's list
CONTRACT = {
    "ebcd_alerts_total": "counter",
    "ebcd_deliveries_total": "counter",
    "ebcd_delivery_latency_seconds": "histogram",
    "ebcd_terminals": "gauge",
    "ebcd_rejected_messages_total": "counter",
    "ebcd_dropped_messages_total": "counter",
    "ebcd_mqtt_connected": "gauge",
}
README = {
    "ebcd_alerts_in_state": "gauge",
    "ebcd_delivery_retries_total": "counter",
    "ebcd_commands_published_total": "counter",
    "ebcd_unexpected_messages_total": "counter",
    "ebcd_mqtt_connects_total": "counter",
    "ebcd_queue_depth": "gauge",
    "ebcd_journal_commit_seconds": "histogram",
    "ebcd_build_info": "gauge",  # an Info: a gauge of value 1 in the text format
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Scrape:
    """One scrape of /metrics after the scenario, with what the scenario did."""

    text: str
    alert_ids: list[str]
    acked: int  # deliveries acknowledged, over both alerts (one village each)
    online: int  # simulated terminals
    terminal_codes: set[str]

    @property
    def samples(self) -> Samples:
        out: Samples = {}
        for family in text_string_to_metric_families(self.text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when absent (a labelled counter never incremented has no sample)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        """The sum over every label set of a sample name."""
        return sum(v for (n, _), v in self.samples.items() if n == name)


def own_district(config: Config) -> District:
    """The shipped district, loaded afresh, without serial ports: no serial bus masters start.

    So this daemon never opens the ptys of a serial simulator another test may have at /tmp/ebcd-sim.
    """
    district = load_district(config)
    for village in district.villages():
        village.port = None
    return district


def _get(port: int) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


async def scrape(daemon: Daemon) -> str:
    """GET /metrics from the daemon's HTTP server (in a thread: the server is the daemon's)."""
    assert daemon.bound_metrics_port, "the daemon serves no metrics"
    status, content_type, body = await asyncio.to_thread(_get, daemon.bound_metrics_port)
    assert status == 200
    assert content_type.startswith("text/plain")
    return body


def _gauge_online(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ebcd_terminals" and s.labels == {"state": "online"}:
                return s.value
    return -1.0


@asynccontextmanager
async def scenario(mosquitto: Mosquitto, tmp_path: Path) -> AsyncIterator[Scrape]:
    """Daemon, two villages' terminals, two alerts and one malformed payload; then a scrape."""
    config = fast_config(load_config(shipped_config_path()))
    district = own_district(config)
    villages = list(district.towns[TOWN].villages.values())[:2]
    terminals = [t for v in villages for t in v.terminals]
    topics = Topics(district.code)
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path / "state", metrics_port=0) as daemon,
        running_fleet(config, district, terminals, mosquitto.host, mosquitto.port),
        mqtt_client(mosquitto.host, mosquitto.port, topics.rejected, f"{topics.prefix}/alerts/+") as (
            client,
            seen,
        ),
    ):
        await wait_online(daemon, len(terminals))
        # One alert a village, so neither pre-empts the other on a terminal.
        request = AlertRequest.model_validate(
            {
                "level": 4,
                "event_type": TEST_EVENT,
                "targets": [parse_target(f"village:{villages[0].code}")],
                "text": "例行测试",
                "test": True,
            }
        )
        by_cli = await daemon.submit(request, source="cli", actor="pytest")
        first = await settle(daemon, by_cli.id, until="completed")

        upstream = {
            "identifier": "metrics-test-1",
            "sender": "city-ews",
            "level": 2,
            "event_type": "11B03",
            "targets": [f"village:{villages[1].code}"],
            "text": "暴雨橙色预警",
        }
        await client.publish(topics.alerts_in, json.dumps(upstream).encode(), qos=1)
        await wait_for(lambda: len(daemon.runner.alerts) == 2, 10)
        by_mqtt = next(r for r in daemon.runner.alerts.values() if r.id != by_cli.id)
        second = await settle(daemon, by_mqtt.id, until="completed")

        await client.publish(topics.alerts_in, b'{"identifier": "broken", "level": 2,', qos=1)
        await wait_for(
            lambda: any(t == topics.rejected and d and d["reason"] == "malformed_json" for t, d in seen), 10
        )

        text = await scrape(daemon)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SWEEP_TIMEOUT_S
        while _gauge_online(text) != len(terminals) and loop.time() < deadline:
            await asyncio.sleep(0.5)  # polling: the liveness sweep sets the gauge every 5 s
            text = await scrape(daemon)
        yield Scrape(
            text,
            [by_cli.id, by_mqtt.id],
            first["acked"] + second["acked"],
            len(terminals),
            {t.code for t in district.terminals()},
        )


async def test_metrics_count_exactly_what_happened(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with scenario(mosquitto, tmp_path) as s:
        families = {f.name: f.type for f in text_string_to_metric_families(s.text)}
        for name, kind in {**CONTRACT, **README}.items():
            family = name.removesuffix("_total") if kind == "counter" else name
            assert family in families, f"{name} is not exported"
            assert families[family] == kind, name

        assert s.acked == s.online, "the alerts should have reached every simulated terminal"
        assert s.value("ebcd_deliveries_total", outcome="acked", transport="mqtt") == s.acked
        for outcome in ("refused", "uncertain", "expired", "cancelled"):
            assert s.value("ebcd_deliveries_total", outcome=outcome, transport="mqtt") == 0, outcome

        assert s.total("ebcd_alerts_total") == 2
        assert s.value("ebcd_alerts_total", level="4", source="cli") == 1
        assert s.value("ebcd_alerts_total", level="2", source="mqtt") == 1

        assert s.value("ebcd_delivery_latency_seconds_count") == s.acked
        assert s.value("ebcd_delivery_latency_seconds_bucket", le="+Inf") == s.acked
        assert s.value("ebcd_delivery_latency_seconds_sum") > 0

        assert s.value("ebcd_terminals", state="online") == s.online
        assert s.value("ebcd_terminals", state="unknown") == len(s.terminal_codes) - s.online
        assert s.value("ebcd_terminals", state="offline") == 0

        assert s.value("ebcd_mqtt_connected") == 1
        assert s.value("ebcd_mqtt_connects_total") >= 1
        assert s.value("ebcd_rejected_messages_total", reason="malformed_json") == 1
        assert s.total("ebcd_rejected_messages_total") == 1
        assert s.total("ebcd_dropped_messages_total") == 0
        assert s.value("ebcd_commands_published_total", addressing="group") >= 2
        assert s.value("ebcd_build_info", version=__version__) == 1

        # Bounded series: no label carries an alert id or a terminal code.
        labels = {v for (_, ls) in s.samples for _, v in ls}
        assert not labels & set(s.alert_ids)
        assert not labels & s.terminal_codes


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (bash .ci/run does it)")
    return found


async def test_scrape_passes_promtool_check_metrics(mosquitto: Mosquitto, tmp_path: Path) -> None:
    promtool = _promtool()
    async with scenario(mosquitto, tmp_path) as s:
        assert list(text_string_to_metric_families(s.text))
        done = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=s.text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    problems = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, f"promtool check metrics:\n{problems}"
    assert problems == "", f"promtool check metrics:\n{problems}"
    assert re.search(r"(?m)^ebcd_mqtt_connected 1\.0$", s.text)


async def test_every_known_label_value_is_a_series_at_zero_before_anything_happens(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    """Rules and dashboards see a 0 for every refusal reason, delivery outcome and drop before the first."""
    async with running_daemon(shipped_config, district, mosquitto.url, tmp_path, metrics_port=0) as daemon:
        text = await scrape(daemon)
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def zero(name: str, **labels: str) -> bool:
        return samples.get((name, frozenset(labels.items()))) == 0.0

    missing = [r.value for r in Reason if not zero("ebcd_rejected_messages_total", reason=r.value)]
    assert not missing, f"no zero series for refusal reasons {missing}"
    for transport in ("mqtt", "serial", "adapter"):
        for outcome in ("acked", "refused", "uncertain", "expired", "cancelled"):
            assert zero("ebcd_deliveries_total", outcome=outcome, transport=transport), (outcome, transport)
        assert zero("ebcd_delivery_retries_total", transport=transport)
    for where in ("mqtt_outgoing", "ingest_queue", "serial_encode", "adapter", "adapter_encode"):
        assert zero("ebcd_dropped_messages_total", where=where), where
    for kind in ("report", "unverified_report", "session_jump", "play_hold_timeout", "adapter_garbage"):
        assert zero("ebcd_unexpected_messages_total", kind=kind), kind
