"""Each terminal's attempts at an alert, read from the journal's transition log (pure).

The log holds one row per delivery change: the state it reached, its cause (or how far it
played), the wall time, and whether an attempt went out. An attempt is a row that sent; its
outcome is the first change after it (acknowledged, uncertain, refused, pre-empted, ...), and a
late acknowledgement still upgrades it. A resend the duty officer asked for shows on the attempt
it started, with who asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ebcd.tiers.district import District

RESENT_BY = "resent by "  # how a resend's cause starts (the control socket adds who asked)
IN_FLIGHT = "in flight"
ACKNOWLEDGED = "acknowledged"


def attempt_history(
    rows: Iterable[tuple[str, str, str | None, float, bool]], link_of: Callable[[str], str]
) -> dict[str, dict[str, Any]]:
    """terminal -> {"resent": whether a resend reached it, "attempts": [...]} from (terminal,
    state, detail, wall time, sent) rows in log order; each attempt has n, at, link, outcome,
    outcome_at, cause and asked_by (the resend that started it, or None)."""
    out: dict[str, dict[str, Any]] = {}
    asked: dict[str, str] = {}
    for terminal, state, detail, at, sent in rows:
        entry = out.setdefault(terminal, {"resent": False, "attempts": []})
        attempts: list[dict[str, Any]] = entry["attempts"]
        if sent:
            attempts.append(
                {
                    "n": len(attempts) + 1,
                    "at": at,
                    "link": link_of(terminal),
                    "outcome": IN_FLIGHT,
                    "outcome_at": None,
                    "cause": None,
                    "asked_by": asked.pop(terminal, None),
                }
            )
            continue
        if detail is not None and detail.startswith(RESENT_BY):
            asked[terminal] = detail.removeprefix(RESENT_BY)
            entry["resent"] = True
            continue
        if not attempts:
            continue
        last = attempts[-1]
        if last["outcome"] == IN_FLIGHT or (state == ACKNOWLEDGED and last["outcome"] != ACKNOWLEDGED):
            last.update(outcome=state, outcome_at=at, cause=detail)
        elif state == ACKNOWLEDGED:  # received, then playing, then done: how far it got
            last["cause"] = detail
    return {t: e for t, e in out.items() if e["attempts"] or e["resent"]}


def ledger_link(district: District) -> Callable[[str], str]:
    """A terminal's link as a report names it: mqtt, or serial/adapter with its room's port."""

    def link_of(code: str) -> str:
        term = district.terminal(code)
        if term is None:
            return "?"
        port = getattr(district.room_of(term), "port", None)
        if term.link == "adapter" and port and not port.rpartition(":")[2].isdigit():
            port = port.rpartition(":")[0] + ":<port in the run folder>"  # tcp://HOST:{run_dir}
        return f"{term.link} {port}" if term.link != "mqtt" and port else term.link

    return link_of
