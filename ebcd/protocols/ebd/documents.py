"""The EBD XML documents, read (defused: no DOCTYPE, no entity) and written.

Element names are those the GS beans serialise (FIELD-PROTOCOLS.md section 3). Times are
`yyyy-MM-dd HH:mm:ss` in the sender's local time; this module reads and writes naive datetimes and
leaves the zone to its caller.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # builds our own documents; parsing is defused
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap_xml import Element, parse_xml
from ebcd.protocols.ebd import EbdError, ResultCode

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
EBD_TYPES = frozenset(
    {
        "EBM", "OMDRequest", "EBMStateRequest", "EBMStateResponse", "EBMBrdLog", "EBDResponse",
        "EBRPSInfo", "EBRSTInfo", "EBRASInfo", "EBRBSInfo", "EBRDTInfo", "EBRPSState", "EBRASState",
        "EBRBSState", "EBRDTState", "ConnectionCheck",
    }
)  # fmt: skip
_EBDID = re.compile(r"^(\d{36}|\d{41})$")  # LS's 36 digits (18-digit old-draft EBRID) and GS's 41
_EBRID = re.compile(r"^(\d{18}|\d{23})$")
_EBMID = re.compile(r"^\d{1,64}$")
_AREA = re.compile(r"^\d{12}$")


# -- reading ----------------------------------------------------------------------------------


def child(el: Element, *path: str) -> Element | None:
    """The first descendant along `path` of element names, or None."""
    for name in path:
        found = next((c for c in el.children if c.name == name), None)
        if found is None:
            return None
        el = found
    return el


def child_text(el: Element, *path: str) -> str | None:
    """The stripped text of the element at `path`, or None if it is missing."""
    found = child(el, *path)
    return None if found is None else found.text.strip()


def as_dict(el: Element) -> Any:
    """An element as plain data (text for a leaf; repeated names become lists), for printing."""
    if not el.children:
        return el.text.strip()
    out: dict[str, Any] = {}
    for c in el.children:
        value = as_dict(c)
        if c.name in out:
            prev = out[c.name]
            out[c.name] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[c.name] = value
    return out


@dataclass(frozen=True, slots=True)
class Header:
    """The EBD envelope."""

    ebdid: str
    ebd_type: str
    src: str
    dest: str | None
    time: str
    version: str = "1"
    src_url: str | None = None
    related: str | None = None


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed EBDB: its envelope and the element named by its EBDType (None if absent)."""

    header: Header
    body: Element | None


def _missing(detail: str, ebdid: str | None = None) -> EbdError:
    return EbdError(ResultCode.MISSING_CONTENT, Reason.MISSING_CONTENT, detail, ebdid)


def _schema(detail: str, ebdid: str | None = None) -> EbdError:
    return EbdError(ResultCode.PARSE_FAILURE, Reason.SCHEMA, detail, ebdid)


def parse_document(ebdb: bytes, name: str = "EBDB") -> Document:
    """An EBDB file's envelope and body, or EbdError (2 parse failure, 3 missing content)."""
    try:
        doc = parse_xml(ebdb)
    except IngestError as e:
        code = ResultCode.OTHER if e.reason is Reason.TOO_LARGE else ResultCode.PARSE_FAILURE
        raise EbdError(code, e.reason, f"{name}: {e.detail}") from None
    root = doc.root
    if root.name != "EBD":
        raise _schema(f"{name}: root element <{root.name}>, expected <EBD>")
    ebdid = child_text(root, "EBDID")
    if not ebdid:
        raise _missing(f"{name}: no <EBDID>")
    if not _EBDID.match(ebdid):
        raise _schema(f"{name}: EBDID {ebdid[:60]!r} is not 36 or 41 digits")
    ebd_type = child_text(root, "EBDType")
    if not ebd_type:
        raise _missing(f"{name}: no <EBDType>", ebdid)
    if ebd_type not in EBD_TYPES:
        raise _schema(f"{name}: EBDType {ebd_type[:40]!r} is not one ebcd knows", ebdid)
    src = child_text(root, "SRC", "EBRID")
    if not src:
        raise _missing(f"{name}: no <SRC><EBRID>", ebdid)
    if not _EBRID.match(src):
        raise _schema(f"{name}: SRC/EBRID {src[:40]!r} is not an 18- or 23-digit resource code", ebdid)
    header = Header(
        ebdid=ebdid,
        ebd_type=ebd_type,
        src=src,
        dest=child_text(root, "DEST", "EBRID"),
        time=child_text(root, "EBDTime") or "",
        version=child_text(root, "EBDVersion") or "1",
        src_url=child_text(root, "SRC", "URL"),
        related=child_text(root, "RelatedEBD", "EBDID"),
    )
    return Document(header, child(root, ebd_type))


