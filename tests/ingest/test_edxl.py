"""EDXL-DE 1.0 envelopes: every enclosed CAP alert read on its own, exactly as it was sent."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap import parse_cap
from ebcd.ingest.cap_rules import read_cap
from ebcd.ingest.edxl import is_envelope, read_envelope
from ebcd.ingest.xmldsig import CapSignatureCheck
from tests.ingest.cap_docs import (
    DISTRICT,
    EDXL_DE,
    FIXTURES,
    NOW,
    alert,
    area,
    envelope,
    info,
    strip_declaration,
)
from tests.ingest.test_xmldsig import EC_CERT, EC_KEY, cert_pem, pem_file, sign

EMPTY = "<contentObject><xmlContent><embeddedXMLContent>  </embeddedXMLContent></xmlContent></contentObject>"
AUDIO = (
    "<contentObject><nonXMLContent><mimeType>audio/mpeg</mimeType>"
    "<uri>http://example.gov.cn/a.mp3</uri></nonXMLContent></contentObject>"
)


def test_each_enclosed_alert_is_a_part_with_its_exact_bytes() -> None:
    first = alert(identifier="A-1")
    second = alert(identifier="A-2", infos=[info(severity="Extreme")])
    env = read_envelope(envelope(first, EMPTY, second, AUDIO, distribution_id="D-42"))
    assert env is not None
    assert (env.distribution_id, env.sender_id) == ("D-42", "ews@example.gov.cn")
    assert [p.path for p in env.parts] == [
        "contentObject[0]/xmlContent/embeddedXMLContent[0]",
        "contentObject[1]/xmlContent/embeddedXMLContent[0]",
        "contentObject[2]/xmlContent/embeddedXMLContent[0]",
        "contentObject[3]",
    ]
    assert env.parts[0].payload == strip_declaration(first)
    assert env.parts[2].payload == strip_declaration(second)
    assert [read_cap(p.payload).identifier for p in env.parts if p.payload] == ["A-1", "A-2"]
    empty, audio = env.parts[1].error, env.parts[3].error
    assert empty is not None
    assert (empty.reason, empty.detail) == (Reason.SCHEMA, "is empty")
    assert audio is not None
    assert audio.reason is Reason.UNSUPPORTED
    assert "nonXMLContent" in audio.detail


def test_an_invalid_alert_is_a_part_of_its_own_and_fails_alone() -> None:
    broken = alert(identifier="B-1").replace(b"<scope>Public</scope>", b"")
    env = read_envelope(envelope(broken, alert(identifier="B-2")))
    assert env is not None
    first, second = (p.payload for p in env.parts)
    assert first is not None
    assert second is not None
    with pytest.raises(IngestError) as caught:
        read_cap(first)
    assert caught.value.reason is Reason.SCHEMA
    assert "scope" in caught.value.detail
    assert parse_cap(second, district_area=DISTRICT, now=NOW).identifier == "B-2"


def test_an_alert_relying_on_the_envelopes_namespace_declarations_gets_them() -> None:
    inner = (
        b"<cap:alert><cap:identifier>C-1</cap:identifier><cap:sender>ews@example.gov.cn</cap:sender>"
        b"<cap:sent>2024-07-01T08:00:00+08:00</cap:sent><cap:status>Actual</cap:status>"
        b"<cap:msgType>Alert</cap:msgType><cap:scope>Public</cap:scope></cap:alert>"
    )
    head = ' xmlns:cap="urn:oasis:names:tc:emergency:cap:1.2"'
    env = read_envelope(envelope(inner, head=head))
    assert env is not None
    (part,) = env.parts
    assert part.payload is not None
    assert part.payload.startswith(b'<cap:alert xmlns="' + EDXL_DE.encode() + b'" xmlns:cap="urn:oasis:')
    assert read_cap(part.payload).identifier == "C-1"


def test_a_signed_alert_still_verifies_inside_an_envelope(tmp_path: Path) -> None:
    signed = sign(alert(identifier="S-1"), EC_KEY, EC_CERT, algorithm="ecdsa-sha256")
    env = read_envelope(envelope(signed, alert(identifier="S-2")))
    assert env is not None
    check = CapSignatureCheck.from_files([pem_file(tmp_path, "ec.pem", cert_pem(EC_CERT))])
    assert env.parts[0].payload is not None
    assert check.verify(env.parts[0].payload) is False  # strict: the bytes are the signed ones
    with pytest.raises(IngestError):
        check.verify(env.parts[1].payload or b"")  # the unsigned neighbour is not vouched for by it


def test_a_latin_1_envelope_keeps_its_encoding_in_each_part() -> None:
    headline = "Ve\u00f0urvi\u00f0v\u00f6run \u00e1 Nor\u00f0urlandi"
    block = info(
        language="is-IS",
        event="Wind",
        headline=headline,
        description="Hvassvi\u00f0ri",
        instruction=None,
        areas=[area("Nor\u00f0urland")],
    )
    document = envelope(alert(identifier="L-1", infos=[block]))
    latin = document.decode().replace('encoding="UTF-8"', 'encoding="ISO-8859-1"').encode("latin-1")
    env = read_envelope(latin)
    assert env is not None
    assert env.parts[0].payload is not None
    assert env.parts[0].payload.startswith(b'<?xml version="1.0" encoding="ISO-8859-1"?>')
    assert b"\xf0" in env.parts[0].payload  # still Latin-1 bytes
    assert env.parts[0].payload.count(b"xmlns") == 1  # its own declaration only: nothing was added
    assert read_cap(env.parts[0].payload).infos[0].headline == headline


def test_what_is_not_an_envelope_is_left_to_the_cap_reader() -> None:
    for path in sorted((FIXTURES / "valid").glob("*.xml")):
        assert not is_envelope(path.read_bytes()), path.name
        assert read_envelope(path.read_bytes()) is None
    assert read_envelope(b'{"level": 1}') is None
    commented = b'<?xml version="1.0"?>\n<!-- from the feed -->\n' + strip_declaration(envelope(alert()))
    assert is_envelope(commented)
    assert is_envelope(envelope(alert()).decode().encode("utf-16"))
    # a document type declaration hides the root from the sniffer; the CAP reader refuses it
    doctype = b'<!DOCTYPE EDXLDistribution [<!ENTITY x "y">]><EDXLDistribution/>'
    assert read_envelope(doctype) is None
    with pytest.raises(IngestError) as caught:
        read_cap(doctype)
    assert caught.value.reason is Reason.FORBIDDEN_XML


@pytest.mark.parametrize(
    ("document", "reason", "detail"),
    [
        (
            envelope(alert()).replace(EDXL_DE.encode(), b"urn:oasis:names:tc:emergency:EDXL:DE:2.0"),
            Reason.UNSUPPORTED,
            "is not EDXL-DE 1.0",
        ),
        (
            envelope(distribution_id="EMPTY-1"),
            Reason.SCHEMA,
            "distribution 'EMPTY-1' carries no contentObject",
        ),
        (envelope(alert())[:-5], Reason.MALFORMED_XML, "not well-formed"),
    ],
    ids=["de-2.0", "no-content", "truncated"],
)
def test_an_unusable_envelope_is_refused_whole(document: bytes, reason: Reason, detail: str) -> None:
    with pytest.raises(IngestError) as caught:
        read_envelope(document)
    assert caught.value.reason is reason
    assert detail in caught.value.detail


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(min_value=0, max_value=2_000),
    noise=st.binary(max_size=40),
    at=st.integers(min_value=0, max_value=2_000),
)
def test_mutated_envelopes_raise_only_ingest_error(cut: int, noise: bytes, at: int) -> None:
    document = envelope(alert(identifier="F-1"), EMPTY, AUDIO, alert(identifier="F-2"))
    at, cut = at % len(document), cut % len(document)
    mutated = document[:at] + noise + document[at + cut // 10 :]
    try:
        env = read_envelope(mutated)
    except IngestError:
        return
    for part in env.parts if env else ():
        assert (part.payload is None) != (part.error is None)
        if part.payload is not None:
            with contextlib.suppress(IngestError):  # a part may be anything: refused, never a crash
                read_cap(part.payload)
