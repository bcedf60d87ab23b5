"""The JSON alert of the README: accepted when right, refused with its own reason when not."""

from __future__ import annotations

import json

import pytest

from ebcd.ingest import MAX_PAYLOAD_BYTES, IngestError, Reason
from ebcd.ingest.json_alert import parse_json_alert
from ebcd.model.alert import CodeTarget, MsgType

GOOD = {
    "identifier": "up-1",
    "sender": "city-ews",
    "level": 2,
    "event_type": "11B03",
    "targets": ["all", "town:341523101000", {"kind": "circle", "lat": 31.4, "lon": 116.9, "radius_km": 3}],
    "text": "暴雨橙色预警",
    "ttl_s": 600,
}


def test_a_good_alert_parses() -> None:
    req = parse_json_alert(json.dumps(GOOD).encode())
    assert (req.level, req.event_type, req.identifier, req.msg_type) == (2, "11B03", "up-1", MsgType.ALERT)
    assert req.targets[1] == CodeTarget(kind="town", code="341523101000")
    assert req.ttl_s == 600


def test_cancel_by_reference() -> None:
    req = parse_json_alert(
        json.dumps(
            {"msgType": "Cancel", "references": ["city-ews,up-1"], "level": 2, "event": "11B03"}
        ).encode()
    )
    assert req.msg_type is MsgType.CANCEL
    assert req.references == ["city-ews,up-1"]


@pytest.mark.parametrize(
    ("payload", "reason", "where"),
    [
        (b'{"level": 9, "targets": ["nowhere"', Reason.MALFORMED_JSON, "not valid JSON"),
        (b"\xff\xfe\x00garbage", Reason.MALFORMED_JSON, "not valid JSON"),
        (b"[1, 2]", Reason.SCHEMA, "JSON object"),
        (json.dumps({**GOOD, "event_type": "99Z99"}).encode(), Reason.UNKNOWN_EVENT, "99Z99"),
        (json.dumps({**GOOD, "targets": ["county:1"]}).encode(), Reason.UNKNOWN_TARGET, "targets[0]"),
        (json.dumps({**GOOD, "level": 9}).encode(), Reason.SCHEMA, "level"),
        (json.dumps({**GOOD, "text": ""}).encode(), Reason.SCHEMA, "text"),
        (json.dumps({**GOOD, "colour": "red"}).encode(), Reason.SCHEMA, "colour"),
        (json.dumps({**GOOD, "targets": []}).encode(), Reason.SCHEMA, "target"),
        (b"[" * 5000 + b"]" * 5000, Reason.MALFORMED_JSON, "nesting"),
        (json.dumps({**GOOD, "text": "x" * (MAX_PAYLOAD_BYTES + 1)}).encode(), Reason.TOO_LARGE, "exceeds"),
    ],
    ids=[
        "truncated",
        "binary",
        "not-object",
        "unknown-event",
        "bad-target",
        "level",
        "empty-text",
        "unknown-field",
        "no-targets",
        "deep",
        "oversized",
    ],
)
def test_bad_input_is_refused_with_its_reason(payload: bytes, reason: Reason, where: str) -> None:
    with pytest.raises(IngestError) as e:
        parse_json_alert(payload)
    assert e.value.reason is reason
    assert where in e.value.detail
