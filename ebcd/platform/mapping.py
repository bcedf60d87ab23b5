"""An EBM from above as an alert request, pure: what plays where, how urgent, from when, until when.

MsgType 1            -> an alert                       (live broadcast)
MsgType 3, 4, 5      -> an alert with test = true      (platform, front-end, terminal drill)
MsgType 2            -> a cancel of RelatedInfo/EBMID
EBMID                -> identifier (de-duplicated with the SRC EBRID as sender)
Severity 1..4        -> level;  EventType -> event_type
MsgTitle + MsgDesc   -> text ("title：desc"; either alone when the other is empty)
AreaCode             -> area targets: codes of the district (or of a town or village in it);
                        a code of the city or province that holds the district -> the whole
                        district; codes of other districts are left to their platforms
StartTime / EndTime  -> the sender's local time ([ebd] timezone): the time to live runs from
                        the later of now and StartTime to EndTime; a StartTime in the future
                        holds the broadcast until then
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from ebcd.ingest import Reason
from ebcd.model.alert import MAX_TEXT_CHARS, MAX_TTL_S, AlertRequest, CodeTarget, MsgType
from ebcd.model.events import TEST_EVENT
from ebcd.protocols.ebd import EbdError, ResultCode
from ebcd.protocols.ebd.documents import Ebm

DRILLS = frozenset({3, 4, 5})
CANCEL = 2
_SIGNIFICANT = {"province": 2, "city": 4, "county": 6}


@dataclass(frozen=True, slots=True)
class Mapped:
    """The request an EBM asks for, and when it may start (UTC seconds; None: now)."""

    request: AlertRequest
    starts_at: float | None


def _refuse(reason: Reason, detail: str, ebdid: str) -> EbdError:
    return EbdError(ResultCode.OTHER, reason, detail, ebdid)


def significant(area: str) -> str:
    """The digits of a 12-digit area code that name it (province 2, city 4, county 6, town 9, village 12)."""
    if area.endswith("0000000000"):
        return area[:2]
    if area.endswith("00000000"):
        return area[:4]
    if area.endswith("000000"):
        return area[:6]
    if area.endswith("000"):
        return area[:9]
    return area


def district_targets(areas: tuple[str, ...], district_area: str) -> list[str]:
    """The area codes of `areas` that reach into the district (a holder of the district: its own code)."""
    county = district_area[:6]
    out: list[str] = []
    for area in areas:
        sig = significant(area)
        if len(sig) <= 6 and county.startswith(sig):
            code = district_area  # the district, or a city or province that holds it
        elif area.startswith(county):
            code = area
        else:
            continue
        if code not in out:
            out.append(code)
    return out


def to_request(
    ebm: Ebm,
    *,
    sender: str,
    ebdid: str,
    zone: ZoneInfo,
    now: float,
    district_area: str,
    default_ttl_s: float,
    start_slack_s: float,
) -> Mapped:
    """The alert request of an EBM, or EbdError(5) with the reason it is refused for."""
    if ebm.msg_type == CANCEL:
        request = _validated(
            {
                "identifier": ebm.ebmid,
                "sender": sender,
                "msg_type": MsgType.CANCEL,
                "references": [f"{sender},{ebm.related_ebmid}"],
                "level": ebm.severity if ebm.severity in (1, 2, 3, 4) else 4,
                "event_type": ebm.event_type or TEST_EVENT,
            },
            ebm,
            ebdid,
        )
        return Mapped(request, None)
    if ebm.severity is None:
        raise EbdError(
            ResultCode.MISSING_CONTENT, Reason.MISSING_CONTENT, f"EBM {ebm.ebmid}: no Severity", ebdid
        )
    if ebm.severity not in (1, 2, 3, 4):
        raise _refuse(Reason.SCHEMA, f"EBM {ebm.ebmid}: Severity {ebm.severity} is not 1..4", ebdid)
    if not ebm.event_type:
        raise EbdError(
            ResultCode.MISSING_CONTENT, Reason.MISSING_CONTENT, f"EBM {ebm.ebmid}: no EventType", ebdid
        )
    targets = district_targets(ebm.area_codes, district_area)
    if not targets:
        raise _refuse(
            Reason.NO_TARGET_IN_DISTRICT,
            f"EBM {ebm.ebmid}: AreaCode {','.join(ebm.area_codes)[:200]} names no area of district "
            f"{district_area}",
            ebdid,
        )
    start = _utc(ebm.start, zone)
    end = _utc(ebm.end, zone)
    if end is not None and start is not None and end <= start:
        raise _refuse(Reason.SCHEMA, f"EBM {ebm.ebmid}: EndTime is not after StartTime", ebdid)
    if end is not None and end <= now:
        raise _refuse(
            Reason.EXPIRED,
            f"EBM {ebm.ebmid}: EndTime {ebm.end} ({zone.key}) has passed",
            ebdid,
        )
    starts_at = start if start is not None and start - now > start_slack_s else None
    begin = max(now, start or now)
    ttl = (end - begin) if end is not None else default_ttl_s
    if ttl > MAX_TTL_S:
        raise _refuse(
            Reason.SCHEMA, f"EBM {ebm.ebmid}: lasts {ttl:.0f} s, more than {MAX_TTL_S:.0f} s", ebdid
        )
    text = "：".join(t for t in (ebm.title.strip(), ebm.desc.strip()) if t)
    if len(text) > MAX_TEXT_CHARS:
        raise _refuse(
            Reason.SCHEMA,
            f"EBM {ebm.ebmid}: MsgTitle + MsgDesc are {len(text)} characters, more than {MAX_TEXT_CHARS}",
            ebdid,
        )
    request = _validated(
        {
            "identifier": ebm.ebmid,
            "sender": sender,
            "level": ebm.severity,
            "event_type": ebm.event_type,
            "targets": [CodeTarget(kind="area", code=c) for c in targets],
            "text": text,
            "test": ebm.msg_type in DRILLS,
            "ttl_s": ttl,
            "language": ebm.language,
        },
        ebm,
        ebdid,
    )
    return Mapped(request, starts_at)


def _utc(local: datetime | None, zone: ZoneInfo) -> float | None:
    return None if local is None else local.replace(tzinfo=zone).timestamp()


def _validated(values: dict[str, object], ebm: Ebm, ebdid: str) -> AlertRequest:
    try:
        return AlertRequest.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "EBM"
        reason = Reason.UNKNOWN_EVENT if "event" in field else Reason.SCHEMA
        raise _refuse(reason, f"EBM {ebm.ebmid}: {field}: {first['msg']}", ebdid) from None
