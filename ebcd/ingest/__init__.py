"""Ingest: upstream payloads (JSON alerts, CAP 1.2) turned into `AlertRequest`s or refused.

Every refusal is an `IngestError` with a stable reason code (the label of
`ebcd_rejected_messages_total{reason}` and the `reason` of the rejection topic) and a detail
that says what and where.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Real CAP documents reach about 900 KB (IPAWS inline MP3 audio: 459 KB; one 41,009-point warning
# polygon: 881 KB); 2 MiB admits them with room, and stays a bounded parse (bench/cap.py).
MAX_PAYLOAD_BYTES = 2 * 1024 * 1024
MAX_DEPTH = 64  # XML nesting; a CAP alert with an XML-DSig signature needs about 8
# A weather service's Update in 8 languages with 1,344 geocodes each is ~32,000 elements.
MAX_ELEMENTS = 100_000


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of an upstream payload is read: its bytes before parsing; XML nesting and
    elements while parsing ([ingest] in the config)."""

    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_depth: int = MAX_DEPTH
    max_elements: int = MAX_ELEMENTS


DEFAULT_LIMITS = Limits()


class Reason(StrEnum):
    """Why an upstream message was refused."""

    TOO_LARGE = "too_large"
    MALFORMED_JSON = "malformed_json"
    MALFORMED_XML = "malformed_xml"
    FORBIDDEN_XML = "forbidden_xml"  # DTDs, entities, external references
    SCHEMA = "schema"  # well-formed but breaks the format's rules
    UNKNOWN_FORMAT = "unknown_format"
    UNKNOWN_EVENT = "unknown_event"
    UNKNOWN_TARGET = "unknown_target"
    NO_TARGET_IN_DISTRICT = "no_target_in_district"
    UNSUPPORTED = "unsupported"  # valid, but not something ebcd acts on (CAP Ack/Error, Draft)
    DUPLICATE = "duplicate"
    UNKNOWN_REFERENCE = "unknown_reference"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"
    JOURNAL = "journal"  # could not be journalled durably, so it was not accepted
    BAD_SIGNATURE = "bad_signature"  # XML-DSig missing or failed for a sender that signs
    RETAINED = "retained"  # a retained message on alerts/in: replayed by the broker at every subscribe
    OVERLOADED = "overloaded"  # more messages waiting to be judged than `ingest_queue_size`
    BAD_PACKAGE = "bad_package"  # an EBD tar that is unsafe or not one (links, ../, devices, too many files)
    MISSING_CONTENT = "missing_content"  # an EBD package without its EBDB, EBDS or a named EBDR
    REPLAYED = "replayed"  # an EBD package whose EBDID was already received


class IngestError(Exception):
    """An upstream message refused with a reason code and a human detail."""

    def __init__(self, reason: Reason, detail: str, identifier: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.identifier = identifier
