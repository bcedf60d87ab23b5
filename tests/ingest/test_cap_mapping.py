"""CAP to `AlertRequest`: level, event type, language, targets, text, ttl, message types."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cap_docs import DISTRICT, DISTRICT_TOWN, DISTRICT_VILLAGE, NOW, SENT, alert, area, info
from pydantic import ValidationError

from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap import (
    CATEGORY_EVENT_TYPES,
    EVENT_CODE_VALUE_NAMES,
    LEVEL_BY_SEVERITY,
    CapAlert,
    parse_cap,
)
from ebcd.ingest.cap_model import Category, Severity
from ebcd.model import events
from ebcd.model.alert import MAX_TEXT_CHARS, MAX_TTL_S, CircleTarget, CodeTarget, MsgType, PolygonTarget
from ebcd.model.codes import CodeError

SQUARE = "31.0,117.0 31.0,117.1 31.1,117.1 31.1,117.0 31.0,117.0"
TOWN = CodeTarget(kind="area", code=DISTRICT_TOWN)


def parse(document: bytes, **kwargs: object) -> CapAlert:
    """parse_cap for the test district, five minutes after the template's sent time."""
    return parse_cap(document, **{"district_area": DISTRICT, "now": NOW, **kwargs})  # type: ignore[arg-type]


def refusal(document: bytes, **kwargs: object) -> IngestError:
    """The IngestError parse_cap raises for a document."""
    with pytest.raises(IngestError) as caught:
        parse(document, **kwargs)
    return caught.value


@pytest.mark.parametrize(
    ("severity", "level"), [("Extreme", 1), ("Severe", 2), ("Moderate", 3), ("Minor", 4), ("Unknown", 4)]
)
def test_severity_gives_the_level(severity: str, level: int) -> None:
    assert parse(alert(infos=[info(severity=severity)])).request.level == level


def test_every_severity_has_a_level() -> None:
    assert set(LEVEL_BY_SEVERITY) == set(Severity)


@pytest.mark.parametrize(
    "value_name", [*EVENT_CODE_VALUE_NAMES, "ebeventtype", "eventType", "GB/T35561-2017", " EB_Event_Type "]
)
def test_event_code_gives_the_event_type(value_name: str) -> None:
    result = parse(alert(infos=[info(event_codes=[("SAME", "SVR"), (value_name, "11b03")])]))
    assert result.request.event_type == "11B03"
    assert result.event_type_source == f"info[0]/eventCode[1] {value_name.strip()}"


def test_event_code_outside_the_table_falls_back_to_the_category() -> None:
    result = parse(alert(infos=[info(event_codes=[("EBEventType", "99Z99")], categories=["Fire"])]))
    assert result.request.event_type == "12G00"
    assert result.event_type_source == "info[0]/category Fire"
    assert result.notes == ("info[0]/eventCode[0] EBEventType='99Z99' is not an event type",)


def test_unlisted_value_names_are_not_read() -> None:
    result = parse(alert(infos=[info(event_codes=[("SAME", "11B03")])]))
    assert result.request.event_type == "11B00"


def test_value_names_can_be_configured() -> None:
    document = alert(infos=[info(event_codes=[("profile:CN:Event", "11B04")])])
    assert parse(document, event_code_names=["profile:CN:Event"]).request.event_type == "11B04"


@pytest.mark.parametrize("category", list(Category))
def test_category_fallback(category: Category) -> None:
    result = parse(alert(infos=[info(categories=[category.value, "Other"])]))
    assert result.request.event_type == CATEGORY_EVENT_TYPES[category]
    assert events.lookup(result.request.event_type) is not None
    assert result.event_type_source == f"info[0]/category {category.value}"


@pytest.mark.parametrize("status", ["Test", "Exercise"])
def test_test_and_exercise_are_test_broadcasts(status: str) -> None:
    result = parse(alert(status=status))
    assert result.request.test
    assert result.request.event_type == events.TEST_EVENT
    coded = parse(alert(status=status, infos=[info(event_codes=[("EBEventType", "11B03")])]))
    assert coded.request.test
    assert coded.request.event_type == "11B03"
    assert not parse(alert()).request.test


@pytest.mark.parametrize(
    ("status", "msg_type"), [("System", "Alert"), ("Draft", "Alert"), ("Actual", "Ack"), ("Actual", "Error")]
)
def test_what_ebcd_does_not_act_on_is_unsupported(status: str, msg_type: str) -> None:
    references = "s,i,2024-07-01T07:00:00+08:00" if msg_type != "Alert" else None
    error = refusal(alert(status=status, msg_type=msg_type, references=references))
    assert error.reason is Reason.UNSUPPORTED
    assert error.identifier == "GD-20240701-0001"


