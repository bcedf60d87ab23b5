"""The EBD link's own metrics, beside `ebcd_rejected_messages_total{reason}`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from ebcd.protocols.ebd import ResultCode


class EbdMetrics:
    """The EBD link's own series (beside ebcd_rejected_messages_total{reason})."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "ebcd_ebd_received",
            "EBD packages received, by ResultCode answered",
            ["result"],
            registry=registry,
        )
        self.sent = Counter(
            "ebcd_ebd_sent",
            "EBD packages the platform above answered, by EBDType",
            ["type"],
            registry=registry,
        )
        self.post_failures = Counter(
            "ebcd_ebd_post_failures",
            "POSTs up that failed (and are retried), by why",
            ["why"],
            registry=registry,
        )
        self.outbox = Gauge("ebcd_ebd_outbox", "EBD packages waiting to be sent up", registry=registry)
        self.upstream_up = Gauge(
            "ebcd_ebd_upstream_up", "1 while the platform above answers", registry=registry
        )
        for code in ResultCode:
            self.received.labels(str(int(code)))
        for why in ("connect", "timeout", "status"):
            self.post_failures.labels(why)
        for ebd_type in ("EBMStateResponse", "EBMBrdLog", "EBRDTInfo", "EBRDTState"):
            self.sent.labels(ebd_type)
        self.loop_failures = Counter(
            "ebcd_ebd_loop_failures",
            "EBD loops that failed and were restarted, by loop",
            ["loop"],
            registry=registry,
        )
