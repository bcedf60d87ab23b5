"""CAP 1.2 ingest against real documents, hostile input and the clock."""

from __future__ import annotations

import filecmp
import time
from pathlib import Path

import pytest
from cap_docs import DISTRICT, DISTRICT_TOWN, FIXTURES, INVALID, NOW, VALID, alert, into_district

from ebcd.ingest import MAX_PAYLOAD_BYTES, IngestError, Reason
from ebcd.ingest.cap import CapAlert, parse_cap
from ebcd.ingest.cap_model import CapMessage
from ebcd.ingest.cap_rules import read_cap
from ebcd.ingest.cap_xml import MAX_DEPTH, MAX_DETAIL_CHARS, MAX_ELEMENTS
from ebcd.model.alert import CodeTarget, MsgType

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "cap"

# Why each invalid fixture is refused (SOURCES.md), as reason and a piece of the detail.
INVALID_REASONS = {
    "ca-update-empty-references.xml": (Reason.SCHEMA, "alert/references: msgType Update must name"),
    "missing-scope.xml": (Reason.SCHEMA, "alert: missing required <scope>"),
    "oasis-cap10-a1-homeland-security.xml": (Reason.UNSUPPORTED, "CAP 1.0"),
    "oasis-cap11-a1-homeland-security.xml": (Reason.UNSUPPORTED, "CAP 1.1"),
    "se-krisinformation-bad-structure.xml": (Reason.SCHEMA, "info[0]: <senderName> is out of order"),
    "se-smhi-alerts-wrapper.xml": (Reason.SCHEMA, "root element <alerts> is not <alert>"),
    "tw-wrong-namespace.xml": (Reason.SCHEMA, "namespace 'urn:oasis:names:tc:emergency:alerts:1.2'"),
    "us-nws-cap11-empty-enums.xml": (Reason.UNSUPPORTED, "CAP 1.1"),
    "xxe-external-entities.xml": (Reason.FORBIDDEN_XML, "DTDForbidden"),
}


def parse_at_sent(document: bytes) -> CapAlert:
    """Parse as if received when the document was sent (the fixtures are years old)."""
    return parse_cap(document, district_area=DISTRICT, now=read_cap(document).sent)


