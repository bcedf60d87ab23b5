"""The duty room at a glance, for `ebcd top`: alerts in flight and the last ended, liveness per
town, links down, recent refusals. A read-only view of the daemon's state (`top` op)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from ebcd.control.progress import progress_doc
from ebcd.delivery.alerts import Alert
from ebcd.delivery.core import Core
from ebcd.delivery.liveness import Live
from ebcd.delivery.state import AState
from ebcd.tiers.district import District

IN_FLIGHT = frozenset({AState.PENDING_APPROVAL, AState.DISPATCHING})

Links = Callable[[], list[dict[str, Any]]]  # [{"what", "where", "up", "detail"}]
Rejections = Callable[[], list[dict[str, Any]]]  # newest last: {"at", "reason", "detail", "identifier"}


def duty_doc(
    core: Core,
    district: District,
    now: float,
    *,
    links: Links | None,
    rejections: Rejections | None,
    recent_alerts: int,
) -> dict[str, Any]:
    """One snapshot of the duty room (`now`: the runner's monotonic clock): the alerts in flight
    and the `recent_alerts` last settled or ended, newest first."""
    flying = [a for a in core.alerts.values() if a.state in IN_FLIGHT]
    ended = [a for a in core.alerts.values() if a.state not in IN_FLIGHT]
    ended.sort(key=lambda a: (a.accepted_at, a.order), reverse=True)
    flying.sort(key=lambda a: (a.accepted_at, a.order), reverse=True)
    return {
        "at": time.time(),
        "district": {"code": district.code, "name": district.name},
        "alerts": [_alert(a, district, core, now) for a in flying + ended[:recent_alerts]],
        "alerts_held": len(core.alerts),
        "towns": towns_liveness(core, district, now),
        "links": links() if links is not None else [],
        "rejections": rejections() if rejections is not None else [],
    }


def _alert(alert: Alert, district: District, core: Core, now: float) -> dict[str, Any]:
    return {"state": alert.state_doc(district, now), "progress": progress_doc(alert, district, core.holders)}


def towns_liveness(core: Core, district: District, now: float) -> list[dict[str, Any]]:
    """Per town: terminals online, offline and unknown, and those not online with when last heard."""
    out = []
    for town in district.towns.values():
        counts = dict.fromkeys((s.value for s in Live), 0)
        not_online = []
        for term in town.terminals():
            live = core.liveness.terminals[term.code]
            counts[live.state.value] += 1
            if live.state is not Live.ONLINE:
                never = live.session < 0 and live.last_seen == 0.0
                not_online.append(
                    {
                        "code": term.code,
                        "name": term.name,
                        "state": live.state.value,
                        "last_seen_s": None if never else round(max(0.0, now - live.last_seen), 1),
                    }
                )
        out.append({"code": town.code, "name": town.name, **counts, "not_online": not_online})
    return out


def links_doc(items: Iterable[tuple[str, str, bool, str]]) -> list[dict[str, Any]]:
    """(what, where, up, detail) tuples as the snapshot's `links`."""
    return [{"what": w, "where": where, "up": up, "detail": d} for w, where, up, d in items]
