"""Chinese early-warning feeds (hand-made fixtures in tests/fixtures/cap-cn, see its SOURCES.md):
identifiers of the national system, 12-digit area codes at every level, GB/T event codes, zh-CN."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from ebcd.ingest.cap import CapAlert, parse_cap
from ebcd.ingest.cap_rules import read_cap
from ebcd.model.alert import CodeTarget, MsgType
from ebcd.tiers.district import District
from tests.ingest.cap_docs import DISTRICT

CN = Path(__file__).resolve().parents[1] / "fixtures" / "cap-cn"
FILES = sorted(p.name for p in CN.glob("*.xml"))
IDENTIFIER = r"\d{14}_\d{14}(_\d)?"


def read(name: str) -> CapAlert:
    document = (CN / name).read_bytes()
    return parse_cap(document, district_area=DISTRICT, now=read_cap(document).sent + timedelta(minutes=1))


def codes(cap: CapAlert) -> list[str]:
    return [t.code or "" for t in cap.request.targets if isinstance(t, CodeTarget)]


def test_every_fixture_is_described_in_sources() -> None:
    sources = (CN / "SOURCES.md").read_text(encoding="utf-8")
    assert FILES == [
        "cn-cancel.xml",
        "cn-county-rainstorm-red-zh-en.xml",
        "cn-town-landslide-orange.xml",
        "cn-village-flood-update-zh-en.xml",
    ]
    assert all(f"`{name}`" in sources for name in FILES)
    assert "hand" in sources


@pytest.mark.parametrize("name", FILES)
def test_national_identifiers_and_senders_are_kept_as_sent(name: str) -> None:
    cap = read(name)
    assert re.fullmatch(IDENTIFIER, cap.identifier)
    assert re.fullmatch(r"\d{14}", cap.sender)
    assert cap.request.identifier == cap.identifier
    assert cap.request.sender == cap.sender


def test_a_county_code_selects_the_whole_district_from_the_zh_cn_block(district: District) -> None:
    cap = read("cn-county-rainstorm-red-zh-en.xml")
    assert (cap.language, cap.info_index) == ("zh-CN", 1)  # the Chinese block, though second
    assert codes(cap) == ["341523000000"]
    assert len(district.resolve(cap.request.targets).terminals) == len(district) == 769
    assert (cap.request.event_type, cap.event_type_source) == (
        "11B03",
        "info[1]/eventCode[0] GB/T 35561-2017",
    )
    assert cap.request.level == 1
    assert cap.request.text.startswith("示范县气象台发布暴雨红色预警信号\n示范县气象台2024年07月01日08时00分")
    assert cap.request.ttl_s == pytest.approx(24 * 3600 - 60)


def test_a_town_code_selects_its_town_and_a_neighbouring_countys_code_is_ignored(district: District) -> None:
    cap = read("cn-town-landslide-orange.xml")
    assert codes(cap) == ["341523101000"]
    assert cap.ignored_geocodes == ("info[0]/area[0]/geocode[1] 行政区划代码=341522105000",)
    town = district.town("53415231010000314010101")
    assert town is not None
    assert {t.code for t in district.resolve(cap.request.targets).terminals} == {
        t.code for t in town.terminals()
    }
    assert (cap.request.event_type, cap.request.level) == ("11D01", 2)


def test_village_codes_select_their_villages_and_the_update_names_the_alert(district: District) -> None:
    cap = read("cn-village-flood-update-zh-en.xml")
    assert cap.request.msg_type is MsgType.UPDATE
    assert [(r.sender, r.identifier) for r in cap.references] == [
        ("34152341600000", "34152341600000_20240701080000")
    ]
    assert codes(cap) == ["341523101001", "341523101002"]
    villages = [v for v in district.villages() if v.area in ("341523101001", "341523101002")]
    assert len(villages) == 2
    chosen = {t.code for t in district.resolve(cap.request.targets).terminals}
    assert chosen == {t.code for v in villages for t in v.terminals}
    assert cap.request.event_type == "11A01"
    assert cap.language == "zh-CN"


def test_the_cancel_names_both_earlier_messages() -> None:
    cap = read("cn-cancel.xml")
    assert cap.request.msg_type is MsgType.CANCEL
    assert [r.identifier for r in cap.references] == [
        "34152341600000_20240701080000",
        "34152341600000_20240701100000",
    ]
