"""Fuzzing CAP ingest: whatever the bytes, the answer is a CapAlert or an IngestError."""

from __future__ import annotations

from datetime import UTC, datetime
from xml.sax.saxutils import escape

import pytest
from cap_docs import DISTRICT, VALID, alert, area, info, into_district
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebcd.ingest import IngestError
from ebcd.ingest.cap import CapAlert, parse_cap

# Before every fixture was sent, so nothing is expired and the mapping is reached too.
FUZZ_NOW = datetime(2000, 1, 1, tzinfo=UTC)
DOCUMENTS = [p.read_bytes() for p in VALID] + [into_district(p.read_bytes()) for p in VALID] + [alert()]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


def parse_or_refuse(document: bytes) -> CapAlert | None:
    """parse_cap's answer, with IngestError as None; anything else fails the test."""
    try:
        return parse_cap(document, district_area=DISTRICT, now=FUZZ_NOW)
    except IngestError:
        return None


@pytest.mark.timeout(60)
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(payload: bytes) -> None:
    parse_or_refuse(payload)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid document with a few bytes flipped, cut, inserted or a text node replaced."""
    document = bytearray(draw(st.sampled_from(DOCUMENTS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(document)))
        match draw(st.sampled_from(["flip", "cut", "insert", "truncate", "text"])):
            case "flip" if at < len(document):
                document[at] ^= 1 << draw(st.integers(0, 7))
            case "cut":
                del document[at : at + draw(st.integers(1, 64))]
            case "insert":
                document[at:at] = draw(st.binary(min_size=1, max_size=16) | st.sampled_from(SNIPPETS))
            case "truncate":
                del document[at:]
            case "text":
                start = document.find(b">", at) + 1
                end = document.find(b"</", start)
                if 0 < start <= end:
                    document[start:end] = escape(draw(TEXT)).encode("utf-8", "replace")
    return bytes(document)


SNIPPETS = [
    b"<!DOCTYPE a>",
    b"&amp;",
    b"&x;",
    b"<![CDATA[",
    b"]]>",
    b"<a>",
    b"</a>",
    b"<?pi?>",
    b"\x00",
    b"-->",
]


@pytest.mark.timeout(60)
@FUZZ
@given(mutated())
def test_mutated_valid_documents(document: bytes) -> None:
    parse_or_refuse(document)


@st.composite
def odd_values(draw: st.DrawFn) -> bytes:
    """The template with random text in the fields the rules and the mapping read."""

    def field(default: str) -> str:
        return escape(draw(st.one_of(st.just(default), TEXT)))

    geocode = (field("AreaCode"), field("341523101000"))
    areas = [
        area(polygons=[field("31,117 31,118 32,118 31,117")], circles=[field("31,117 5")], geocodes=[geocode])
    ]
    infos = [
        info(
            language=field("zh-CN"),
            categories=[field("Met")],
            severity=field("Severe"),
            urgency=field("Immediate"),
            event_codes=[(field("EBEventType"), field("11B03"))],
            expires=field("2024-07-01T20:00:00+08:00"),
            headline=field("暴雨"),
            areas=areas,
        )
    ]
    return alert(
        identifier=field("GD-1"),
        sent=field("2024-07-01T08:00:00+08:00"),
        status=field("Actual"),
        msg_type=field("Update"),
        references=field("s,GD-0,2024-07-01T07:00:00+08:00"),
        infos=infos,
    )


@pytest.mark.timeout(60)
@FUZZ
@given(odd_values())
def test_odd_field_values(document: bytes) -> None:
    parse_or_refuse(document)
