"""CAP 1.2 as typed values: the enumerations of cap12.xsd and a checked `<alert>`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

CAP12_NS = "urn:oasis:names:tc:emergency:cap:1.2"
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"


class Status(StrEnum):
    """CAP `<status>`."""

    ACTUAL = "Actual"
    EXERCISE = "Exercise"
    SYSTEM = "System"
    TEST = "Test"
    DRAFT = "Draft"


class CapMsgType(StrEnum):
    """CAP `<msgType>`."""

    ALERT = "Alert"
    UPDATE = "Update"
    CANCEL = "Cancel"
    ACK = "Ack"
    ERROR = "Error"


class Scope(StrEnum):
    """CAP `<scope>`."""

    PUBLIC = "Public"
    RESTRICTED = "Restricted"
    PRIVATE = "Private"


class Category(StrEnum):
    """CAP `<category>`."""

    GEO = "Geo"
    MET = "Met"
    SAFETY = "Safety"
    SECURITY = "Security"
    RESCUE = "Rescue"
    FIRE = "Fire"
    HEALTH = "Health"
    ENV = "Env"
    TRANSPORT = "Transport"
    INFRA = "Infra"
    CBRNE = "CBRNE"
    OTHER = "Other"


class ResponseType(StrEnum):
    """CAP `<responseType>`."""

    SHELTER = "Shelter"
    EVACUATE = "Evacuate"
    PREPARE = "Prepare"
    EXECUTE = "Execute"
    AVOID = "Avoid"
    MONITOR = "Monitor"
    ASSESS = "Assess"
    ALL_CLEAR = "AllClear"
    NONE = "None"


class Urgency(StrEnum):
    """CAP `<urgency>`."""

    IMMEDIATE = "Immediate"
    EXPECTED = "Expected"
    FUTURE = "Future"
    PAST = "Past"
    UNKNOWN = "Unknown"


class Severity(StrEnum):
    """CAP `<severity>`."""

    EXTREME = "Extreme"
    SEVERE = "Severe"
    MODERATE = "Moderate"
    MINOR = "Minor"
    UNKNOWN = "Unknown"


class Certainty(StrEnum):
    """CAP `<certainty>`."""

    OBSERVED = "Observed"
    LIKELY = "Likely"
    POSSIBLE = "Possible"
    UNLIKELY = "Unlikely"
    UNKNOWN = "Unknown"


class CapReference(NamedTuple):
    """One earlier message named in `<references>`."""

    sender: str
    identifier: str
    sent: datetime


@dataclass(frozen=True, slots=True)
class NameValue:
    """A `<valueName>`/`<value>` pair (eventCode, parameter, geocode)."""

    value_name: str
    value: str


@dataclass(frozen=True, slots=True)
class Circle:
    """A CAP `<circle>`: centre and radius in kilometres."""

    lat: float
    lon: float
    radius_km: float


@dataclass(frozen=True, slots=True)
class Area:
    """A CAP `<area>`."""

    desc: str
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()
    circles: tuple[Circle, ...] = ()
    geocodes: tuple[NameValue, ...] = ()
    altitude: float | None = None
    ceiling: float | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    """A CAP `<resource>`, without its (possibly large) `<derefUri>` content."""

    desc: str
    mime_type: str
    size: int | None = None
    uri: str | None = None
    has_deref_uri: bool = False
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class Info:
    """A CAP `<info>` block; optional texts are None when absent or empty."""

    language: str | None
    categories: tuple[Category, ...]
    event: str
    urgency: Urgency
    severity: Severity
    certainty: Certainty
    response_types: tuple[ResponseType, ...] = ()
    audience: str | None = None
    event_codes: tuple[NameValue, ...] = ()
    effective: datetime | None = None
    onset: datetime | None = None
    expires: datetime | None = None
    sender_name: str | None = None
    headline: str | None = None
    description: str | None = None
    instruction: str | None = None
    web: str | None = None
    contact: str | None = None
    parameters: tuple[NameValue, ...] = ()
    resources: tuple[Resource, ...] = ()
    areas: tuple[Area, ...] = ()


@dataclass(frozen=True, slots=True)
class SignatureSpan:
    """An enveloped XML-DSig `<Signature>`: its byte span in `CapMessage.document` and its Id."""

    start: int
    end: int
    id: str | None


@dataclass(frozen=True, slots=True)
class CapMessage:
    """A CAP 1.2 `<alert>` that passed every rule; optional texts are None when absent or empty."""

    identifier: str
    sender: str
    sent: datetime
    status: Status
    msg_type: CapMsgType
    scope: Scope
    source: str | None = None
    restriction: str | None = None
    addresses: str | None = None
    codes: tuple[str, ...] = ()
    note: str | None = None
    references: tuple[CapReference, ...] = ()
    incidents: str | None = None
    infos: tuple[Info, ...] = ()
    signatures: tuple[SignatureSpan, ...] = ()
    document: bytes = field(default=b"", repr=False)
    transcoded_from: str | None = None