@pytest.mark.parametrize(
    ("languages", "chosen"),
    [
        (["en-US", "zh-TW", "zh-CN"], 2),
        (["en-US", "zh-cn"], 1),
        (["en-US", "zh-Hans", "zh-HK"], 1),
        (["en-US", "zh"], 1),
        (["en-US", "es-US"], 0),
        ([None, "zh-CN"], 1),
    ],
)
def test_chinese_is_preferred(languages: list[str | None], chosen: int) -> None:
    infos = [info(language=lang, headline=f"headline {i}") for i, lang in enumerate(languages)]
    result = parse(alert(infos=infos))
    assert result.info_index == chosen
    assert result.language == languages[chosen] == result.request.language
    assert result.request.text.startswith(f"headline {chosen}")


def test_among_same_language_blocks_the_one_naming_the_district_wins() -> None:
    elsewhere = info(headline="elsewhere", areas=[area(geocodes=[("AreaCode", "110101001000")])])
    here = info(headline="here")
    result = parse(alert(infos=[elsewhere, here]))
    assert result.info_index == 1
    assert result.request.targets == [TOWN]


def test_geocodes_of_the_district_become_area_targets() -> None:
    geocodes = [
        ("AreaCode", DISTRICT_TOWN),
        ("行政区划代码", DISTRICT_VILLAGE),
        ("AreaCode", DISTRICT),
        ("AreaCode", DISTRICT_TOWN),  # repeated
        ("AreaCode", "341522101000"),  # the neighbouring county
        ("AreaCode", "341523000001"),  # a village under town 000
        ("SAME", "006109"),
        ("AreaCode", "３４１５２３１０１０００"),  # full-width digits
    ]
    result = parse(alert(infos=[info(areas=[area(geocodes=geocodes)])]))
    assert [str(t) for t in result.request.targets] == [
        f"area:{DISTRICT_TOWN}",
        f"area:{DISTRICT_VILLAGE}",
        f"area:{DISTRICT}",
    ]
    assert result.ignored_geocodes == (
        "info[0]/area[0]/geocode[4] AreaCode=341522101000",
        "info[0]/area[0]/geocode[5] AreaCode=341523000001",
        "info[0]/area[0]/geocode[6] SAME=006109",
        "info[0]/area[0]/geocode[7] AreaCode=３４１５２３１０１０００",
    )


def test_polygons_and_circles_become_geometric_targets() -> None:
    areas = [area(geocodes=[]), area(polygons=[SQUARE], circles=["31.5,117.5 2"], geocodes=[])]
    targets = parse(alert(infos=[info(areas=areas)])).request.targets
    assert targets == [
        PolygonTarget(points=[(31.0, 117.0), (31.0, 117.1), (31.1, 117.1), (31.1, 117.0), (31.0, 117.0)]),
        CircleTarget(lat=31.5, lon=117.5, radius_km=2),
    ]


@pytest.mark.parametrize("msg_type", ["Alert", "Update"])
def test_no_target_in_the_district_is_refused(msg_type: str) -> None:
    references = "s,i,2024-07-01T07:00:00+08:00" if msg_type == "Update" else None
    no_area = alert(msg_type=msg_type, references=references, infos=[info(areas=[])])
    error = refusal(no_area)
    assert error.reason is Reason.NO_TARGET_IN_DISTRICT
    assert error.detail == "info[0]: no area of district 341523 (no geocode, polygon or circle)"
    elsewhere = alert(
        msg_type=msg_type,
        references=references,
        infos=[info(areas=[area(geocodes=[("AreaCode", "110101001000")])])],
    )
    error = refusal(elsewhere)
    assert error.reason is Reason.NO_TARGET_IN_DISTRICT
    assert "AreaCode=110101001000" in error.detail
    assert (
        refusal(alert(msg_type=msg_type, references=references, infos=[])).reason
        is Reason.NO_TARGET_IN_DISTRICT
    )


def test_update_maps_with_its_references() -> None:
    refs = (
        "warning@example.gov.cn,GD-1,2024-07-01T07:00:00+08:00 "
        "other@example.gov.cn,GD-2,2024-07-01T07:10:00+08:00"
    )
    result = parse(alert(msg_type="Update", references=refs))
    assert result.request.msg_type is MsgType.UPDATE
    assert result.request.references == ["GD-1", "GD-2"]
    assert [(r.sender, r.identifier) for r in result.references] == [
        ("warning@example.gov.cn", "GD-1"),
        ("other@example.gov.cn", "GD-2"),
    ]


def test_cancel_needs_no_area_and_no_info() -> None:
    refs = "warning@example.gov.cn,GD-1,2024-07-01T07:00:00+08:00"
    bare = parse(alert(msg_type="Cancel", references=refs, infos=[]))
    assert bare.request.msg_type is MsgType.CANCEL
    assert bare.request.targets == []
    assert bare.request.references == ["GD-1"]
    assert bare.info_index is None
    assert bare.event_type_source == "no <info>"
    with_info = parse(alert(msg_type="Cancel", references=refs, infos=[info(areas=[])]))
    assert with_info.request.targets == []
    assert with_info.request.level == 2


