"""What a live view shows beside an alert's counts: why the pending wait, and the villages it names.

Read-only views of the delivery core's state, for the control socket's `watch` answers.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ebcd.delivery.alerts import Alert
from ebcd.delivery.preemption import Holders
from ebcd.delivery.state import AState, Bucket, DState
from ebcd.model.alert import CodeTarget
from ebcd.tiers.district import District

AWAITING_ACK = "awaiting acknowledgement"
AWAITING_APPROVAL = "awaiting approval"
NOT_SENT_YET = "not sent yet"


def pending_reasons(alert: Alert, holders: Holders) -> list[dict[str, Any]]:
    """The pending deliveries grouped by why they wait, the largest group first."""
    why: Counter[str] = Counter()
    if not alert.counts[Bucket.PENDING]:
        return []  # (the usual case once an alert is out: nothing to walk)
    for d in alert.deliveries.values():
        if d.bucket is not Bucket.PENDING:
            continue
        if d.state is DState.SENT:
            why[AWAITING_ACK] += 1
        elif d.state in (DState.WAITING, DState.PREEMPTED):
            holder = holders.holder_of(d.terminal)
            verb = "pre-empted; waiting for" if d.state is DState.PREEMPTED else "waiting for"
            why[f"{verb} alert {holder}" if holder and holder != alert.id else f"{verb} the terminal"] += 1
        elif alert.state is AState.PENDING_APPROVAL:
            why[AWAITING_APPROVAL] += 1
        else:
            why[NOT_SENT_YET] += 1
    return [{"why": w, "terminals": n} for w, n in why.most_common()]


def village_rows(alert: Alert, district: District) -> list[dict[str, Any]]:
    """A row per village the alert names as a target (none when it names no village)."""
    named = [t.code for t in alert.request.targets if isinstance(t, CodeTarget) and t.kind == "village"]
    if not named:
        return []
    buckets = alert.buckets()
    rows = []
    for code in dict.fromkeys(named):
        village = district.village(code or "")
        if village is None:
            continue
        rows.append({"code": village.code, "name": village.name, **village.tally(buckets).as_dict()})
    return rows


def progress_doc(alert: Alert, district: District, holders: Holders) -> dict[str, Any]:
    """Why the pending wait, and the rows of the villages the alert names."""
    return {"pending": pending_reasons(alert, holders), "villages": village_rows(alert, district)}
