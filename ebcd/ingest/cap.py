"""CAP 1.2 ingest: a CAP document turned into the district's `AlertRequest`, or refused.

`parse_cap` is pure (no I/O, no clock unless `now` is left out). `cap_rules.read_cap` checks the
document against CAP 1.2; this module decides what the district does with it:

- msgType Alert, Update, Cancel map to `MsgType`; Ack and Error are refused (unsupported).
  status Actual is live, Test and Exercise are test broadcasts, System and Draft are refused.
- The `<info>` block: those in zh-CN, else those in any `zh*` language, else all of them; among
  these the first that names an area code of the district, else the first with a polygon or
  circle, else the first.
- level from `<severity>`: `LEVEL_BY_SEVERITY` (Unknown is broadcast at level 4 rather than refused).
- event type: the first `<eventCode>` whose valueName is one of `EVENT_CODE_VALUE_NAMES` and whose
  value is in the event type table; else `00000` for Test and Exercise; else
  `CATEGORY_EVENT_TYPES` of the first `<category>`.
- targets, from every `<area>` of the chosen info: each `<geocode>` (any valueName) whose value
  is a 12-digit area code of the district's county becomes `area:CODE`; each `<polygon>` and
  `<circle>` becomes a geometric target (the topology resolves which terminals lie inside).
  Other geocodes are ignored and listed. An Alert or Update without a target is refused with
  `no_target_in_district` (ebcd never guesses an area); a Cancel needs none.
- text: headline, description and instruction (else the event name), whitespace tidied, cut to
  `MAX_TEXT_CHARS`. ttl: `<expires>` minus now, at most `MAX_TTL_S`; already expired is refused;
  without `<expires>`, `default_ttl_s`. An Update already expired raises `EndingUpdate` (an
  `expired` refusal carrying the Update as a Cancel): admission ends with it the active alert of
  the same sender it references, and refuses it `expired` if there is none.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from ebcd.ingest import DEFAULT_LIMITS, IngestError, Limits, Reason
from ebcd.ingest.cap_model import (
    CapMessage,
    CapMsgType,
    CapReference,
    Category,
    Info,
    Scope,
    Severity,
    SignatureSpan,
    Status,
)
from ebcd.ingest.cap_rules import read_cap
from ebcd.model import events
from ebcd.model.alert import (
    DEFAULT_TTL_S,
    MAX_TEXT_CHARS,
    MAX_TTL_S,
    AlertRequest,
    CircleTarget,
    CodeTarget,
    MsgType,
    Origin,
    PolygonTarget,
    Target,
)
from ebcd.model.codes import CodeError, check_area_code

LEVEL_BY_SEVERITY = {
    Severity.EXTREME: 1,
    Severity.SEVERE: 2,
    Severity.MODERATE: 3,
    Severity.MINOR: 4,
    Severity.UNKNOWN: 4,
}
# eventCode valueNames that carry a 5-character event type; compared without case, spaces or
# punctuation ("GB/T 35561-2017" matches "gbt355612017").
EVENT_CODE_VALUE_NAMES = (
    "EBEventType",
    "EventType",
    "EBEventCode",
    "EventCode",
    "EBMEventType",
    "GB/T 35561",
    "GB/T 35561-2017",
    "GB/T 35965",
)
# Without an event code, the CAP category picks a parent code of the event type table.
CATEGORY_EVENT_TYPES = {
    Category.GEO: "11000",  # 自然灾害: earthquakes (11C), geological (11D) and tsunamis (11E) alike
    Category.MET: "11B00",  # 气象灾害
    Category.SAFETY: "19000",  # 其它突发事件: CAP's "general emergency and public safety"
    Category.SECURITY: "14000",  # 安全事件
    Category.RESCUE: "19000",  # 其它突发事件
    Category.FIRE: "12G00",  # 火灾事故 (forest and grassland fires are 11G00, told by an event code)
    Category.HEALTH: "13000",  # 公共卫生事件
    Category.ENV: "12Q00",  # 环境污染和生态破坏事件
    Category.TRANSPORT: "12000",  # 事故灾难: road, water, rail, metro and air accidents alike
    Category.INFRA: "12P00",  # 基础设施和公用设施事故
    Category.CBRNE: "12000",  # 事故灾难: hazardous chemicals (12D), nuclear (12T), explosives (12E)
    Category.OTHER: "19000",  # 其它突发事件
}
NO_INFO_EVENT_TYPE = "19000"  # a Cancel without <info> still needs an event type
MAX_LISTED_IGNORED = 50

_SPACES = re.compile(r"[^\S\n]+")
_AROUND_NEWLINES = re.compile(r" ?\n\s*")


@dataclass(frozen=True, slots=True)
class CapAlert:
    """A CAP alert accepted for the district: ebcd's request plus the CAP facts the daemon needs."""

    request: AlertRequest
    identifier: str
    sender: str
    sent: datetime
    status: Status
    msg_type: CapMsgType
    scope: Scope
    references: tuple[CapReference, ...]
    expires: datetime | None
    effective: datetime | None
    onset: datetime | None
    language: str | None
    info_index: int | None
    event_type_source: str
    signatures: tuple[SignatureSpan, ...]
    message: CapMessage = field(repr=False, compare=False)
    text_truncated: bool = False
    ignored_geocodes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def has_signature(self) -> bool:
        """Whether the document carries at least one enveloped XML-DSig `<Signature>`."""
        return bool(self.signatures)

    def signature_element(self, index: int = 0) -> bytes:
        """The bytes of a `<Signature>` element in the parsed document (`message.document`)."""
        span = self.signatures[index]
        return self.message.document[span.start : span.end]