def test_expires_gives_the_ttl() -> None:
    result = parse(alert(infos=[info(expires="2024-07-01T09:00:00+08:00")]))
    assert result.request.ttl_s == 55 * 60
    assert result.expires == SENT + timedelta(hours=1)


def test_without_expires_the_default_ttl_applies() -> None:
    assert parse(alert(infos=[info(expires=None)]), default_ttl_s=900).request.ttl_s == 900
    assert parse(alert(infos=[info(expires=None)])).expires is None


def test_far_expiry_is_capped() -> None:
    result = parse(alert(infos=[info(expires="2025-07-01T08:00:00+08:00")]))
    assert result.request.ttl_s == MAX_TTL_S
    assert "ttl capped" in result.notes[0]


def test_an_expired_alert_is_refused_but_its_cancel_is_not() -> None:
    late = SENT + timedelta(hours=13)
    error = refusal(alert(), now=late)
    assert error.reason is Reason.EXPIRED
    assert error.detail.startswith("info[0]/expires: 2024-07-01T20:00:00+08:00 is 3600 s in the past")
    cancel = alert(msg_type="Cancel", references="s,i,2024-07-01T07:00:00+08:00")
    assert parse(cancel, now=late, default_ttl_s=60).request.ttl_s == 60


def test_text_joins_headline_description_and_instruction() -> None:
    document = alert(
        infos=[info(headline="标题", description="  第一行\n      第二行  ", instruction="撤离")]
    )
    assert parse(document).request.text == "标题\n第一行\n第二行\n撤离"
    event_only = alert(infos=[info(headline=None, description=None, instruction=None)])
    assert parse(event_only).request.text == "暴雨"


def test_long_text_is_cut_and_noted() -> None:
    result = parse(alert(infos=[info(description="雨" * 3000)]))
    assert len(result.request.text) == MAX_TEXT_CHARS
    assert result.request.text.endswith("…")
    assert result.text_truncated
    assert not parse(alert()).text_truncated


@pytest.mark.parametrize("msg_type", ["Alert", "Update"])
def test_alert_without_anything_to_say_is_refused(msg_type: str) -> None:
    references = "s,i,2024-07-01T07:00:00+08:00" if msg_type == "Update" else None
    silent = info(event="", headline=None, description=None, instruction=None)
    error = refusal(alert(msg_type=msg_type, references=references, infos=[silent]))
    assert error.reason is Reason.SCHEMA
    assert error.detail == "info[0]: no headline, description, instruction or event to broadcast"


def test_request_limits_become_schema_refusals_naming_the_field() -> None:
    refs = " ".join(f"s,GD-{i},2024-07-01T07:00:00+08:00" for i in range(101))
    error = refusal(alert(msg_type="Update", references=refs))
    assert error.reason is Reason.SCHEMA
    assert error.detail.startswith("references: ")
    error = refusal(alert(identifier="x" * 300))
    assert error.reason is Reason.SCHEMA
    assert error.detail.startswith("identifier: ")


def test_a_polygon_of_ten_thousand_points_is_read() -> None:
    # real feeds draw warning areas with tens of thousands of points (ebcd.tiers.geo is vectorised)
    ring = " ".join(f"31.{i:05d},117.0" for i in range(10_001)) + " 31.00000,117.0"
    result = parse(alert(infos=[info(areas=[area(), area(polygons=[ring])])]))
    (polygon,) = [t for t in result.request.targets if isinstance(t, PolygonTarget)]
    assert len(polygon.points) == 10_002


def test_a_polygon_past_the_point_limit_is_refused_naming_the_limit() -> None:
    points = [(30.0 + i * 1e-6, 117.0) for i in range(100_001)] + [(30.0, 117.0)]
    with pytest.raises(ValidationError, match="at most 100000 items"):
        PolygonTarget(points=points)


def test_result_carries_the_cap_facts() -> None:
    result = parse(alert(scope="Restricted", head="<restriction>duty officers</restriction>"))
    assert (result.identifier, result.sender, result.sent) == (
        "GD-20240701-0001",
        "warning@example.gov.cn",
        SENT,
    )
    assert (result.status.value, result.msg_type.value, result.scope.value) == (
        "Actual",
        "Alert",
        "Restricted",
    )
    assert result.request.sender == "warning@example.gov.cn"
    assert result.request.origin.value == "district"
    assert result.request.targets == [TOWN]
    assert result.request.level == 2
    assert not result.has_signature
    assert result.references == ()


def test_misuse_is_a_value_error_not_an_ingest_error() -> None:
    with pytest.raises(CodeError):
        parse_cap(alert(), district_area="3415", now=NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_cap(alert(), district_area=DISTRICT, now=NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="default_ttl_s"):
        parse_cap(alert(), district_area=DISTRICT, now=NOW, default_ttl_s=0)