def parse_time(text: str | None, what: str, ebdid: str | None) -> datetime | None:
    """A `yyyy-MM-dd HH:mm:ss` time (naive), None when absent; EbdError when unreadable."""
    if not text:
        return None
    try:
        return datetime.strptime(text.strip(), TIME_FORMAT)
    except ValueError:
        raise _schema(f"{what} {text[:40]!r} is not yyyy-MM-dd HH:mm:ss", ebdid) from None


@dataclass(frozen=True, slots=True)
class Auxiliary:
    """An auxiliary item of an EBM: its type, its description (an EBDR_ file name for audio), size."""

    type: str
    desc: str
    size: str | None


@dataclass(frozen=True, slots=True)
class Ebm:
    """An EBM (broadcast message) as the platform above sent it."""

    ebmid: str
    msg_type: int
    related_ebmid: str | None
    sender_name: str | None
    sender_code: str | None
    event_type: str | None
    severity: int | None
    start: datetime | None
    end: datetime | None
    language: str | None
    title: str
    desc: str
    area_codes: tuple[str, ...]
    auxiliaries: tuple[Auxiliary, ...] = field(default_factory=tuple)


def parse_ebm(body: Element | None, ebdid: str) -> Ebm:
    """The EBM of a document of EBDType EBM, or EbdError saying which field is missing or wrong."""
    if body is None:
        raise _missing("EBD of type EBM has no <EBM>", ebdid)
    ebmid = child_text(body, "EBMID")
    if not ebmid:
        raise _missing("EBM: no <EBMID>", ebdid)
    if not _EBMID.match(ebmid):
        raise _schema(f"EBM/EBMID {ebmid[:60]!r} is not digits", ebdid)
    info = child(body, "MsgBasicInfo")
    if info is None:
        raise _missing(f"EBM {ebmid}: no <MsgBasicInfo>", ebdid)
    msg_type = _int(child_text(info, "MsgType"), f"EBM {ebmid} MsgType", ebdid, required=True)
    assert msg_type is not None  # noqa: S101 -- required=True
    if msg_type not in (1, 2, 3, 4, 5):
        raise _schema(f"EBM {ebmid}: MsgType {msg_type} is not 1 (live), 2 (cancel) or 3-5 (drills)", ebdid)
    content = child(body, "MsgContent")
    areas_text = (child_text(content, "AreaCode") if content is not None else None) or ""
    areas = tuple(a.strip() for a in re.split(r"[,，;\s]+", areas_text) if a.strip())
    for a in areas:
        if not _AREA.match(a):
            raise _schema(f"EBM {ebmid}: AreaCode {a[:40]!r} is not a 12-digit area code", ebdid)
    auxiliaries = tuple(
        Auxiliary(child_text(a, "AuxiliaryType") or "", child_text(a, "AuxiliaryDesc") or "",
                  child_text(a, "Size"))
        for a in (content.children if content is not None else [])
        if a.name == "Auxiliary"
    )  # fmt: skip
    ebm = Ebm(
        ebmid=ebmid,
        msg_type=msg_type,
        related_ebmid=child_text(body, "RelatedInfo", "EBMID") or None,
        sender_name=child_text(info, "SenderName"),
        sender_code=child_text(info, "SenderCode"),
        event_type=child_text(info, "EventType"),
        severity=_int(child_text(info, "Severity"), f"EBM {ebmid} Severity", ebdid),
        start=parse_time(child_text(info, "StartTime"), f"EBM {ebmid} StartTime", ebdid),
        end=parse_time(child_text(info, "EndTime"), f"EBM {ebmid} EndTime", ebdid),
        language=child_text(content, "LanguageCode") if content is not None else None,
        title=(child_text(content, "MsgTitle") if content is not None else None) or "",
        desc=(child_text(content, "MsgDesc") if content is not None else None) or "",
        area_codes=areas,
        auxiliaries=auxiliaries,
    )
    if msg_type == 2:
        if not ebm.related_ebmid:
            raise _missing(f"EBM {ebmid}: a cancel (MsgType 2) names no <RelatedInfo><EBMID>", ebdid)
    elif content is None:
        raise _missing(f"EBM {ebmid}: no <MsgContent>", ebdid)
    elif not areas:
        raise _missing(f"EBM {ebmid}: no <AreaCode> in <MsgContent>", ebdid)
    return ebm


