"""CAP 1.2: the rules of cap12.xsd and of the specification's text, checked by hand.

`read_cap` turns untrusted bytes into a typed `CapMessage` or raises `IngestError` whose detail
names the element, e.g. `info[1]/area[0]/polygon[0]: 3 points, a polygon needs at least 4`.
The content models below mirror the schema's sequences (order, minOccurs, maxOccurs); on top
of the schema it checks what the spec says in prose: identifiers without spaces or commas,
references as `sender,identifier,sent` triples (required for Update, Cancel, Ack and Error),
addresses for Private scope, closed polygons of at least 4 points, circles as `lat,lon radius`.

Leniency, on purpose (real senders do all of these): attributes on CAP elements are ignored,
values are stripped of surrounding whitespace before they are checked, and an empty optional
element (`<note/>`, `<expires/>`, `<size/>`) counts as absent.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import TypeVar

from ebcd.ingest import DEFAULT_LIMITS, IngestError, Limits, Reason
from ebcd.ingest.cap_model import (
    CAP12_NS,
    DSIG_NS,
    Area,
    CapMessage,
    CapMsgType,
    CapReference,
    Category,
    Certainty,
    Circle,
    Info,
    NameValue,
    Resource,
    ResponseType,
    Scope,
    Severity,
    SignatureSpan,
    Status,
    Urgency,
)
from ebcd.ingest.cap_xml import Element, XmlDocument, bounded, parse_xml

OLDER_CAP_NAMESPACES = {
    "urn:oasis:names:tc:emergency:cap:1.1": "CAP 1.1",
    "http://www.incident.com/cap/1.0": "CAP 1.0",
}
UNBOUNDED = sys.maxsize


@dataclass(frozen=True, slots=True)
class _Particle:
    """One element of a schema sequence; `model` None means text content only."""

    name: str
    min: int = 1
    max: int = 1
    model: tuple[_Particle, ...] | None = None


_NAME_VALUE = (_Particle("valueName"), _Particle("value"))
_RESOURCE = (
    _Particle("resourceDesc"),
    _Particle("mimeType"),
    *(_Particle(n, 0) for n in ("size", "uri", "derefUri", "digest")),
)
_AREA = (
    _Particle("areaDesc"),
    _Particle("polygon", 0, UNBOUNDED),
    _Particle("circle", 0, UNBOUNDED),
    _Particle("geocode", 0, UNBOUNDED, _NAME_VALUE),
    _Particle("altitude", 0),
    _Particle("ceiling", 0),
)
_INFO = (
    _Particle("language", 0),
    _Particle("category", 1, UNBOUNDED),
    _Particle("event"),
    _Particle("responseType", 0, UNBOUNDED),
    _Particle("urgency"),
    _Particle("severity"),
    _Particle("certainty"),
    _Particle("audience", 0),
    _Particle("eventCode", 0, UNBOUNDED, _NAME_VALUE),
    *(_Particle(n, 0) for n in ("effective", "onset", "expires", "senderName", "headline")),
    *(_Particle(n, 0) for n in ("description", "instruction", "web", "contact")),
    _Particle("parameter", 0, UNBOUNDED, _NAME_VALUE),
    _Particle("resource", 0, UNBOUNDED, _RESOURCE),
    _Particle("area", 0, UNBOUNDED, _AREA),
)
_ALERT = (
    *(_Particle(n) for n in ("identifier", "sender", "sent", "status", "msgType")),
    _Particle("source", 0),
    _Particle("scope"),
    _Particle("restriction", 0),
    _Particle("addresses", 0),
    _Particle("code", 0, UNBOUNDED),
    *(_Particle(n, 0) for n in ("note", "references", "incidents")),
    _Particle("info", 0, UNBOUNDED, _INFO),
)

_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)([-+])(\d\d):(\d\d)")
_DECIMAL = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_INTEGER = re.compile(r"[-+]?\d+")
_LANGUAGE = re.compile(r"[a-zA-Z]{1,8}(?:-[a-zA-Z0-9]{1,8})*")
_FORBIDDEN_IN_ID = re.compile(r"[\s,<&]")
_E = TypeVar("_E", bound=StrEnum)


def read_cap(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> CapMessage:
    """Parse and check a CAP 1.2 document; raise IngestError naming the offending element."""
    doc = parse_xml(payload, limits)
    root = doc.root
    identifier = _peek_identifier(root)
    try:
        _check_root(root)
        _check_content(root, _ALERT, "alert", signature_tail=True)
        return _build_message(doc)
    except _RuleError as exc:
        raise IngestError(exc.reason, bounded(exc.detail), identifier) from None


class _RuleError(Exception):
    """Internal: a rule broken at a path; read_cap adds the identifier."""

    def __init__(self, detail: str, reason: Reason = Reason.SCHEMA) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


def _peek_identifier(root: Element) -> str | None:
    for child in root.children:
        if child.name == "identifier" and not child.children:
            text = child.text.strip()
            return text[:256] or None
    return None


def _check_root(root: Element) -> None:
    if root.ns == CAP12_NS and root.name == "alert":
        return
    if root.name == "alert" and root.ns in OLDER_CAP_NAMESPACES:
        version = OLDER_CAP_NAMESPACES[root.ns]
        detail = f"alert: {version} (namespace {root.ns}) is not accepted; send CAP 1.2"
        raise _RuleError(detail, Reason.UNSUPPORTED)
    if root.name == "alert":
        raise _RuleError(f"alert: namespace {root.ns or '(none)'!r} is not {CAP12_NS}")
    if root.ns == CAP12_NS:
        raise _RuleError(f"root element <{root.name}> is not <alert> (one CAP alert per message)")
    raise _RuleError(f"root element <{root.qname}> is not a CAP 1.2 <alert>", Reason.UNKNOWN_FORMAT)


def _check_content(
    element: Element, model: tuple[_Particle, ...], path: str, *, signature_tail: bool = False
) -> None:
    """Check children against a schema sequence, recursively; text between them is refused."""
    if element.text.strip():
        raise _RuleError(f"{path}: text {_clip(element.text)} where only elements belong")
    names = [p.name for p in model]
    i, count, in_tail = 0, 0, False
    for child in element.children:
        if signature_tail and child.ns == DSIG_NS:
            in_tail = True
            continue
        if child.ns != CAP12_NS:
            raise _RuleError(f"{path}: element <{child.qname}> is not part of CAP 1.2")
        if in_tail:
            raise _RuleError(f"{path}: <{child.name}> after the XML-DSig elements")
        if child.name not in names[i:]:
            if child.name in names:
                raise _RuleError(f"{path}: <{child.name}> is out of order (after <{names[i]}>)")
            raise _RuleError(f"{path}: <{child.name}> is not a CAP 1.2 element here")
        while names[i] != child.name:
            if count < model[i].min:
                raise _RuleError(f"{path}: missing required <{names[i]}> (before <{child.name}>)")
            i, count = i + 1, 0
        particle = model[i]
        if count >= particle.max:
            raise _RuleError(f"{path}: more than one <{child.name}>")
        # <info> blocks are named from the root ("info[1]/area[0]"), as the value checks name them
        parent = "" if particle.name == "info" else f"{path}/"
        child_path = f"{parent}{child.name}" + (f"[{count}]" if particle.max > 1 else "")
        count += 1
        if particle.model is not None:
            _check_content(child, particle.model, child_path)
        elif child.children:
            raise _RuleError(f"{child_path}: holds elements, but only text belongs there")
    for particle in model[i:]:
        if count < particle.min:
            raise _RuleError(f"{path}: missing required <{particle.name}>")
        count = 0


def _build_message(doc: XmlDocument) -> CapMessage:
    kids = _cap_children(doc.root)
    msg_type = _enum(CapMsgType, kids, "msgType", "alert")
    scope = _enum(Scope, kids, "scope", "alert")
    references = _references(_text(kids, "references"))
    if msg_type is not CapMsgType.ALERT and not references:
        raise _RuleError(f"alert/references: msgType {msg_type.value} must name the earlier message(s)")
    addresses = _text(kids, "addresses")
    if scope is Scope.PRIVATE and not addresses:
        raise _RuleError("alert/addresses: required when scope is Private")
    signatures = tuple(
        SignatureSpan(*doc.span(child), child.attrib.get("Id"))
        for child in doc.root.children
        if child.ns == DSIG_NS and child.name == "Signature"
    )
    return CapMessage(
        identifier=_identifier(kids, "identifier"),
        sender=_identifier(kids, "sender"),
        sent=_required_time(kids, "sent", "alert"),
        status=_enum(Status, kids, "status", "alert"),
        msg_type=msg_type,
        scope=scope,
        source=_text(kids, "source"),
        restriction=_text(kids, "restriction"),
        addresses=addresses,
        codes=tuple(c.text.strip() for c in kids.get("code", ())),
        note=_text(kids, "note"),
        references=references,
        incidents=_text(kids, "incidents"),
        infos=tuple(_info(el, f"info[{i}]") for i, el in enumerate(kids.get("info", ()))),
        signatures=signatures,
        document=doc.data,
        transcoded_from=doc.transcoded_from,
    )


def _info(element: Element, path: str) -> Info:
    kids = _cap_children(element)
    language = _text(kids, "language")
    if language is not None and not _LANGUAGE.fullmatch(language):
        raise _RuleError(f"{path}/language: {_clip(language)} is not a language tag")
    return Info(
        language=language,
        categories=tuple(
            _enum_of(Category, el, f"{path}/category[{i}]") for i, el in _each(kids, "category")
        ),
        event=kids["event"][0].text.strip(),
        urgency=_enum(Urgency, kids, "urgency", path),
        severity=_enum(Severity, kids, "severity", path),
        certainty=_enum(Certainty, kids, "certainty", path),
        response_types=tuple(
            _enum_of(ResponseType, el, f"{path}/responseType[{i}]") for i, el in _each(kids, "responseType")
        ),
        audience=_text(kids, "audience"),
        event_codes=_pairs(kids, "eventCode"),
        effective=_time(kids, "effective", path),
        onset=_time(kids, "onset", path),
        expires=_time(kids, "expires", path),
        sender_name=_text(kids, "senderName"),
        headline=_text(kids, "headline"),
        description=_text(kids, "description"),
        instruction=_text(kids, "instruction"),
        web=_text(kids, "web"),
        contact=_text(kids, "contact"),
        parameters=_pairs(kids, "parameter"),
        resources=tuple(_resource(el, f"{path}/resource[{i}]") for i, el in _each(kids, "resource")),
        areas=tuple(_area(el, f"{path}/area[{i}]") for i, el in _each(kids, "area")),
    )


def _resource(element: Element, path: str) -> Resource:
    kids = _cap_children(element)
    size = _text(kids, "size")
    if size is not None and not _INTEGER.fullmatch(size):
        raise _RuleError(f"{path}/size: {_clip(size)} is not an integer")
    return Resource(
        desc=kids["resourceDesc"][0].text.strip(),
        mime_type=kids["mimeType"][0].text.strip(),
        size=int(size) if size is not None else None,
        uri=_text(kids, "uri"),
        has_deref_uri=_text(kids, "derefUri") is not None,
        digest=_text(kids, "digest"),
    )


def _area(element: Element, path: str) -> Area:
    kids = _cap_children(element)
    return Area(
        desc=kids["areaDesc"][0].text.strip(),
        polygons=tuple(_polygon(el.text, f"{path}/polygon[{i}]") for i, el in _each(kids, "polygon")),
        circles=tuple(_circle(el.text, f"{path}/circle[{i}]") for i, el in _each(kids, "circle")),
        geocodes=_pairs(kids, "geocode"),
        altitude=_decimal(kids, "altitude", path),
        ceiling=_decimal(kids, "ceiling", path),
    )


def _polygon(text: str, path: str) -> tuple[tuple[float, float], ...]:
    """A closed ring of at least 4 `lat,lon` pairs separated by whitespace."""
    points: list[tuple[float, float]] = []
    for token in text.split():
        lat_lon = token.split(",")
        if len(lat_lon) != 2:
            raise _RuleError(f"{path}: {_clip(token)} is not a lat,lon pair")
        points.append(_point(lat_lon[0], lat_lon[1], f"{path}: point {len(points)}"))
    if len(points) < 4:
        raise _RuleError(f"{path}: {len(points)} points, a polygon needs at least 4")
    if points[0] != points[-1]:
        raise _RuleError(f"{path}: first point {points[0]} differs from last point {points[-1]}")
    return tuple(points)


def _circle(text: str, path: str) -> Circle:
    """`lat,lon radius_km`."""
    parts = text.split()
    lat_lon = parts[0].split(",") if len(parts) == 2 else []
    if len(lat_lon) != 2 or not _DECIMAL.fullmatch(parts[1]):
        raise _RuleError(f"{path}: {_clip(text.strip())} is not 'lat,lon radius'")
    lat, lon = _point(lat_lon[0], lat_lon[1], path)
    radius = float(parts[1])
    if not 0 <= radius <= 20_000:
        raise _RuleError(f"{path}: radius {parts[1]} km is out of range")
    return Circle(lat, lon, radius)


def _point(lat_text: str, lon_text: str, where: str) -> tuple[float, float]:
    if not (_DECIMAL.fullmatch(lat_text) and _DECIMAL.fullmatch(lon_text)):
        raise _RuleError(f"{where} {_clip(lat_text + ',' + lon_text)} is not two decimal numbers")
    lat, lon = float(lat_text), float(lon_text)
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and math.isfinite(lat + lon)):
        raise _RuleError(f"{where} {lat_text},{lon_text} is not a latitude,longitude")
    return lat, lon


def _references(text: str | None) -> tuple[CapReference, ...]:
    """Whitespace-separated `sender,identifier,sent` triples."""
    refs = []
    for i, token in enumerate((text or "").split()):
        parts = token.split(",")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _RuleError(f"alert/references[{i}]: {_clip(token)} is not sender,identifier,sent")
        refs.append(CapReference(parts[0], parts[1], _parse_time(parts[2], f"alert/references[{i}]")))
    return tuple(refs)


def _parse_time(text: str, path: str) -> datetime:
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise _RuleError(f"{path}: {_clip(text.strip())} is not a CAP time YYYY-MM-DDThh:mm:ss±hh:mm")
    year, month, day, hour, minute, second, sign, off_h, off_m = match.groups()
    offset = timedelta(hours=int(off_h), minutes=int(off_m))
    if offset > timedelta(hours=14) or int(off_m) > 59:
        raise _RuleError(f"{path}: offset {sign}{off_h}:{off_m} is out of range")
    try:
        tz = timezone(-offset if sign == "-" else offset)
        return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz)
    except ValueError as exc:
        raise _RuleError(f"{path}: {text.strip()}: {exc}") from None


def _cap_children(element: Element) -> dict[str, list[Element]]:
    kids: dict[str, list[Element]] = {}
    for child in element.children:
        if child.ns == CAP12_NS:
            kids.setdefault(child.name, []).append(child)
    return kids


def _each(kids: dict[str, list[Element]], name: str) -> enumerate[Element]:
    return enumerate(kids.get(name, ()))


def _text(kids: dict[str, list[Element]], name: str) -> str | None:
    found = kids.get(name)
    return (found[0].text.strip() or None) if found else None


def _identifier(kids: dict[str, list[Element]], name: str) -> str:
    value = kids[name][0].text.strip()
    if not value or _FORBIDDEN_IN_ID.search(value):
        raise _RuleError(f"alert/{name}: {_clip(value)} must be non-empty, without spaces, commas, < or &")
    return value


def _enum(cls: type[_E], kids: dict[str, list[Element]], name: str, path: str) -> _E:
    return _enum_of(cls, kids[name][0], f"{path}/{name}")


def _enum_of(cls: type[_E], element: Element, path: str) -> _E:
    value = element.text.strip()
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise _RuleError(f"{path}: {_clip(value)} is not one of {allowed}") from None


def _time(kids: dict[str, list[Element]], name: str, path: str) -> datetime | None:
    return _required_time(kids, name, path) if _text(kids, name) is not None else None


def _required_time(kids: dict[str, list[Element]], name: str, path: str) -> datetime:
    return _parse_time(kids[name][0].text, f"{path}/{name}")


def _decimal(kids: dict[str, list[Element]], name: str, path: str) -> float | None:
    value = _text(kids, name)
    if value is None:
        return None
    if not _DECIMAL.fullmatch(value):
        raise _RuleError(f"{path}/{name}: {_clip(value)} is not a decimal number")
    return float(value)


def _pairs(kids: dict[str, list[Element]], name: str) -> tuple[NameValue, ...]:
    pairs = []
    for element in kids.get(name, ()):
        inner = _cap_children(element)
        pairs.append(NameValue(inner["valueName"][0].text.strip(), inner["value"][0].text.strip()))
    return tuple(pairs)


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
