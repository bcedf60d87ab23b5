"""An Update whose expires has passed: the form in which a tsunami centre ends its warning."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ebcd.ingest import IngestError, Reason
from ebcd.ingest.cap import EndingUpdate, parse_cap
from ebcd.model.alert import MsgType
from tests.ingest.cap_docs import DISTRICT, NOW, SENT, alert, area, info

REFS = "warning@example.gov.cn,GD-20240701-0001,2024-07-01T08:00:00+08:00"
ENDING_INFO = info(
    urgency="Past",
    severity="Severe",
    expires="2024-07-01T08:10:00+08:00",  # = sent: the warning is over
    headline="海啸警报解除",
    areas=[area("外海", geocodes=[("AreaCode", "440300000000")])],  # no area of the district
)


def ending(**fields: str) -> bytes:
    defaults = {
        "identifier": "GD-20240701-0002",
        "msg_type": "Update",
        "sent": "2024-07-01T08:10:00+08:00",
        "references": REFS,
    }
    return alert(**{**defaults, **fields}, infos=[ENDING_INFO])  # type: ignore[arg-type]


def test_an_expired_update_is_offered_as_the_end_of_what_it_references() -> None:
    with pytest.raises(EndingUpdate) as caught:
        parse_cap(ending(), district_area=DISTRICT, now=SENT + timedelta(minutes=10, seconds=1))
    error = caught.value
    assert error.reason is Reason.EXPIRED  # refused `expired` wherever the rule is not applied
    assert error.detail == "info[0]/expires: 2024-07-01T08:10:00+08:00 is 1 s in the past"
    assert error.request.msg_type is MsgType.CANCEL
    assert error.request.references == ["GD-20240701-0001"]
    assert [(r.sender, r.identifier) for r in error.cap.references] == [
        ("warning@example.gov.cn", "GD-20240701-0001")
    ]
    assert error.identifier == "GD-20240701-0002"


def test_an_update_still_in_force_is_an_update() -> None:
    document = ending().replace(
        b"2024-07-01T08:10:00+08:00</expires>", b"2024-07-01T20:00:00+08:00</expires>"
    )
    with pytest.raises(IngestError) as caught:  # in force, it needs an area of the district again
        parse_cap(document, district_area=DISTRICT, now=NOW)
    assert not isinstance(caught.value, EndingUpdate)
    assert caught.value.reason is Reason.NO_TARGET_IN_DISTRICT


def test_an_expired_alert_is_refused_expired_and_never_ends_anything() -> None:
    in_district = alert(infos=[info(expires="2024-07-01T08:10:00+08:00")])
    with pytest.raises(IngestError) as caught:
        parse_cap(in_district, district_area=DISTRICT, now=SENT + timedelta(hours=1))
    assert type(caught.value) is IngestError
    assert caught.value.reason is Reason.EXPIRED
