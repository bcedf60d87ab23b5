"""Prometheus metrics: one registry per daemon, bounded label sets (never an alert id or code)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from ebcd import __version__
from ebcd.ingest import Reason

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)
JOURNAL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
TRANSPORTS = ("mqtt", "serial", "adapter")
DROPPED_WHERE = (
    "mqtt_outgoing",
    "ingest_queue",
    "serial_encode",
    "adapter",
    "adapter_encode",
    "web_connections",
)
ADAPTER_DROPS = (  # what the adapter listener drops (ebcd.protocols.adapter.listener)
    "bad_frame",
    "bad_signature",
    "garbage",
    "malformed",
    "not_reading",
    "too_many_connections",
    "unexpected_type",
    "unknown_adapter",
    "unknown_broadcast",
    "unknown_terminal",
)
UNEXPECTED_KINDS = (
    "report",  # a report for no alert or delivery ebcd knows
    "stale_revision",
    "presence",  # a presence of a terminal not in the ledger
    "topic",
    "not_an_mqtt_terminal",
    "malformed",
    "unverified_report",
    "unverified_presence",
    "session_jump",
    "acl_probe",
    "response_topic",
    "play_hold_timeout",  # an acknowledged broadcast never said `done` within max_play_s
    "adapter_no_reply",
    *(f"adapter_{why}" for why in ADAPTER_DROPS),
)


class Metrics:
    """Every metric ebcd exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build = Info("ebcd_build", "ebcd version", registry=r)
        self.build.info({"version": __version__})
        self.alerts = Counter(
            "ebcd_alerts", "Alerts accepted, by level and origin", ["level", "source"], registry=r
        )
        self.alerts_by_state = Gauge(
            "ebcd_alerts_in_state", "Alerts held by the daemon, by state", ["state"], registry=r
        )
        self.deliveries = Counter(
            "ebcd_deliveries",
            "Delivery outcomes: acked, refused, uncertain, expired, cancelled",
            ["outcome", "transport"],
            registry=r,
        )
        self.retries = Counter("ebcd_delivery_retries", "Deliveries sent again", ["transport"], registry=r)
        self.commands = Counter(
            "ebcd_commands_published", "Commands published, by addressing", ["addressing"], registry=r
        )
        self.latency = Histogram(
            "ebcd_delivery_latency_seconds",
            "Alert accepted to a terminal's first acknowledgement",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.terminals = Gauge("ebcd_terminals", "Terminals by liveness state", ["state"], registry=r)
        self.town_terminals = Gauge(
            "ebcd_town_terminals", "Terminals by town and liveness state", ["town", "state"], registry=r
        )
        self.town_location = Gauge(
            "ebcd_town_location",
            "1 for each town, with where its terminals are (their mean latitude and longitude) and its name: "
            "what a map panel joins ebcd_town_terminals with",
            ["town", "name", "lat", "lon"],
            registry=r,
        )
        self.rejected = Counter(
            "ebcd_rejected_messages", "Upstream messages refused, by reason", ["reason"], registry=r
        )
        self.dropped = Counter(
            "ebcd_dropped_messages", "Messages ebcd could not carry, by where and why", ["where"], registry=r
        )
        self.mqtt_connected = Gauge("ebcd_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_connects = Counter("ebcd_mqtt_connects", "Connections made to the broker", registry=r)
        self.queue_depth = Gauge("ebcd_queue_depth", "Messages waiting, by queue", ["queue"], registry=r)
        self.unexpected = Counter(
            "ebcd_unexpected_messages", "Terminal messages that matched nothing", ["kind"], registry=r
        )
        self.journal_failures = Counter(
            "ebcd_journal_failures",
            "Writes the journal could not make durable, by what was being written",
            ["what"],
            registry=r,
        )
        for what in ("received", "verdict", "alert", "delivery", "audit", "transaction"):
            self.journal_failures.labels(what)  # a series from the start, for rules and dashboards
        self.journal_latency = Histogram(
            "ebcd_journal_commit_seconds",
            "Journal transaction latency",
            buckets=JOURNAL_BUCKETS_S,
            registry=r,
        )
        self.missed_tests = Gauge(
            "ebcd_test_broadcast_missed_terminals",
            "Terminals that did not acknowledge the last test broadcast",
            registry=r,
        )
        self.serial_link = Gauge("ebcd_serial_links_up", "Serial ports open", registry=r)
        self.control_connections = Gauge(
            "ebcd_control_connections", "Connections open on the control socket", registry=r
        )
        self.control_refused = Counter(
            "ebcd_control_refused",
            "Control socket connections turned away or cut off: busy (at control_max_connections), "
            "too_large (a request line over the limit), idle (no request within "
            "control_idle_timeout_s), stalled (answers left unread as long)",
            ["reason"],
            registry=r,
        )
        self.resource_errors = Counter(
            "ebcd_resource_errors",
            "Control socket accepts that failed, by errno: emfile, enfile, enobufs, enomem, other",
            ["kind"],
            registry=r,
        )
        # every known label value is a series from the start, so rules and dashboards see a 0
        # before the first event
        for transport in TRANSPORTS:
            for outcome in ("acked", "refused", "uncertain", "expired", "cancelled"):
                self.deliveries.labels(outcome, transport)
            self.retries.labels(transport)
        for addressing in ("group", "terminal", "serial", "adapter"):
            self.commands.labels(addressing)
        for refusal in Reason:
            self.rejected.labels(refusal.value)
        for where in DROPPED_WHERE:
            self.dropped.labels(where)
        for kind in UNEXPECTED_KINDS:
            self.unexpected.labels(kind)
        for state in ("unknown", "online", "offline"):
            self.terminals.labels(state)
        for reason in ("busy", "too_large", "idle", "stalled"):
            self.control_refused.labels(reason)
        for kind in ("emfile", "enfile", "enobufs", "enomem"):
            self.resource_errors.labels(kind)
