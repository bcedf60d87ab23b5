"""What ebcd reports up, as EBD bodies, pure: broadcast state and coverage, logs, inventory, heartbeat.

Where the public code leaves a field open, the choice is ebcd's and named here (README, "The
platform above"): `Coverage/AreaCode` lists the rooms whose every addressed terminal acknowledged,
`ResBrdStat` is "acknowledged,addressed" terminals, each room is one `ResBrdItem` whose `EBRBS`
carries the room's code as `EBRID` and `(room, acknowledged, addressed)` as `BrdSysInfo`; terminal
states are 1 running (online), 3 fault (offline), 2 stopped (not heard from yet).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # builds our own documents
from collections.abc import Iterable, Mapping
from datetime import datetime
from zoneinfo import ZoneInfo

from ebcd.delivery.alerts import Alert
from ebcd.delivery.state import EBM_STATE, AState
from ebcd.protocols.ebd.documents import TIME_FORMAT, sub
from ebcd.tiers.district import District
from ebcd.tiers.rollup import Tally
from ebcd.tiers.terminal import Terminal

STATE_DESC = {0: "未处理", 1: "等待播发", 2: "播发中", 3: "播发成功", 4: "播发失败", 5: "播发取消"}
# GRPlatForm / Lishui: 0 failed, 1 playing, 2 done (FIELD-PROTOCOLS.md §3)
GR_CODES = {0: 1, 1: 1, 2: 1, 3: 2, 4: 0, 5: 2}
GR_DESC = {0: "播发失败", 1: "正在播发", 2: "播发完成"}
TERMINAL_STATE = {"online": (1, "运行"), "offline": (3, "故障"), "unknown": (2, "停止")}


def local(ts: float, zone: ZoneInfo) -> str:
    """Unix seconds as `yyyy-MM-dd HH:mm:ss` in `zone`."""
    return datetime.fromtimestamp(ts, zone).strftime(TIME_FORMAT)


def state_code(ebm_state: int, convention: str) -> tuple[int, str]:
    """BrdStateCode and its description in the configured convention ("gs" or "gr")."""
    if convention == "gr":
        code = GR_CODES[ebm_state]
        return code, GR_DESC[code]
    return ebm_state, STATE_DESC[ebm_state]


def _rooms(alert: Alert, district: District) -> dict[str, Tally]:
    buckets = alert.buckets()
    out: dict[str, Tally] = {}
    for code, bucket in buckets.items():
        term = district.terminal(code)
        if term is not None:
            out.setdefault(term.room, Tally()).add(bucket)
    return dict(sorted(out.items()))


def _room_area(district: District, room: str) -> str | None:
    found = district.village(room) or district.town(room)
    return None if found is None else found.area


def _room_state(t: Tally, alert: Alert) -> int:
    if t.acked == t.targets:
        return 3
    if alert.state is AState.CANCELLED:
        return 5
    if alert.ended or alert.state in (AState.PARTIAL, AState.COMPLETED):
        return 4
    return 1 if alert.state is AState.PENDING_APPROVAL else 2


def _coverage(parent: ET.Element, alert: Alert, rooms: Mapping[str, Tally], district: District) -> None:
    acked = sum(t.acked for t in rooms.values())
    targets = sum(t.targets for t in rooms.values())
    cov = sub(parent, "Coverage")
    sub(cov, "CoverageRate", f"{acked / targets:.4f}" if targets else "0.0000")
    covered = [
        a for r, t in rooms.items() if t.targets and t.acked == t.targets and (a := _room_area(district, r))
    ]
    sub(cov, "AreaCode", ",".join(covered))
    sub(cov, "ResBrdStat", f"{acked},{targets}")


def _items(
    parent: ET.Element,
    alert: Alert,
    rooms: Mapping[str, Tally],
    now: float,
    zone: ZoneInfo,
    convention: str,
    district: District,
) -> None:
    info = sub(parent, "ResBrdInfo")
    start = local(alert.accepted_at, zone)
    for room, t in rooms.items():
        code, desc = state_code(_room_state(t, alert), convention)
        bs = sub(sub(info, "ResBrdItem"), "EBRBS")
        sub(bs, "RptTime", local(now, zone))
        sub(bs, "EBRID", room)
        sub(bs, "BrdSysInfo", f"({room},{t.acked},{t.targets})")
        sub(bs, "StartTime", start)
        sub(bs, "EndTime", local(now, zone) if alert.closed or code in (3, 4, 5) else "")
        sub(bs, "FileURL", "")
        sub(bs, "BrdStateCode", code)
        name = getattr(district.village(room) or district.town(room), "name", room)
        sub(bs, "BrdStateDesc", f"{name} {desc} {t.acked}/{t.targets}")


def ebm_state_response(
    alert: Alert, ebmid: str, district: District, now: float, zone: ZoneInfo, convention: str
) -> ET.Element:
    """EBMStateResponse of a broadcast from above: its state, coverage, one ResBrdItem per room."""
    body = ET.Element("EBMStateResponse")
    sub(body, "RptTime", local(now, zone))
    sub(sub(body, "EBM"), "EBMID", ebmid)
    code, desc = state_code(EBM_STATE[alert.state], convention)
    sub(body, "BrdStateCode", code)
    sub(body, "BrdStateDesc", desc)
    rooms = _rooms(alert, district)
    _coverage(body, alert, rooms, district)
    _items(body, alert, rooms, now, zone, convention, district)
    return body


def waiting_state_response(
    ebmid: str, ebm_state: int, now: float, zone: ZoneInfo, convention: str, desc: str | None = None
) -> ET.Element:
    """EBMStateResponse of a broadcast that has no alert (yet): waiting for its StartTime, or dropped."""
    body = ET.Element("EBMStateResponse")
    sub(body, "RptTime", local(now, zone))
    sub(sub(body, "EBM"), "EBMID", ebmid)
    code, text = state_code(ebm_state, convention)
    sub(body, "BrdStateCode", code)
    sub(body, "BrdStateDesc", desc or text)
    return body


def brd_log(
    alert: Alert, ebmid: str, district: District, now: float, zone: ZoneInfo, convention: str
) -> ET.Element:
    """EBMBrdLog of an ended broadcast: what it was, how it ended, where it played."""
    body = ET.Element("EBMBrdLog")
    sub(body, "RptTime", local(now, zone))
    item = sub(body, "EBMBrdItem")
    sub(sub(item, "EBM"), "EBMID", ebmid)
    req = alert.request
    sub(item, "EventType", req.event_type)
    sub(item, "Severity", req.level)
    sub(item, "MsgType", 3 if req.test else 1)
    sub(item, "StartTime", local(alert.accepted_at, zone))
    sub(item, "EndTime", local(now, zone))
    code, desc = state_code(EBM_STATE[alert.state], convention)
    sub(item, "BrdStateCode", code)
    sub(item, "BrdStateDesc", alert.reason or desc)
    rooms = _rooms(alert, district)
    _coverage(item, alert, rooms, district)
    _items(item, alert, rooms, now, zone, convention, district)
    return body


def terminal_info(terminals: Iterable[Terminal], now: float, zone: ZoneInfo) -> ET.Element:
    """EBRDTInfo: every terminal with its code, name, room and coordinates (a full report)."""
    body = ET.Element("EBRDTInfo")
    params = sub(body, "Params")
    sub(params, "RptStartTime", local(now, zone))
    sub(params, "RptEndTime", local(now, zone))
    sub(params, "RptType", "Full")
    for t in terminals:
        dt = sub(body, "EBRDT")
        sub(dt, "RptTime", local(now, zone))
        sub(dt, "RptType", "Sync")
        sub(dt, "EBRID", t.code)
        sub(dt, "EBRDTName", t.name)
        sub(dt, "EBRPSID", t.room)
        sub(dt, "Longitude", f"{t.lon:.6f}")
        sub(dt, "Latitude", f"{t.lat:.6f}")
    return body


def terminal_state(states: Mapping[str, str], now: float, zone: ZoneInfo) -> ET.Element:
    """EBRDTState: each given terminal's state (terminal code -> liveness state)."""
    body = ET.Element("EBRDTState")
    for code, state in states.items():
        number, desc = TERMINAL_STATE.get(state, (2, "停止"))
        dt = sub(body, "EBRDT")
        sub(dt, "RptTime", local(now, zone))
        sub(dt, "EBRID", code)
        sub(dt, "StateCode", number)
        sub(dt, "StateDesc", desc)
    return body


def connection_check(now: float, zone: ZoneInfo) -> ET.Element:
    """ConnectionCheck (heartbeat)."""
    body = ET.Element("ConnectionCheck")
    sub(body, "RptTime", local(now, zone))
    return body
