"""CAP documents for the tests: the fixture folders, a district rewrite, and a small template."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cap"
VALID = sorted((FIXTURES / "valid").glob("*.xml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.xml"))

DISTRICT = "341523000000"
DISTRICT_VILLAGE = "341523101001"
DISTRICT_TOWN = "341523101000"
CST = timezone(timedelta(hours=8))
SENT = datetime(2024, 7, 1, 8, 0, tzinfo=CST)
NOW = SENT + timedelta(minutes=5)

_AREA = re.compile(rb"<((?:[\w.-]+:)?)area>(.*?)</\1area>", re.S)


def into_district(document: bytes, code: str = DISTRICT_TOWN) -> bytes:
    """Add a geocode `AreaCode=code` to every `<area>`, where the schema allows it."""

    def add(match: re.Match[bytes]) -> bytes:
        p, body = match.group(1), match.group(2)
        geocode = b"<%sgeocode><%svalueName>AreaCode</%svalueName><%svalue>%s</%svalue></%sgeocode>" % (
            p,
            p,
            p,
            p,
            code.encode(),
            p,
            p,
        )
        after = re.search(rb"<%s(?:altitude|ceiling)>" % re.escape(p), body)
        body = body[: after.start()] + geocode + body[after.start() :] if after else body + geocode
        return b"<%sarea>%s</%sarea>" % (p, body, p)

    return _AREA.sub(add, document)


def area(
    desc: str = "某县某镇",
    *,
    polygons: Iterable[str] = (),
    circles: Iterable[str] = (),
    geocodes: Iterable[tuple[str, str]] = (("AreaCode", DISTRICT_TOWN),),
) -> str:
    """One `<area>` element."""
    return (
        f"<area><areaDesc>{desc}</areaDesc>"
        + "".join(f"<polygon>{p}</polygon>" for p in polygons)
        + "".join(f"<circle>{c}</circle>" for c in circles)
        + "".join(f"<geocode><valueName>{n}</valueName><value>{v}</value></geocode>" for n, v in geocodes)
        + "</area>"
    )


def info(
    *,
    language: str | None = "zh-CN",
    categories: Iterable[str] = ("Met",),
    event: str = "暴雨",
    urgency: str = "Immediate",
    severity: str = "Severe",
    certainty: str = "Observed",
    event_codes: Iterable[tuple[str, str]] = (),
    expires: str | None = "2024-07-01T20:00:00+08:00",
    headline: str | None = "暴雨红色预警",
    description: str | None = "预计未来3小时内将出现100毫米以上降雨。",
    instruction: str | None = "请立即转移到安全地带。",
    areas: Iterable[str] | None = None,
    extra: str = "",
) -> str:
    """One `<info>` element, Chinese by default, for the district's town 101."""
    parts = [f"<language>{language}</language>" if language is not None else ""]
    parts += [f"<category>{c}</category>" for c in categories]
    parts += [f"<event>{event}</event>", f"<urgency>{urgency}</urgency>"]
    parts += [f"<severity>{severity}</severity>", f"<certainty>{certainty}</certainty>"]
    parts += [f"<eventCode><valueName>{n}</valueName><value>{v}</value></eventCode>" for n, v in event_codes]
    parts += [f"<expires>{expires}</expires>" if expires is not None else ""]
    parts += [f"<headline>{headline}</headline>" if headline is not None else ""]
    parts += [f"<description>{description}</description>" if description is not None else ""]
    parts += [f"<instruction>{instruction}</instruction>" if instruction is not None else "", extra]
    parts += list(areas if areas is not None else [area()])
    return "<info>" + "".join(parts) + "</info>"


def alert(
    *,
    identifier: str = "GD-20240701-0001",
    sender: str = "warning@example.gov.cn",
    sent: str = "2024-07-01T08:00:00+08:00",
    status: str = "Actual",
    msg_type: str = "Alert",
    scope: str = "Public",
    references: str | None = None,
    infos: Iterable[str] | None = None,
    head: str = "",
    tail: str = "",
) -> bytes:
    """A CAP 1.2 document; `head` goes after `<scope>`, `tail` after the last `<info>`."""
    refs = f"<references>{references}</references>" if references is not None else ""
    body = "".join(infos if infos is not None else [info()])
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">'
        f"<identifier>{identifier}</identifier><sender>{sender}</sender><sent>{sent}</sent>"
        f"<status>{status}</status><msgType>{msg_type}</msgType><scope>{scope}</scope>"
        f"{head}{refs}{body}{tail}</alert>"
    ).encode()


EDXL_DE = "urn:oasis:names:tc:emergency:EDXL:DE:1.0"


def strip_declaration(document: bytes) -> bytes:
    """A document without its XML declaration, ready to be embedded in another."""
    return re.sub(rb"\A<\?xml[^>]*\?>\s*", b"", document)


def envelope(*contents: bytes | str, distribution_id: str = "EDXL-0001", head: str = "") -> bytes:
    """An EDXL-DE 1.0 distribution; each content is a CAP document to embed (bytes) or the XML of
    a whole `<contentObject>` (str)."""
    objects = []
    for content in contents:
        if isinstance(content, str):
            objects.append(content.encode())
            continue
        objects.append(
            b"<contentObject><contentDescription>CAP</contentDescription><xmlContent><embeddedXMLContent>"
            + strip_declaration(content)
            + b"</embeddedXMLContent></xmlContent></contentObject>"
        )
    return (
        (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<EDXLDistribution xmlns="{EDXL_DE}"{head}>'
            f"<distributionID>{distribution_id}</distributionID><senderID>ews@example.gov.cn</senderID>"
            "<dateTimeSent>2024-07-01T08:00:00+08:00</dateTimeSent><distributionStatus>Actual</distributionStatus>"
            "<distributionType>Report</distributionType><combinedConfidentiality>UNCLASSIFIED</combinedConfidentiality>"
        ).encode()
        + b"".join(objects)
        + b"</EDXLDistribution>"
    )
