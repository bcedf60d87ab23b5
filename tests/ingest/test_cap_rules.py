"""CAP 1.2 rules: structure, enumerations, times, references, geometry, each with its path."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cap_docs import DISTRICT, NOW, alert, area, info

from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap import parse_cap
from ebcd.ingest.cap_model import CapReference, Circle
from ebcd.ingest.cap_rules import read_cap

SQUARE = "31.0,117.0 31.0,117.1 31.1,117.1 31.1,117.0 31.0,117.0"


def detail_of(document: bytes) -> str:
    """The detail of the SCHEMA refusal of a document."""
    with pytest.raises(IngestError) as caught:
        parse_cap(document, district_area=DISTRICT, now=NOW)
    assert caught.value.reason is Reason.SCHEMA, caught.value
    return caught.value.detail


BROKEN = {
    "status": (alert(status="Live"), "alert/status: 'Live' is not one of Actual, Exercise, System"),
    "msgType": (alert(msg_type="Alarm"), "alert/msgType: 'Alarm' is not one of Alert, Update"),
    "scope": (alert(scope="Everyone"), "alert/scope: 'Everyone' is not one of Public"),
    "severity": (alert(infos=[info(severity="High")]), "info[0]/severity: 'High' is not one of Extreme"),
    "urgency": (alert(infos=[info(urgency="")]), "info[0]/urgency: '' is not one of Immediate"),
    "certainty": (alert(infos=[info(certainty="Sure")]), "info[0]/certainty: 'Sure' is not one of"),
    "category": (alert(infos=[info(categories=["Met", "Weather"])]), "info[0]/category[1]: 'Weather'"),
    "responseType": (
        alert(infos=[info(extra="")]).replace(b"<urgency>", b"<responseType>Run</responseType><urgency>"),
        "info[0]/responseType[0]: 'Run' is not one of Shelter",
    ),
    "sent-no-offset": (
        alert(sent="2024-07-01T08:00:00"),
        "alert/sent: '2024-07-01T08:00:00' is not a CAP time",
    ),
    "sent-zulu": (alert(sent="2024-07-01T00:00:00Z"), "alert/sent: '2024-07-01T00:00:00Z' is not a CAP time"),
    "sent-fraction": (alert(sent="2024-07-01T08:00:00.5+08:00"), "is not a CAP time"),
    "sent-comma": (alert(sent="2024-07-01T08:00:00,08:00"), "is not a CAP time"),
    "sent-13th-month": (
        alert(sent="2024-13-01T08:00:00+08:00"),
        "alert/sent: 2024-13-01T08:00:00+08:00: month",
    ),
    "sent-offset-15h": (alert(sent="2024-07-01T08:00:00+15:00"), "alert/sent: offset +15:00 is out of range"),
    "expires-no-offset": (alert(infos=[info(expires="2024-07-01T20:00:00")]), "info[0]/expires: "),
    "missing-identifier": (
        alert().replace(b"<identifier>GD-20240701-0001</identifier>", b""),
        "alert: missing required <identifier> (before <sender>)",
    ),
    "identifier-space": (
        alert(identifier="GD 1"),
        "alert/identifier: 'GD 1' must be non-empty, without spaces",
    ),
    "sender-comma": (alert(sender="a,b"), "alert/sender: 'a,b' must be non-empty"),
    "empty-identifier": (alert(identifier=""), "alert/identifier: '' must be non-empty"),
    "missing-scope": (alert().replace(b"<scope>Public</scope>", b""), "alert: missing required <scope>"),
    "two-statuses": (
        alert().replace(b"<msgType>", b"<status>Test</status><msgType>"),
        "alert: more than one <status>",
    ),
    "out-of-order": (
        alert()
        .replace(b"<sender>warning@example.gov.cn</sender>", b"")
        .replace(b"<status>", b"<sender>warning@example.gov.cn</sender><status>"),
        "alert: missing required <sender> (before <sent>)",
    ),
    "unknown-element": (alert(head="<priority>1</priority>"), "alert: <priority> is not a CAP 1.2 element"),
    "foreign-element": (
        alert(head='<x xmlns="urn:other"/>'),
        "alert: element <{urn:other}x> is not part of CAP 1.2",
    ),
    "element-after-signature": (
        alert(tail='<Signature xmlns="http://www.w3.org/2000/09/xmldsig#"/><note>late</note>'),
        "alert: <note> after the XML-DSig elements",
    ),
    "signature-inside-info": (
        alert(infos=[info(extra='<Signature xmlns="http://www.w3.org/2000/09/xmldsig#"/>')]),
        "info[0]: element <{http://www.w3.org/2000/09/xmldsig#}Signature> is not part of CAP 1.2",
    ),
    "text-in-complex": (alert(head="stray text"), "alert: text 'stray text' where only elements belong"),
    "element-in-simple": (alert(head="<note><b>bold</b></note>"), "alert/note: holds elements"),
    "info-without-category": (alert(infos=[info(categories=[])]), "info[0]: missing required <category>"),
    "info-without-event": (
        alert(infos=[info().replace("<event>暴雨</event>", "")]),
        "info[0]: missing required <event> (before <urgency>)",
    ),
    "info-without-urgency": (alert(infos=[info().replace("<urgency>Immediate</urgency>", "")]), "<urgency>"),
    "info-without-severity": (alert(infos=[info().replace("<severity>Severe</severity>", "")]), "<severity>"),
    "info-without-certainty": (
        alert(infos=[info().replace("<certainty>Observed</certainty>", "")]),
        "<certainty>",
    ),
    "area-without-desc": (
        alert(infos=[info(areas=[area().replace("<areaDesc>某县某镇</areaDesc>", "")])]),
        "info[0]/area[0]: missing required <areaDesc> (before <geocode>)",
    ),
    "geocode-without-value": (
        alert(infos=[info(areas=[area().replace("<value>341523101000</value>", "")])]),
        "info[0]/area[0]/geocode[0]: missing required <value>",
    ),
    "polygon-3-points": (
        alert(infos=[info(areas=[area(polygons=["31,117 31,118 32,118"])])]),
        "info[0]/area[0]/polygon[0]: 3 points, a polygon needs at least 4",
    ),
    "polygon-empty": (
        alert(infos=[info(areas=[area(polygons=[""])])]),
        "info[0]/area[0]/polygon[0]: 0 points, a polygon needs at least 4",
    ),
    "polygon-open": (
        alert(infos=[info(areas=[area(), area(polygons=["31,117 31,118 32,118 32,117"])])]),
        "info[0]/area[1]/polygon[0]: first point (31.0, 117.0) differs from last point (32.0, 117.0)",
    ),
    "polygon-trailing-comma": (
        alert(infos=[info(areas=[area(polygons=["31,117 31,118, 32,118 31,117"])])]),
        "info[0]/area[0]/polygon[0]: '31,118,' is not a lat,lon pair",
    ),
    "polygon-latitude": (
        alert(infos=[info(areas=[area(polygons=["91,117 31,118 32,118 91,117"])])]),
        "info[0]/area[0]/polygon[0]: point 0 91,117 is not a latitude,longitude",
    ),
    "polygon-nan": (
        alert(infos=[info(areas=[area(polygons=["nan,117 31,118 32,118 nan,117"])])]),
        "point 0 'nan,117' is not two decimal numbers",
    ),
    "circle-no-radius": (
        alert(infos=[info(areas=[area(circles=["31.5,117.5"])])]),
        "info[0]/area[0]/circle[0]: '31.5,117.5' is not 'lat,lon radius'",
    ),
    "circle-negative": (
        alert(infos=[info(areas=[area(circles=["31.5,117.5 -1"])])]),
        "info[0]/area[0]/circle[0]: radius -1 km is out of range",
    ),
    "altitude": (
        alert(infos=[info(areas=[area().replace("</area>", "<altitude>high</altitude></area>")])]),
        "info[0]/area[0]/altitude: 'high' is not a decimal number",
    ),
    "language": (
        alert(infos=[info(language="chinese simplified")]),
        "info[0]/language: 'chinese simplified'",
    ),
    "resource-size": (
        alert(infos=[info(extra="")]).replace(
            b"<area>",
            b"<resource><resourceDesc>a</resourceDesc><mimeType>audio/mp3</mimeType>"
            b"<size>big</size></resource><area>",
        ),
        "info[0]/resource[0]/size: 'big' is not an integer",
    ),
    "update-without-references": (alert(msg_type="Update"), "alert/references: msgType Update must name"),
    "cancel-empty-references": (alert(msg_type="Cancel", references=""), "msgType Cancel must name"),
    "ack-without-references": (alert(msg_type="Ack"), "msgType Ack must name"),
    "references-pair": (
        alert(msg_type="Update", references="sender,id"),
        "alert/references[0]: 'sender,id' is not sender,identifier,sent",
    ),
    "references-time": (
        alert(msg_type="Update", references="s,i,2024-07-01T08:00:00+08:00 s,j,yesterday"),
        "alert/references[1]: 'yesterday' is not a CAP time",
    ),
    "private-without-addresses": (alert(scope="Private"), "alert/addresses: required when scope is Private"),
}


@pytest.mark.parametrize(("document", "detail"), BROKEN.values(), ids=BROKEN.keys())
def test_broken_rule_is_refused_with_its_path(document: bytes, detail: str) -> None:
    assert detail in detail_of(document)


def test_refusal_carries_the_identifier() -> None:
    with pytest.raises(IngestError) as caught:
        parse_cap(alert(status="Live"), district_area=DISTRICT, now=NOW)
    assert caught.value.identifier == "GD-20240701-0001"


@pytest.mark.parametrize("offset", ["-00:00", "+00:00"])
def test_utc_may_be_written_either_way(offset: str) -> None:
    message = read_cap(alert(sent=f"2024-07-01T00:00:00{offset}"))
    assert message.sent == datetime(2024, 7, 1, tzinfo=UTC)
    assert message.sent.utcoffset() is not None


def test_references_are_triples() -> None:
    refs = "a@b.cn,GD-1,2024-07-01T07:00:00+08:00\n   c@d.cn,GD-2,2024-07-01T07:30:00-00:00 "
    message = read_cap(alert(msg_type="Update", references=refs))
    assert message.references == (
        CapReference("a@b.cn", "GD-1", datetime(2024, 6, 30, 23, 0, tzinfo=UTC)),
        CapReference("c@d.cn", "GD-2", datetime(2024, 7, 1, 7, 30, tzinfo=UTC)),
    )


def test_an_alert_may_carry_empty_references() -> None:
    assert read_cap(alert(references="")).references == ()


def test_geometry_is_read_as_lat_lon() -> None:
    areas = [area(polygons=[f"  {SQUARE}\n  "], circles=["31.5,117.5 2.5"], geocodes=[])]
    message = read_cap(alert(infos=[info(areas=areas)]))
    parsed = message.infos[0].areas[0]
    assert parsed.polygons[0][0] == (31.0, 117.0)
    assert len(parsed.polygons[0]) == 5
    assert parsed.circles == (Circle(31.5, 117.5, 2.5),)


def test_whitespace_around_values_and_empty_optionals_are_tolerated() -> None:
    document = alert(status="\n  Test  ", head="<note/><incidents></incidents>", infos=[info(expires="")])
    message = read_cap(document)
    assert message.status.value == "Test"
    assert message.note is None
    assert message.incidents is None
    assert message.infos[0].expires is None


def test_attributes_comments_and_processing_instructions_are_ignored() -> None:
    document = alert(head="<!-- a comment --><?pi data?>").replace(b"<status>", b'<status lang="en">')
    assert read_cap(document).status.value == "Actual"


def test_prefixed_namespace_is_the_same_document() -> None:
    text = alert().decode()
    text = text.replace('xmlns="urn', 'xmlns:cap="urn').replace("<", "<cap:").replace("<cap:/", "</cap:")
    text = text.replace("<cap:?xml", "<?xml")
    assert read_cap(text.encode()).identifier == "GD-20240701-0001"
