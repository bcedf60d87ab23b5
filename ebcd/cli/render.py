"""How the CLI shows alerts, reports and terminals to a person (rich tables and progress)."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ebcd.control.socket import ControlClient, NoDaemon
from ebcd.tiers.district import District

# A pipe or a file gets whole lines: codes are never folded or cut to the 80 columns rich assumes
# when it cannot ask a terminal (nor to a COLUMNS the shell left in the environment).
UNBOUNDED_WIDTH = 10_000


def _console_for(stream: TextIO, *, stderr: bool) -> Console:
    """A console as wide as the terminal, or unbounded when the output is not a terminal."""
    try:
        tty = stream.isatty()
    except ValueError:  # a closed stream
        tty = False
    return Console(stderr=stderr) if tty else Console(stderr=stderr, width=UNBOUNDED_WIDTH)


console = _console_for(sys.stdout, stderr=False)
err_console = _console_for(sys.stderr, stderr=True)


def follow(client: ControlClient, alert_id: str, first: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Follow an alert until it settles, live unless `quiet`; return its last state.

    On a terminal the live view redraws in place; to a pipe or a file it writes a line per change.
    """
    return asyncio.run(_follow(client, alert_id, first, quiet=quiet))


async def _follow(
    client: ControlClient, alert_id: str, first: dict[str, Any], *, quiet: bool
) -> dict[str, Any]:
    seen: dict[str, Any] = {"state": first, "progress": {"pending": [], "villages": []}}
    live = None
    if not quiet and err_console.is_terminal:
        live = Live(get_renderable=lambda: live_view(seen["state"], seen["progress"]), console=err_console)
        live.start()
    said = ""
    try:
        async for answer in client.stream("watch", id=alert_id):
            if not answer.get("ok"):
                break
            seen["state"], seen["progress"] = answer["state"], answer.get("progress") or seen["progress"]
            if live is not None:
                live.refresh()
            elif not quiet:
                lines = "\n".join(live_lines(seen["state"], seen["progress"]))
                if lines != said:
                    err_console.print(lines, markup=False, highlight=False, soft_wrap=True)
                    said = lines
    except NoDaemon as e:
        err_console.print(f"ebcd: lost the daemon while following {alert_id}: {e}", markup=False)
    finally:
        if live is not None:
            live.stop()
    last: dict[str, Any] = seen["state"]
    if not quiet:
        print_state(last)
    return last


def _counts(t: dict[str, Any]) -> str:
    return (
        f"{t['acked']}/{t['targets']} acked, {t.get('uncertain', 0)} uncertain, {t.get('failed', 0)} failed,"
        f" {t.get('pending', 0)} pending"
    )


def pending_text(progress: dict[str, Any]) -> str:
    """'40 awaiting acknowledgement, 3 waiting for alert X', or '' when nothing is pending."""
    return ", ".join(f"{p['terminals']} {p['why']}" for p in progress.get("pending", []))


def live_lines(state: dict[str, Any], progress: dict[str, Any]) -> list[str]:
    """The live view as plain lines: the alert, why its pending wait, and the villages it names."""
    head = f"{state['id']} {state['state']}: {_counts(state)}"
    why = pending_text(progress)
    lines = [f"{head} ({why})" if why else head]
    for v in progress.get("villages", []):
        lines.append(f"  village {v['code']} {v['name']}: {_counts(v)}")
    return lines


def live_view(state: dict[str, Any], progress: dict[str, Any]) -> RenderableType:
    """The live view for a terminal (fits 80 columns): the alert with a bar, then the other counts
    and why the pending wait, then a row per village it names."""
    grid = Table.grid(padding=(0, 1))
    for _ in range(5):
        grid.add_column(no_wrap=True)
    grid.add_row(
        Text(state["id"], style="bold"),
        Text(state["state"]),
        ProgressBar(total=max(1, state["targets"]), completed=state["acked"], width=30),
        Text(f"{state['acked']}/{state['targets']} acked"),
        Text(_elapsed(state)),
    )
    rest = f"{state['uncertain']} uncertain, {state['failed']} failed, {state['pending']} pending"
    why = pending_text(progress)
    parts: list[RenderableType] = [grid, Text(f"  {rest}: {why}" if why else f"  {rest}")]
    villages = progress.get("villages", [])
    if villages:
        rows = Table(box=None, padding=(0, 1), show_edge=False)
        for col in ("village", "name", "targets", "acked", "uncertain", "failed", "pending"):
            rows.add_column(col, justify="left" if col in ("village", "name") else "right", no_wrap=True)
        for v in villages:
            rows.add_row(
                v["code"],
                v["name"],
                *(str(v.get(k, 0)) for k in ("targets", "acked", "uncertain", "failed", "pending")),
            )
        parts.append(rows)
    return Group(*parts)


