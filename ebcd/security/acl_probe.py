"""At start: may anyone, with no account at all, publish on a terminal's report topic?

A broker without the shipped ACL (config/mosquitto/ebcd.acl, `allow_anonymous false`) lets
anyone forge acknowledgements, refusals and presence (README, "Threat model"); without terminal
keys (`[security] terminal_keys_dir`) ebcd would believe them. The probe asks the broker itself:
a throwaway anonymous client (no user name, a random client id, a clean session) subscribes to
the report topic of one ledger terminal and publishes a QoS 1 report there. The verdict:

- login refused (CONNACK: not authorized, bad user name or password): protected, False;
- MQTT 5 PUBACK with a reason code >= 0x80 (Mosquitto: 0x87 not authorized): protected, False;
- the report comes back on the client's own subscription: open, True;
- MQTT 5 PUBACK success without it coming back (anonymous may write, not read): open, True;
- MQTT 3.1.1 (a broker without MQTT 5) and it does not come back within the timeout: False,
  as far as can be told: 3.1.1 acknowledges a refused publish like an accepted one.

It tries MQTT 5 first, then 3.1.1. It checks anonymous clients only: whether a logged-in terminal
may write another terminal's topics is the ACL's `%u` lines (tests/deploy/test_mosquitto_acl.py).

The probe must not disturb the terminal whose topic it borrows: terminals never read report
topics, and the report names alert `ACL_PROBE_ALERT_ID` at revision 0, which no alert has (ebcd
ids are YYYYMMDD-NNNN, revisions start at 1). ebcd hears it if the broker is open: drop it with
`is_acl_probe(report)` before anything else looks at it (it is unsigned, so a verifier would
call it forged).
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from ebcd.protocols.messages import AckStatus, TerminalReport
from ebcd.protocols.mqtt.codec import Topics, encode_report
from ebcd.protocols.mqtt.link import ProbeAnswer, probe_publish

ACL_PROBE_ALERT_ID = "acl-probe"
ACL_PROBE_REVISION = 0
ACL_PROBE_CAUSE_PREFIX = "ebcd acl probe "
PROBE_TIMEOUT_S = 5.0
MQTT_REFUSED_MIN = 0x80  # MQTT 5 reason codes from 0x80 up are failures

ProbePublish = Callable[..., Awaitable[ProbeAnswer]]  # the signature of link.probe_publish


class AclProbeError(Exception):
    """The broker could not be asked: unreachable, or it completed no handshake, MQTT 5 or 3.1.1."""


@dataclass(frozen=True, slots=True)
class AclProbeResult:
    """The probe's verdict and what the broker did, for the log."""

    open: bool  # True: an anonymous client may publish on a terminal's report topic
    protocol: Literal["5", "3.1.1"]
    evidence: str


def probe_report(terminal: str, token: str) -> TerminalReport:
    """The report the probe publishes: `received` for ACL_PROBE_ALERT_ID, revision 0, with `token`."""
    return TerminalReport(
        terminal,
        ACL_PROBE_ALERT_ID,
        ACL_PROBE_REVISION,
        AckStatus.RECEIVED,
        f"{ACL_PROBE_CAUSE_PREFIX}{token}",
    )


def is_acl_probe(report: TerminalReport) -> bool:
    """Whether `report` is (or poses as) the probe's: no alert has it; drop it, unjudged."""
    return report.alert_id == ACL_PROBE_ALERT_ID


async def probe_report_acl(
    host: str,
    port: int,
    tls_context: ssl.SSLContext | None,
    district_code: str,
    a_terminal_code: str,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
    publish: ProbePublish = probe_publish,
) -> AclProbeResult:
    """The verdict on the report topic of `a_terminal_code`, with its evidence; AclProbeError if the
    broker cannot be asked. `publish` is `ebcd.protocols.mqtt.link.probe_publish` (tests replace it)."""
    topic = Topics(district_code).report(a_terminal_code)
    payload = encode_report(probe_report(a_terminal_code, secrets.token_hex(8)))
    failures = []
    for protocol in ("5", "3.1.1"):
        try:
            answer = await publish(
                host, port, topic=topic, payload=payload, tls_context=tls_context,
                protocol=protocol, timeout_s=timeout_s,
            )  # fmt: skip
        except ConnectionError as e:
            failures.append(str(e))
            continue
        return _verdict(answer, topic)
    raise AclProbeError(f"cannot probe the broker at {host}:{port}: {'; '.join(failures)}")


async def anonymous_can_publish_reports(
    host: str,
    port: int,
    tls_context: ssl.SSLContext | None,
    district_code: str,
    a_terminal_code: str,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> bool:
    """True if an anonymous client may publish on `a_terminal_code`'s report topic (see the module);
    AclProbeError if the broker cannot be asked."""
    result = await probe_report_acl(
        host, port, tls_context, district_code, a_terminal_code, timeout_s=timeout_s
    )
    return result.open


def _verdict(answer: ProbeAnswer, topic: str) -> AclProbeResult:
    where = f"anonymous publish on {topic} (MQTT {answer.protocol})"
    if answer.login_refused:
        return AclProbeResult(False, answer.protocol, f"{answer.detail} (MQTT {answer.protocol})")
    reason = answer.puback_reason
    if reason is not None and reason >= MQTT_REFUSED_MIN:
        return AclProbeResult(False, answer.protocol, f"{where}: refused, {answer.detail}")
    if answer.echoed:
        return AclProbeResult(True, answer.protocol, f"{where}: accepted, {answer.detail}")
    if reason is not None:
        return AclProbeResult(
            True, answer.protocol, f"{where}: accepted (PUBACK 0x{reason:02X}), {answer.detail}"
        )
    return AclProbeResult(False, answer.protocol, f"{where}: {answer.detail}; taken as refused")
