"""EBM -> alert request: targets, times in the sender's zone, drills, cancels, refusals."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from ebcd.ingest import Reason
from ebcd.model.alert import MsgType
from ebcd.platform.mapping import district_targets, to_request
from ebcd.protocols.ebd import EbdError, ResultCode
from tests.protocols.ebd_fixtures import CITY, ebm

ZONE = ZoneInfo("Asia/Shanghai")
AREA = "341523000000"
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=ZONE).timestamp()


def _map(**kw: object):  # type: ignore[no-untyped-def]
    return to_request(
        ebm(**kw),
        sender=CITY,
        ebdid="1" * 41,
        zone=ZONE,
        now=NOW,
        district_area=AREA,
        default_ttl_s=3600,
        start_slack_s=5,
    )


def test_district_targets_keep_own_areas_and_widen_holders() -> None:
    assert district_targets(("341523101000", "341523102003"), AREA) == ["341523101000", "341523102003"]
    assert district_targets(("341500000000",), AREA) == [AREA]  # the city holding the district
    assert district_targets(("340000000000", "341523101000"), AREA) == [AREA, "341523101000"]
    assert district_targets(("341502101000", "341524000000"), AREA) == []  # other districts


def test_live_ebm_in_local_time() -> None:
    m = _map(start=datetime(2026, 12, 3, 9, 0), end=datetime(2026, 12, 3, 10, 30))
    r = m.request
    assert (r.identifier, r.sender, r.level, r.event_type, r.test) == (
        CITY + "202612030001",
        CITY,
        2,
        "11B03",
        False,
    )
    assert r.ttl_s == 5400  # 09:00 to 10:30 Beijing time, whatever the host's zone
    assert r.text == "暴雨橙色预警：请注意防范"
    assert [str(t) for t in r.targets] == ["area:341523101000"]
    assert m.starts_at is None


@pytest.mark.parametrize("msg_type", [3, 4, 5])
def test_drills_are_test_broadcasts(msg_type: int) -> None:
    assert _map(msg_type=msg_type, start=datetime(2026, 12, 3, 9, 0)).request.test


def test_future_start_waits_and_lives_from_then() -> None:
    m = _map(start=datetime(2026, 12, 3, 9, 10), end=datetime(2026, 12, 3, 9, 40))
    assert m.starts_at == NOW + 600
    assert m.request.ttl_s == 1800


def test_cancel_names_the_earlier_broadcast() -> None:
    r = _map(msg_type=2, related_ebmid=CITY + "202612030001", ebmid=CITY + "202612030002").request
    assert r.msg_type is MsgType.CANCEL
    assert r.references == [f"{CITY},{CITY}202612030001"]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"end": datetime(2026, 12, 3, 8, 59)}, Reason.EXPIRED),
        ({"area_codes": ("341502101000",)}, Reason.NO_TARGET_IN_DISTRICT),
        ({"event_type": "99Z99"}, Reason.UNKNOWN_EVENT),
        ({"severity": 7}, Reason.SCHEMA),
        ({"severity": None}, Reason.MISSING_CONTENT),
    ],
)
def test_refusals(kw: dict[str, object], reason: Reason) -> None:
    with pytest.raises(EbdError) as info:
        _map(**{"start": datetime(2026, 12, 3, 8, 0), **kw})
    assert info.value.reason is reason
    assert info.value.code in (ResultCode.OTHER, ResultCode.MISSING_CONTENT)
    assert "EBM" in info.value.detail
