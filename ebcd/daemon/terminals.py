"""What IP/4G terminals say over MQTT: reports and presence, decoded, checked, handed to the runner.

A message is believed only as far as it can be checked: its topic must name a terminal of the
ledger that is on MQTT, its payload must decode, and, with `[security] terminal_keys_dir`, its
signature must verify (`ebcd.security.reports`). Whatever fails is dropped, logged and counted in
`ebcd_unexpected_messages_total{kind}`; it never reaches the delivery core. Without terminal keys
the broker's ACL is the only defence, and `probe_acl` warns at start when anyone may publish on
the report topics.
"""

from __future__ import annotations

from typing import Any

import structlog

from ebcd.delivery.runner import Runner
from ebcd.metrics import Metrics
from ebcd.protocols.mqtt import codec as mqtt_codec
from ebcd.protocols.mqtt.codec import CodecError, Topics
from ebcd.security.acl_probe import AclProbeError, is_acl_probe, probe_report_acl
from ebcd.security.reports import ReportVerifier
from ebcd.tiers.district import District

log = structlog.get_logger("ebcd.terminals")


class TerminalTraffic:
    """Reports and presence from the terminals' MQTT topics, to the runner once checked."""

    def __init__(
        self, district: District, topics: Topics, verifier: ReportVerifier, runner: Runner, metrics: Metrics
    ) -> None:
        self.district = district
        self.topics = topics
        self.verifier = verifier
        self.runner = runner
        self.metrics = metrics
        self.mqtt_codes = [t.code for t in district.terminals() if t.link == "mqtt"]

    def warn_missing_keys(self) -> None:
        """With terminal keys configured, name the MQTT terminals that have none (all they say is refused)."""
        if self.verifier.enabled and (missing := self.verifier.missing(self.mqtt_codes)):
            log.warning("security.terminal_keys_missing", terminals=len(missing), first=missing[0],
                        hint="every report and presence of these terminals is refused")  # fmt: skip

    def on_message(self, topic: str, payload: bytes, retain: bool, properties: Any) -> None:
        """One message of a terminal's report or presence topic (the MQTT link's callback)."""
        terminal = self.topics.terminal_of(topic)
        if terminal is None:
            self.metrics.unexpected.labels("topic").inc()
            return
        known = self.district.terminal(terminal)
        if known is None or known.link != "mqtt":  # only IP/4G terminals speak for themselves over MQTT
            self.metrics.unexpected.labels("not_an_mqtt_terminal").inc()
            log.warning("terminal.not_on_mqtt", terminal=terminal, topic=topic)
            return
        try:
            if topic.endswith("/report"):
                self._report(terminal, payload)
            elif topic.endswith("/presence"):
                self._presence(terminal, payload)
        except CodecError as e:
            self.metrics.unexpected.labels("malformed").inc()
            log.warning("terminal.malformed_message", terminal=terminal, topic=topic, error=str(e))

    def _report(self, terminal: str, payload: bytes) -> None:
        report = mqtt_codec.decode_report(terminal, payload)
        if is_acl_probe(report):
            self.metrics.unexpected.labels("acl_probe").inc()
        elif (why := self.verifier.check_report(report, report.signature)) is not None:
            self.metrics.unexpected.labels("unverified_report").inc()
            log.warning("terminal.report_refused", terminal=terminal, alert_id=report.alert_id,
                        revision=report.revision, status=report.status.value, why=why)  # fmt: skip
        else:
            self.runner.on_report(report)

    def _presence(self, terminal: str, payload: bytes) -> None:
        presence = mqtt_codec.decode_presence(terminal, payload)
        if (why := self.verifier.check_presence(presence, presence.signature)) is not None:
            self.metrics.unexpected.labels("unverified_presence").inc()
            log.warning("terminal.presence_refused", terminal=terminal, state=presence.state.value,
                        session=presence.session, why=why)  # fmt: skip
        else:
            self.runner.on_presence(presence)

    async def probe_acl(self, host: str, port: int, tls: Any) -> None:
        """Warn at start when anyone may publish terminal reports and nothing checks them."""
        if self.verifier.enabled or not self.mqtt_codes:
            return
        try:
            result = await probe_report_acl(host, port, tls, self.district.code, self.mqtt_codes[0])
        except AclProbeError as e:
            log.info("security.acl_probe_failed", error=str(e))
            return
        if result.open:
            log.warning(
                "security.reports_unprotected",
                evidence=result.evidence,
                hint="an anonymous client may publish terminal reports and no [security] terminal_keys_dir "
                "is set: anyone on the broker can forge acknowledgements (see the shipped ACL)",
            )
