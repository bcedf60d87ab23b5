"""Real-sized CAP documents are read and mapped; hostile ones are still refused."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from ebcd.config import IngestConfig, load_config, shipped_config_path
from ebcd.ingest import DEFAULT_LIMITS, MAX_PAYLOAD_BYTES, IngestError, Limits, Reason
from ebcd.ingest.cap import parse_cap
from ebcd.ingest.cap_rules import read_cap
from ebcd.ingest.cap_xml import MAX_ELEMENTS
from ebcd.model.alert import CodeTarget, MsgType, PolygonTarget
from ebcd.tiers.district import District
from tests.ingest.cap_docs import DISTRICT, NOW, alert, info
from tests.ingest.large_docs import (
    LANGUAGES,
    audio_alert,
    geocode_alert,
    languages_alert,
    polygon_alert,
    rectangle_ring,
)


def test_an_alert_with_500_kb_of_inline_audio_is_read() -> None:
    document = audio_alert(500_000)
    assert len(document) > 256 * 1024 * 2  # base64 of 500 KB: beyond twice the old limit
    cap = parse_cap(document, district_area=DISTRICT, now=NOW)
    resource = cap.message.infos[0].resources[0]
    assert (resource.mime_type, resource.size, resource.has_deref_uri) == ("audio/mpeg", 500_000, True)
    assert cap.request.targets == [CodeTarget(kind="area", code="341523101000")]
    assert cap.request.text.startswith("暴雨红色预警")


def test_a_40000_point_polygon_selects_exactly_the_terminals_inside(district: District) -> None:
    terminals = list(district.terminals())
    lats = sorted(t.lat for t in terminals)
    lons = sorted(t.lon for t in terminals)
    # the middle third of the ledger's extent each way: some terminals inside, most outside
    box = (lats[len(lats) // 3], lons[len(lons) // 3], lats[2 * len(lats) // 3], lons[2 * len(lons) // 3])
    box = (box[0] + 1e-7, box[1] + 1e-7, box[2] - 1e-7, box[3] - 1e-7)  # no terminal on an edge
    document = polygon_alert(box, 40_000)
    assert len(document) > 256 * 1024
    cap = parse_cap(document, district_area=DISTRICT, now=NOW)
    (target,) = cap.request.targets
    assert isinstance(target, PolygonTarget)
    assert len(target.points) == 40_000
    assert target.points == [(round(y, 6), round(x, 6)) for y, x in rectangle_ring(box, 40_000)]
    south, west, north, east = box
    inside = [t.code for t in terminals if south < t.lat < north and west < t.lon < east]
    assert 10 < len(inside) < len(terminals) // 2
    assert [t.code for t in district.resolve(cap.request.targets).terminals] == inside


def test_1500_geocodes_select_the_districts_villages_among_them(district: District) -> None:
    villages = [v.area for v in district.villages()][:40]
    cap = parse_cap(geocode_alert(villages, 1_500), district_area=DISTRICT, now=NOW)
    assert sorted(t.code for t in cap.request.targets if isinstance(t, CodeTarget)) == sorted(villages)
    assert len(cap.ignored_geocodes) == 50  # listed up to 50 ...
    assert "1460 geocodes ignored, the first 50 listed" in cap.notes  # ... and counted
    chosen = {t.code for t in district.resolve(cap.request.targets).terminals}
    assert chosen == {t.code for v in district.villages() if v.area in villages for t in v.terminals}


def test_an_update_in_8_languages_with_1500_geocodes_each_is_read_in_chinese() -> None:
    document = languages_alert(1_500)
    message = read_cap(document)
    assert [i.language for i in message.infos] == list(LANGUAGES)
    assert sum(len(a.geocodes) for i in message.infos for a in i.areas) == 8 * 1_500
    cap = parse_cap(document, district_area=DISTRICT, now=NOW)
    assert cap.request.msg_type is MsgType.UPDATE
    assert (cap.language, cap.info_index) == ("zh-CN", LANGUAGES.index("zh-CN"))
    assert cap.request.text.startswith("暴雨预警 (zh-CN)")


def test_the_payload_limit_admits_2_mib_and_refuses_one_byte_more() -> None:
    document = audio_alert(1_000)
    padding = MAX_PAYLOAD_BYTES - len(document)
    at_limit = document.replace(b"</alert>", b" " * padding + b"</alert>")
    assert len(at_limit) == MAX_PAYLOAD_BYTES
    assert parse_cap(at_limit, district_area=DISTRICT, now=NOW).identifier == "IPAWS-AUDIO-0001"
    with pytest.raises(IngestError) as caught:
        parse_cap(at_limit + b" ", district_area=DISTRICT, now=NOW)
    assert caught.value.reason is Reason.TOO_LARGE
    assert f"exceeds {MAX_PAYLOAD_BYTES} bytes" in caught.value.detail


def test_many_small_elements_within_the_payload_limit_are_still_refused() -> None:
    # 100,001 empty <code/>s are 700 KB: within the payload limit, beyond the element count
    document = alert(head="<code/>" * MAX_ELEMENTS, infos=[info()])
    assert len(document) < MAX_PAYLOAD_BYTES
    with pytest.raises(IngestError) as caught:
        read_cap(document)
    assert caught.value.reason is Reason.TOO_LARGE
    assert caught.value.detail == f"more than {MAX_ELEMENTS} elements"


def test_the_limits_follow_the_configuration() -> None:
    document = audio_alert(100_000)
    small = Limits(max_payload_bytes=64 * 1024)
    with pytest.raises(IngestError) as caught:
        parse_cap(document, district_area=DISTRICT, now=NOW, limits=small)
    assert caught.value.detail == f"payload of {len(document)} bytes exceeds {64 * 1024} bytes"
    few = Limits(max_elements=1_000)
    with pytest.raises(IngestError) as caught:
        read_cap(geocode_alert(["341523101001"], 400), few)  # 1,200 geocode elements
    assert caught.value.detail == "more than 1000 elements"
    shallow = Limits(max_depth=16)
    with pytest.raises(IngestError) as caught:
        read_cap(alert(tail="<x>" * 16 + "</x>" * 16), shallow)  # 17 levels with <alert>
    assert (caught.value.reason, caught.value.detail) == (
        Reason.FORBIDDEN_XML,
        "elements nested deeper than 16 levels",
    )
    with pytest.raises(IngestError) as caught:
        read_cap(alert(tail="<x>" * 15 + "</x>" * 15), shallow)
    assert caught.value.reason is Reason.SCHEMA  # 16 levels are within the limit: refused only as not CAP


def test_the_shipped_config_reads_with_the_default_limits_and_refuses_absurd_ones() -> None:
    config = load_config(shipped_config_path())
    assert Limits(**config.ingest.model_dump()) == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_payload_bytes == MAX_PAYLOAD_BYTES == 2 * 1024 * 1024
    with pytest.raises(ValidationError):
        IngestConfig(max_payload_bytes=1024 * 1024 * 1024)
    broker = (shipped_config_path().parent / "mosquitto" / "ebcd.conf").read_text()
    (packet,) = re.findall(r"^max_packet_size (\d+)$", broker, re.M)
    assert int(packet) > MAX_PAYLOAD_BYTES  # a sender over ebcd's limit still gets ebcd's answer