def _clock(at: float) -> str:
    """A wall time as the duty room reads it: local, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _elapsed(state: dict[str, Any]) -> str:
    at = state.get("accepted_at")
    if not at:
        return ""
    s = max(0.0, time.time() - float(at))
    return f"{int(s // 60)}:{int(s % 60):02d}"


def coverage_table(state: dict[str, Any], names: dict[str, str] | None = None) -> Table:
    """Coverage per town."""
    table = Table(title=f"alert {state['id']}: {state['state']}, coverage {state['coverage']:.1%}")
    table.add_column("town", no_wrap=True, min_width=23)  # a code is never cut
    table.add_column("name")
    for col in ("targets", "acked", "uncertain", "failed", "coverage"):
        table.add_column(col, justify="right")
    for code, t in state["towns"].items():
        cov = t["acked"] / t["targets"] if t["targets"] else 1.0
        table.add_row(
            code,
            t.get("name") or (names or {}).get(code, ""),
            str(t["targets"]),
            str(t["acked"]),
            str(t.get("uncertain", 0)),
            str(t.get("failed", 0)),
            f"{cov:.1%}",
        )
    table.add_row(
        "total",
        "",
        str(state["targets"]),
        str(state["acked"]),
        str(state["uncertain"]),
        str(state["failed"]),
        f"{state['coverage']:.1%}",
        style="bold",
    )
    return table


def print_state(state: dict[str, Any], names: dict[str, str] | None = None) -> None:
    """An alert's state with its coverage per town."""
    console.print(coverage_table(state, names))


def print_alerts(alerts: list[dict[str, Any]]) -> None:
    """One line per alert."""
    table = Table()
    for col in ("id", "state", "level", "event", "targets", "acked", "coverage", "text"):
        table.add_column(col)
    for a in alerts:
        table.add_row(
            a["id"],
            a["state"],
            str(a["level"]),
            a.get("event_type", ""),
            str(a["targets"]),
            str(a["acked"]),
            f"{a['coverage']:.1%}",
            (a.get("text") or "")[:40],
        )
    console.print(table)


def print_report(report: dict[str, Any]) -> None:
    """Coverage per town and village, then every terminal that did not acknowledge and why."""
    state = report["state"]
    table = Table(title=f"alert {state['id']}: {state['state']}, coverage {state['coverage']:.1%}")
    for col in ("town / village", "name", "targets", "acked", "uncertain", "failed", "coverage"):
        table.add_column(
            col, no_wrap=col == "town / village", min_width=25 if col == "town / village" else None
        )
    for town in report["towns"]:
        table.add_row(
            town["code"],
            town["name"],
            str(town["targets"]),
            str(town["acked"]),
            str(town["uncertain"]),
            str(town["failed"]),
            f"{town['coverage']:.1%}",
            style="bold",
        )
        for v in town["villages"]:
            if v["acked"] < v["targets"]:
                table.add_row(
                    "  " + v["code"],
                    v["name"],
                    str(v["targets"]),
                    str(v["acked"]),
                    str(v["uncertain"]),
                    str(v["failed"]),
                    f"{v['coverage']:.1%}",
                )
    console.print(table)
    if report["problems"]:
        problems = Table(title=f"{len(report['problems'])} terminal(s) without acknowledgement")
        for col in ("terminal", "name", "state", "cause", "attempts", "liveness"):
            problems.add_column(col, no_wrap=col == "terminal", min_width=23 if col == "terminal" else None)
        for p in report["problems"]:
            problems.add_row(
                p["terminal"], p["name"], p["state"], p.get("cause") or "", str(p["attempts"]), p["liveness"]
            )
        console.print(problems)
    history = {code: h for code, h in report.get("history", {}).items() if h["attempts"]}
    if history:
        table = Table(title=f"attempts of {len(history)} terminal(s) without acknowledgement or resent")
        for col in ("terminal", "#", "sent at", "link", "outcome", "cause", "asked by"):
            table.add_column(col, no_wrap=col in ("terminal", "sent at"))
        for code, h in history.items():
            for a in h["attempts"]:
                table.add_row(
                    code, str(a["n"]), _clock(a["at"]), a["link"], a["outcome"], a.get("cause") or "",
                    a.get("asked_by") or "",
                )  # fmt: skip
        console.print(table)
    if report.get("history_error"):
        err_console.print(f"ebcd: no attempt history: {report['history_error']}", markup=False)


def ago(seconds: float | None) -> str:
    """12.5 -> "12 s ago", 185 -> "3 min ago", None -> "never" (not heard since the daemon started)."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def print_terminals(rows: list[dict[str, Any]]) -> None:
    """One line per terminal, with when the daemon last heard it."""
    table = Table(title=f"{len(rows)} terminal(s)")
    for col in ("code", "name", "link", "state", "last seen"):
        table.add_column(col, no_wrap=col == "code")
    for r in rows:
        table.add_row(r["code"], r["name"], r["link"], r["state"], ago(r.get("last_seen_s")))
    console.print(table)


def print_topology(district: District) -> None:
    """The tree of towns and villages with their terminal counts."""
    tree = Tree(f"{district.name} {district.code} ({len(district)} terminals)")
    for town in district.towns.values():
        branch = tree.add(f"{town.name} {town.code} ({sum(1 for _ in town.terminals())} terminals)")
        for v in town.villages.values():
            branch.add(f"{v.name} {v.code} [{v.link}] ({len(v.terminals)})")
    console.print(tree)