class EndingUpdate(IngestError):
    """An Update whose `<expires>` has passed: `expired`, unless it ends an alert it references.

    `cap` is the Update as a Cancel of what it references; admission applies it only to an active
    alert of the same sender and refuses it `expired` (this error) otherwise. A caller that does
    not know the rule refuses it `expired`, as before the rule."""

    def __init__(self, detail: str, cap: CapAlert, request: AlertRequest | None = None) -> None:
        super().__init__(Reason.EXPIRED, detail, cap.identifier)
        self.cap = cap
        self.request = request or cap.request


@dataclass(slots=True)
class _Choice:
    index: int
    info: Info
    targets: list[Target]
    area_codes: int
    ignored: list[str]


def parse_cap(
    payload: bytes,
    *,
    district_area: str,
    now: datetime | None = None,
    default_ttl_s: float = DEFAULT_TTL_S,
    event_code_names: Collection[str] = EVENT_CODE_VALUE_NAMES,
    vouch: Callable[[CapMessage], None] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> CapAlert:
    """Turn a CAP 1.2 document into a `CapAlert` for the district, or raise IngestError.

    `vouch` runs once the document is read and before it is judged (area, expiry, event): the
    place for the sender's authority and signature, so that a forgery is refused as one."""
    check_area_code(district_area)
    if not 0 < default_ttl_s <= MAX_TTL_S:
        raise ValueError(f"default_ttl_s {default_ttl_s} is not within (0, {MAX_TTL_S}]")
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    message = read_cap(payload, limits)
    if vouch is not None:
        vouch(message)
    names = frozenset(_normalised(n) for n in event_code_names)
    try:
        return _to_alert(message, district_area[:6], now, default_ttl_s, names)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "request"
        raise _invalid(exc, where, message.identifier) from None


def _to_alert(
    message: CapMessage, county: str, now: datetime, default_ttl_s: float, names: frozenset[str]
) -> CapAlert:
    ident = message.identifier
    if message.msg_type in (CapMsgType.ACK, CapMsgType.ERROR):
        detail = f"alert/msgType: {message.msg_type.value}; ebcd acts on Alert, Update and Cancel"
        raise IngestError(Reason.UNSUPPORTED, detail, ident)
    if message.status in (Status.SYSTEM, Status.DRAFT):
        detail = f"alert/status: {message.status.value}; ebcd acts on Actual, Test and Exercise"
        raise IngestError(Reason.UNSUPPORTED, detail, ident)
    msg_type = MsgType(message.msg_type.value.lower())
    test = message.status in (Status.TEST, Status.EXERCISE)
    notes: list[str] = []
    choice = _choose_info(message.infos, county, ident)
    if choice is None:
        if msg_type is not MsgType.CANCEL:
            detail = f"alert: a {message.msg_type.value} without <info> names no area of {county}"
            raise IngestError(Reason.NO_TARGET_IN_DISTRICT, detail, ident)
        event_type = events.TEST_EVENT if test else NO_INFO_EVENT_TYPE
        request = _request(
            message, msg_type, test, level=4, text="", ttl_s=default_ttl_s, event_type=event_type
        )
        return _result(message, request, None, "no <info>", False, [], notes)
    info, path = choice.info, f"info[{choice.index}]"
    # An Update whose expires has passed ends what it references (a tsunami centre's last word:
    # urgency Past, expires = sent); like a Cancel it needs no area and no text.
    ending = msg_type is MsgType.UPDATE and info.expires is not None and info.expires <= now
    if not choice.targets and msg_type is not MsgType.CANCEL and not ending:
        seen = "; ".join(choice.ignored[:5]) or "no geocode, polygon or circle"
        detail = f"{path}: no area of district {county} ({seen})"
        raise IngestError(Reason.NO_TARGET_IN_DISTRICT, detail, ident)
    event_type, source = _event_type(info, path, message.status, test, names, notes)
    text, truncated = _compose_text(info)
    if not text and msg_type is not MsgType.CANCEL and not ending:
        detail = f"{path}: no headline, description, instruction or event to broadcast"
        raise IngestError(Reason.SCHEMA, detail, ident)
    ttl_s = default_ttl_s
    if info.expires is not None:
        remaining = (info.expires - now).total_seconds()
        if remaining <= 0 and msg_type is not MsgType.CANCEL:
            detail = f"{path}/expires: {info.expires.isoformat()} is {-remaining:.0f} s in the past"
            if ending:
                level, cancel = LEVEL_BY_SEVERITY[info.severity], MsgType.CANCEL
                request = _request(
                    message, cancel, test, level=level, text="", ttl_s=default_ttl_s, event_type=event_type
                )
                ended = _result(message, request, choice, source, truncated, choice.ignored, notes)
                raise EndingUpdate(detail, ended)
            raise IngestError(Reason.EXPIRED, detail, ident)
        if remaining > MAX_TTL_S:
            notes.append(f"{path}/expires is {remaining:.0f} s away; ttl capped at {MAX_TTL_S:.0f} s")
        ttl_s = min(remaining, MAX_TTL_S) if remaining > 0 else default_ttl_s
    request = _request(
        message,
        msg_type,
        test,
        level=LEVEL_BY_SEVERITY[info.severity],
        text=text,
        ttl_s=ttl_s,
        event_type=event_type,
        targets=choice.targets,
        language=info.language,
    )
    if len(choice.ignored) > MAX_LISTED_IGNORED:
        notes.append(f"{len(choice.ignored)} geocodes ignored, the first {MAX_LISTED_IGNORED} listed")
    return _result(message, request, choice, source, truncated, choice.ignored, notes)


def _request(
    message: CapMessage,
    msg_type: MsgType,
    test: bool,
    *,
    level: int,
    text: str,
    ttl_s: float,
    event_type: str,
    targets: list[Target] | None = None,
    language: str | None = None,
) -> AlertRequest:
    return AlertRequest(
        identifier=message.identifier,
        sender=message.sender,
        msg_type=msg_type,
        references=[r.identifier for r in message.references],
        level=level,
        event_type=event_type,
        targets=targets or [],
        text=text,
        test=test,
        ttl_s=ttl_s,
        origin=Origin.DISTRICT,
        language=language,
    )


def _result(
    message: CapMessage,
    request: AlertRequest,
    choice: _Choice | None,
    source: str,
    truncated: bool,
    ignored: list[str],
    notes: list[str],
) -> CapAlert:
    info = choice.info if choice else None
    return CapAlert(
        request=request,
        identifier=message.identifier,
        sender=message.sender,
        sent=message.sent,
        status=message.status,
        msg_type=message.msg_type,
        scope=message.scope,
        references=message.references,
        expires=info.expires if info else None,
        effective=info.effective if info else None,
        onset=info.onset if info else None,
        language=info.language if info else None,
        info_index=choice.index if choice else None,
        event_type_source=source,
        signatures=message.signatures,
        text_truncated=truncated,
        ignored_geocodes=tuple(ignored[:MAX_LISTED_IGNORED]),
        notes=tuple(notes),
        message=message,
    )


def _choose_info(infos: tuple[Info, ...], county: str, identifier: str) -> _Choice | None:
    """Prefer zh-CN, then zh*; within those, the first naming a district area, then any target."""
    if not infos:
        return None
    languages = [(info.language or "").lower() for info in infos]
    group = (
        [i for i, lang in enumerate(languages) if lang == "zh-cn"]
        or [i for i, lang in enumerate(languages) if lang == "zh" or lang.startswith("zh-")]
        or list(range(len(infos)))
    )
    choices = [_targets(i, infos[i], county, identifier) for i in group]
    return (
        next((c for c in choices if c.area_codes), None)
        or next((c for c in choices if c.targets), None)
        or choices[0]
    )


def _targets(index: int, info: Info, county: str, identifier: str) -> _Choice:
    """Every target of one info block; geocodes outside the district are listed as ignored."""
    targets: list[Target] = []
    ignored: list[str] = []
    codes: set[str] = set()
    for a, area in enumerate(info.areas):
        where = f"info[{index}]/area[{a}]"
        for p, points in enumerate(area.polygons):
            try:
                targets.append(PolygonTarget(points=list(points)))
            except ValidationError as exc:
                raise _invalid(exc, f"{where}/polygon[{p}]", identifier) from None
        for c, circle in enumerate(area.circles):
            try:
                targets.append(CircleTarget(lat=circle.lat, lon=circle.lon, radius_km=circle.radius_km))
            except ValidationError as exc:
                raise _invalid(exc, f"{where}/circle[{c}]", identifier) from None
        for g, geocode in enumerate(area.geocodes):
            code = geocode.value
            if _is_district_area(code, county):
                if code not in codes:
                    codes.add(code)
                    targets.append(CodeTarget(kind="area", code=code))
            else:
                ignored.append(f"{where}/geocode[{g}] {geocode.value_name[:40]}={geocode.value[:40]}")
    return _Choice(index, info, targets, len(codes), ignored)


def _invalid(exc: ValidationError, where: str, identifier: str) -> IngestError:
    return IngestError(Reason.SCHEMA, f"{where}: {exc.errors()[0]['msg']}", identifier)


def _is_district_area(code: str, county: str) -> bool:
    if len(code) != 12 or not (code.isascii() and code.isdigit()) or not code.startswith(county):
        return False
    try:
        check_area_code(code)
    except CodeError:
        return False
    return True


def _event_type(
    info: Info, path: str, status: Status, test: bool, names: frozenset[str], notes: list[str]
) -> tuple[str, str]:
    """The event type and where it came from: an eventCode, the test status, or the category."""
    for i, code in enumerate(info.event_codes):
        if _normalised(code.value_name) not in names:
            continue
        value = code.value.upper()
        if events.lookup(value) is not None:
            return value, f"{path}/eventCode[{i}] {code.value_name[:40]}"
        notes.append(f"{path}/eventCode[{i}] {code.value_name[:40]}={code.value[:20]!r} is not an event type")
    if test:
        return events.TEST_EVENT, f"alert/status {status.value}"
    category = info.categories[0]
    return CATEGORY_EVENT_TYPES[category], f"{path}/category {category.value}"


def _compose_text(info: Info) -> tuple[str, bool]:
    """Headline, description and instruction (else the event), tidied and cut to fit."""
    parts = [p for p in (info.headline, info.description, info.instruction) if p] or [info.event]
    text = "\n".join(_AROUND_NEWLINES.sub("\n", _SPACES.sub(" ", p)).strip() for p in parts).strip()
    if len(text) <= MAX_TEXT_CHARS:
        return text, False
    return text[: MAX_TEXT_CHARS - 1] + "…", True


def _normalised(value_name: str) -> str:
    return "".join(ch for ch in value_name.casefold() if ch.isalnum())