def _int(text: str | None, what: str, ebdid: str, *, required: bool = False) -> int | None:
    if not text:
        if required:
            raise _missing(f"{what} is missing", ebdid)
        return None
    if not text.isdigit() or len(text) > 4:
        raise _schema(f"{what} {text[:20]!r} is not a number", ebdid)
    return int(text)


# -- writing ----------------------------------------------------------------------------------


def xml_bytes(root: ET.Element) -> bytes:
    """A document with its UTF-8 declaration."""
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def sub(parent: ET.Element, name: str, text: object | None = None) -> ET.Element:
    """A child element with optional text."""
    el = ET.SubElement(parent, name)
    if text is not None:
        el.text = str(text)
    return el


def build(header: Header, body: ET.Element) -> bytes:
    """An EBDB document: the envelope of `header` around `body` (named by header.ebd_type)."""
    root = ET.Element("EBD")
    sub(root, "EBDVersion", header.version)
    sub(root, "EBDID", header.ebdid)
    sub(root, "EBDType", header.ebd_type)
    src = sub(root, "SRC")
    sub(src, "EBRID", header.src)
    if header.src_url:
        sub(src, "URL", header.src_url)
    if header.dest:
        sub(sub(root, "DEST"), "EBRID", header.dest)
    sub(root, "EBDTime", header.time)
    if header.related:
        sub(sub(root, "RelatedEBD"), "EBDID", header.related)
    root.append(body)
    return xml_bytes(root)


def response_body(code: ResultCode, desc: str) -> ET.Element:
    """The <EBDResponse> element."""
    body = ET.Element("EBDResponse")
    sub(body, "ResultCode", int(code))
    sub(body, "ResultDesc", desc)
    return body


def ebm_body(ebm: Ebm) -> ET.Element:
    """The <EBM> element of an EBM (what the platform above sends; the simulator uses it)."""
    body = ET.Element("EBM")
    sub(body, "EBMVersion", 1)
    sub(body, "EBMID", ebm.ebmid)
    if ebm.related_ebmid:
        sub(sub(body, "RelatedInfo"), "EBMID", ebm.related_ebmid)
    info = sub(body, "MsgBasicInfo")
    sub(info, "MsgType", ebm.msg_type)
    for name, value in (
        ("SenderName", ebm.sender_name),
        ("SenderCode", ebm.sender_code),
        ("EventType", ebm.event_type),
        ("Severity", ebm.severity),
        ("StartTime", ebm.start.strftime(TIME_FORMAT) if ebm.start else None),
        ("EndTime", ebm.end.strftime(TIME_FORMAT) if ebm.end else None),
    ):
        if value is not None:
            sub(info, name, value)
    if ebm.area_codes or ebm.title or ebm.desc:
        content = sub(body, "MsgContent")
        sub(content, "LanguageCode", ebm.language or "zho")
        sub(content, "MsgTitle", ebm.title)
        sub(content, "MsgDesc", ebm.desc)
        sub(content, "AreaCode", ",".join(ebm.area_codes))
        for aux in ebm.auxiliaries:
            a = sub(content, "Auxiliary")
            sub(a, "AuxiliaryType", aux.type)
            sub(a, "AuxiliaryDesc", aux.desc)
            if aux.size is not None:
                sub(a, "Size", aux.size)
    return body