def refused(document: bytes, **kwargs: object) -> IngestError:
    """The IngestError parse_cap raises for a document."""
    with pytest.raises(IngestError) as info:
        parse_cap(document, district_area=DISTRICT, now=NOW, **kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not checked out")
def test_fixture_copies_match_shared() -> None:
    comparison = filecmp.dircmp(FIXTURES, SHARED)
    assert not comparison.left_only
    assert not comparison.right_only
    assert not comparison.diff_files
    for sub in ("valid", "invalid"):
        sub_cmp = comparison.subdirs[sub]
        assert not sub_cmp.left_only
        assert not sub_cmp.right_only
        assert not sub_cmp.diff_files


def test_every_invalid_fixture_has_an_expected_reason() -> None:
    assert sorted(p.name for p in INVALID) == sorted(INVALID_REASONS)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_reads(path: Path) -> None:
    message = read_cap(path.read_bytes())
    assert isinstance(message, CapMessage)
    assert message.identifier
    assert message.sender
    assert message.sent.utcoffset() is not None
    assert all(r.sent.utcoffset() is not None for r in message.references)
    assert ("signed" in path.name) == bool(message.signatures)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_lies_outside_the_district(path: Path) -> None:
    document = path.read_bytes()
    message = read_cap(document)
    geometry = any(a.polygons or a.circles for i in message.infos for a in i.areas)
    if message.infos and not geometry:
        with pytest.raises(IngestError) as caught:
            parse_at_sent(document)
        assert caught.value.reason is Reason.NO_TARGET_IN_DISTRICT
        assert caught.value.identifier == message.identifier
        return
    result = parse_at_sent(document)
    assert not [t for t in result.request.targets if isinstance(t, CodeTarget)]
    assert result.request.targets or result.request.msg_type is MsgType.CANCEL


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_rewritten_into_the_district_targets_it(path: Path) -> None:
    document = into_district(path.read_bytes())
    result = parse_at_sent(document)
    area_target = CodeTarget(kind="area", code=DISTRICT_TOWN)
    if not result.message.infos:
        assert result.request.msg_type is MsgType.CANCEL
        assert result.request.targets == []
    else:
        assert area_target in result.request.targets
        assert result.request.text
    assert result.request.identifier == result.identifier
    assert result.request.references == [r.identifier for r in result.references]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture_is_refused_with_its_reason(path: Path) -> None:
    reason, detail = INVALID_REASONS[path.name]
    with pytest.raises(IngestError) as info:
        parse_cap(into_district(path.read_bytes()), district_area=DISTRICT, now=NOW)
    assert info.value.reason is reason
    assert detail in info.value.detail


def test_cap11_example_with_the_12_namespace_still_fails_on_mime_type() -> None:
    document = (FIXTURES / "invalid" / "oasis-cap11-a1-homeland-security.xml").read_bytes()
    document = document.replace(b"emergency:cap:1.1", b"emergency:cap:1.2")
    error = refused(document)
    assert error.reason is Reason.SCHEMA
    assert error.detail == "info[0]/resource[0]: missing required <mimeType> (before <uri>)"


def test_noaa_empty_enums_with_the_12_namespace_fail_on_urgency() -> None:
    document = (FIXTURES / "invalid" / "us-nws-cap11-empty-enums.xml").read_bytes()
    error = refused(document.replace(b"emergency:cap:1.1", b"emergency:cap:1.2"))
    assert error.reason is Reason.SCHEMA
    assert error.detail.startswith("info[0]/urgency: '' is not one of Immediate")


def test_signatures_are_found_with_their_exact_bytes() -> None:
    document = (FIXTURES / "valid" / "ca-ec-snowfall-update-signed.xml").read_bytes()
    result = parse_at_sent(into_district(document))
    assert result.has_signature
    assert [s.id for s in result.signatures] == ["NAADS Signature", "Environment Canada"]
    for i in range(len(result.signatures)):
        element = result.signature_element(i)
        assert element.startswith(b"<Signature")
        assert element.endswith(b"</Signature>")
    unsigned = parse_at_sent(
        into_district((FIXTURES / "valid" / "oasis-a2-severe-thunderstorm.xml").read_bytes())
    )
    assert not unsigned.has_signature


def test_prefixed_signature_span() -> None:
    document = (FIXTURES / "valid" / "ipaws-nv-cancel-signed.xml").read_bytes()
    result = parse_at_sent(document)
    element = result.signature_element()
    assert element.startswith(b"<ds:Signature ")
    assert element.endswith(b"</ds:Signature>")
    assert document[result.signatures[0].end :] == b"</alert>"


def test_iso_8859_1_document_is_decoded() -> None:
    document = (FIXTURES / "valid" / "us-usgs-earthquake-iso8859-1-signed.xml").read_bytes()
    assert "Usulután" in parse_at_sent(into_district(document)).request.text


@pytest.mark.parametrize(
    ("encoding", "codec"),
    [
        ("GB2312", "gb2312"),
        ("GBK", "gbk"),
        ("GB18030", "gb18030"),
        ("UTF-16", "utf-16"),
        ("UTF-32", "utf-32"),
    ],
)
def test_chinese_and_utf16_encodings_are_honoured(encoding: str, codec: str) -> None:
    text = alert(tail='<Signature xmlns="http://www.w3.org/2000/09/xmldsig#">签名</Signature>').decode()
    text = text.replace('encoding="UTF-8"', f'encoding="{encoding}"')
    result = parse_cap(text.encode(encoding), district_area=DISTRICT, now=NOW)
    assert result.request.text.startswith("暴雨红色预警")
    assert result.message.transcoded_from == codec
    assert result.message.document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    assert result.signature_element().decode() == text[text.index("<Signature") : text.index("</alert>")]


def test_utf8_with_byte_order_mark_is_parsed_as_is() -> None:
    document = (FIXTURES / "valid" / "tw-wra-reservoir-discharge.xml").read_bytes()
    assert document.startswith(b"\xef\xbb\xbf")
    result = parse_at_sent(into_district(document))
    assert result.message.transcoded_from is None
    assert result.request.text.startswith("明德水庫")


def test_bytes_that_do_not_match_the_declared_encoding_are_malformed() -> None:
    text = alert().decode().replace('encoding="UTF-8"', 'encoding="GB2312"')
    assert refused(text.encode("utf-8") + b"\xff\xff").reason is Reason.MALFORMED_XML
    assert refused(alert().replace(b"UTF-8", b"no-such-codec")).reason is Reason.MALFORMED_XML


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&lol9;</identifier></alert>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE alert [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&xxe;</identifier></alert>"""

HOSTILE = {
    "billion-laughs": (BILLION_LAUGHS, Reason.FORBIDDEN_XML),
    "external-entity": (EXTERNAL_ENTITY, Reason.FORBIDDEN_XML),
    "parameter-entity": (
        b'<!DOCTYPE a [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]><a/>',
        Reason.FORBIDDEN_XML,
    ),
    "bare-doctype": (b'<!DOCTYPE alert SYSTEM "http://127.0.0.1:9/cap.dtd"><alert/>', Reason.FORBIDDEN_XML),
    "undeclared-entity": (alert(identifier="&xxe;"), Reason.MALFORMED_XML),
    "10-MB": (b"<" + b"a" * (10 * 1024 * 1024), Reason.TOO_LARGE),
    "one-byte-over": (alert(tail=" " * MAX_PAYLOAD_BYTES), Reason.TOO_LARGE),
    "binary-garbage": (bytes(range(256)) * 16, Reason.MALFORMED_XML),
    "empty": (b"", Reason.MALFORMED_XML),
    "json": (b'{"level": 1, "targets": ["all"]}', Reason.MALFORMED_XML),
    "10000-deep": (b"<a>" * 10_000 + b"</a>" * 10_000, Reason.FORBIDDEN_XML),
    "deep-inside-alert": (alert(tail="<x>" * 100 + "</x>" * 100), Reason.FORBIDDEN_XML),
    "not-cap": (b"<html><body>hello</body></html>", Reason.UNKNOWN_FORMAT),
    "long-namespace": (alert(head=f'<x xmlns="urn:{"x" * 200_000}"/>'), Reason.SCHEMA),
    "long-system-id": (f'<!DOCTYPE a SYSTEM "http://{"x" * 200_000}"><a/>'.encode(), Reason.FORBIDDEN_XML),
    "xinclude": (
        alert(head='<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="file:///etc/passwd"/>'),
        Reason.SCHEMA,
    ),
}


@pytest.mark.parametrize(("document", "reason"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_is_refused(document: bytes, reason: Reason) -> None:
    error = refused(document)
    assert error.reason is reason, error
    assert "root:" not in error.detail
    assert len(error.detail) <= MAX_DETAIL_CHARS


def test_element_count_is_bounded() -> None:
    error = refused(alert(head="<code/>" * MAX_ELEMENTS))
    assert error.reason is Reason.TOO_LARGE
    assert error.detail == f"more than {MAX_ELEMENTS} elements"
    assert read_cap(alert(head="<code/>" * (MAX_ELEMENTS - 100))).codes[0] == ""


def test_depth_limit_admits_a_signature_deep_enough() -> None:
    nested = "".join(f"<x{i}>" for i in range(MAX_DEPTH - 1)) + "".join(
        f"</x{i}>" for i in reversed(range(MAX_DEPTH - 1))
    )
    tail = f'<Signature xmlns="http://www.w3.org/2000/09/xmldsig#">{nested}</Signature>'
    assert refused(alert(tail=tail)).reason is Reason.FORBIDDEN_XML
    shallower = nested.replace(f"<x{MAX_DEPTH - 2}></x{MAX_DEPTH - 2}>", "")
    tail = f'<Signature xmlns="http://www.w3.org/2000/09/xmldsig#">{shallower}</Signature>'
    assert parse_cap(alert(tail=tail), district_area=DISTRICT, now=NOW).has_signature


def test_typical_document_parses_well_under_5_ms() -> None:
    document = into_district((FIXTURES / "valid" / "au-nsw-rfs-structure-fire.xml").read_bytes())
    now = read_cap(document).sent
    assert 5_000 < len(document) < 7_000
    timings = []
    for _ in range(30):
        started = time.perf_counter()
        parse_cap(document, district_area=DISTRICT, now=now)
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[len(timings) // 2] < 0.005
