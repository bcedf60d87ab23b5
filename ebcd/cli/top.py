"""`ebcd top`: the duty room's full-screen live view, redrawn from the daemon's `top` stream.

Keys: up/down (or k/j) pick an alert, Enter shows its villages and terminals without
acknowledgement (Esc or Enter again goes back), t lists the terminals not online by town, q quits.
Fits 80x24 over SSH; a bigger terminal shows more rows. The picked alert's details come from one
`report` request when it is opened and again when its state changes, never from a poll per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import time
import tty
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ebcd.cli.render import ago, pending_text
from ebcd.control.socket import ControlClient, NoDaemon

STATE_STYLE = {
    "dispatching": "bold yellow",
    "pending_approval": "magenta",
    "completed": "green",
    "partial": "bold red",
    "cancelled": "dim",
    "expired": "red",
    "rejected": "dim",
}


class Quit(Exception):
    """The duty officer pressed q."""


@dataclass
class View:
    """What the screen shows: the latest snapshot and the officer's choices."""

    room: dict[str, Any] | None = None
    selected: int = 0
    mode: str = "alerts"  # alerts | detail | terminals
    detail: dict[str, Any] | None = None  # the picked alert's report
    detail_for: str | None = None
    error: str | None = None
    keys: list[str] = field(default_factory=list)

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.room["alerts"]) if self.room else []

    def picked(self) -> str | None:
        alerts = self.alerts()
        if not alerts:
            return None
        self.selected = max(0, min(self.selected, len(alerts) - 1))
        return str(alerts[self.selected]["state"]["id"])

    def key(self, k: str) -> bool:
        """Apply a key; True when the picked alert's report must be fetched."""
        if k in ("q", "Q"):
            raise Quit
        if k in ("up", "k"):
            self.selected = max(0, self.selected - 1)
        elif k in ("down", "j"):
            self.selected += 1
        elif k == "enter":
            self.mode = "alerts" if self.mode == "detail" else "detail"
            return self.mode == "detail"
        elif k == "esc":
            self.mode = "alerts"
        elif k == "t":
            self.mode = "alerts" if self.mode == "terminals" else "terminals"
        return False


def render(view: View, width: int, height: int) -> RenderableType:
    """The screen for a snapshot, cut to `height` rows."""
    room = view.room
    if room is None:
        return Text(view.error or "waiting for the daemon …")
    parts: list[RenderableType] = [_header(room, view, width)]
    budget = height - 1
    if view.mode == "terminals":
        parts.append(_not_online(room, budget, width))
        return Group(*parts)
    alerts = view.alerts()
    picked = view.picked()
    rows = min(len(alerts), max(3, budget // 3))
    parts.append(_alerts(alerts, view.selected, rows, width))
    budget -= rows + 2
    chosen = next((a for a in alerts if a["state"]["id"] == picked), None)
    if view.mode == "detail" and chosen is not None:
        parts.append(_detail(chosen, view.detail if view.detail_for == picked else None, budget, width))
        return Group(*parts)
    if chosen is not None:
        towns = _coverage(chosen["state"], budget)
        parts.append(towns)
        budget -= towns.row_count + 1
    parts.append(_health(room, max(2, budget), width))
    return Group(*parts)


def _header(room: dict[str, Any], view: View, width: int) -> Text:
    counts = {"online": 0, "offline": 0, "unknown": 0}
    for t in room["towns"]:
        for k in counts:
            counts[k] += t[k]
    down = [link for link in room["links"] if not link["up"]]
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"{room['district']['name']}  {time.strftime('%H:%M:%S')}  ", style="bold")
    t.append(f"{counts['online']} online ", style="green")
    t.append(f"{counts['offline']} offline ", style="red" if counts["offline"] else "")
    t.append(f"{counts['unknown']} unknown  ", style="yellow" if counts["unknown"] else "")
    t.append(f"{len(down)} link(s) down" if down else "links up", style="bold red" if down else "green")
    t.append("   ebcd top: q quit  ↑↓ pick  ⏎ details  t terminals", style="dim")  # (cut when narrow)
    if view.error:
        t.append(f"  {view.error}", style="bold red")
    return t


def _alerts(alerts: list[dict[str, Any]], selected: int, rows: int, width: int) -> Table:
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False, header_style="bold")
    table.add_column("alert", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("L", no_wrap=True)
    table.add_column("acked", justify="right", no_wrap=True)
    table.add_column("cov", justify="right", no_wrap=True)
    table.add_column("unc", justify="right", no_wrap=True)
    table.add_column("fail", justify="right", no_wrap=True)
    table.add_column("pend", justify="right", no_wrap=True)
    table.add_column("why pending / text", overflow="ellipsis", no_wrap=True, ratio=1)
    first = max(0, min(selected - rows + 1, len(alerts) - rows))
    for i, a in enumerate(alerts[first : first + rows], start=first):
        s = a["state"]
        why = pending_text(a["progress"]) or s.get("text") or ""
        table.add_row(
            ("▶ " if i == selected else "  ") + s["id"],
            Text(s["state"], style=STATE_STYLE.get(s["state"], "")),
            str(s["level"]),
            f"{s['acked']}/{s['targets']}",
            f"{s['coverage']:.0%}",
            str(s["uncertain"]),
            str(s["failed"]),
            str(s["pending"]),
            why,
            style="reverse" if i == selected else "",
        )
    if not alerts:
        table.add_row("  (no alerts)", "", "", "", "", "", "", "", "")
    return table


def _coverage(state: dict[str, Any], budget: int) -> Table:
    table = Table(box=None, padding=(0, 1), show_header=False, expand=True, show_edge=False)
    table.add_column("town", no_wrap=True)
    table.add_column("bar", ratio=1)
    table.add_column("n", justify="right", no_wrap=True)
    for code, t in list(state["towns"].items())[: max(1, budget - 4)]:
        targets = t["targets"] or 1
        table.add_row(
            t.get("name") or code,
            ProgressBar(total=targets, completed=t["acked"]),
            f"{t['acked']}/{t['targets']} {t['acked'] / targets:.0%}",
        )
    return table


def _health(room: dict[str, Any], budget: int, width: int) -> Group:
    """Links down (one line per kind of link), terminals not online per town, the last refusals."""
    lines: list[Text] = []
    down: dict[str, list[dict[str, Any]]] = {}
    for link in room["links"]:
        if not link["up"]:
            down.setdefault(link["what"], []).append(link)
    for what, links in down.items():
        names = ", ".join(link.get("detail") or link["where"] for link in links)
        lines.append(_line(f"DOWN {len(links)} {what}{'s' if len(links) > 1 else ''}: {names}", "bold red"))
    for t in room["towns"]:
        if t["offline"] or t["unknown"]:
            total = t["online"] + t["offline"] + t["unknown"]
            lines.append(
                _line(f"{t['name']}: {t['offline']} offline, {t['unknown']} unknown of {total}", "yellow")
            )
    for r in reversed(room["rejections"][-3:]):
        at = time.strftime("%H:%M:%S", time.localtime(r["at"]))
        lines.append(_line(f"refused {at} [{r['reason']}] {r['detail']}", "red"))
    if len(lines) > budget:
        hidden = len(lines) - budget + 1
        lines = [
            *lines[: budget - 1],
            _line(f"… {hidden} more line(s): press t, or use a taller terminal", "dim"),
        ]
    return Group(*lines)


def _line(text: str, style: str) -> Text:
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _detail(chosen: dict[str, Any], report: dict[str, Any] | None, budget: int, width: int) -> RenderableType:
    """The picked alert: each village without full acknowledgement, then its terminals that lack it."""
    s = chosen["state"]
    head = Text(
        f"{s['id']} {s['state']} {s.get('text') or ''}", style="bold", no_wrap=True, overflow="ellipsis"
    )
    if report is None:
        return Group(head, Text("loading the report …", style="dim"))
    problems = report["problems"]
    if not problems:
        return Group(head, Text("every terminal acknowledged", style="green"))
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False, header_style="bold")
    table.add_column("village / terminal", no_wrap=True)
    table.add_column("name", no_wrap=True, overflow="ellipsis")
    table.add_column("acked", justify="right", no_wrap=True)
    table.add_column("state / cause", overflow="ellipsis", no_wrap=True, ratio=1)
    by_room: dict[str | None, list[dict[str, Any]]] = {}
    for p in problems:
        by_room.setdefault(p.get("room"), []).append(p)
    room_rows = max(0, budget - 3)
    shown = 0

    def terminal_row(p: dict[str, Any]) -> None:
        nonlocal shown
        if table.row_count < room_rows:
            table.add_row("  " + p["terminal"], p["name"], "", f"{p['state']} {p.get('cause') or ''}")
            shown += 1

    for town in report["towns"]:
        for v in town["villages"]:
            if v["acked"] >= v["targets"] or table.row_count >= room_rows:
                continue
            table.add_row(v["code"], v["name"], f"{v['acked']}/{v['targets']}", "", style="bold")
            for p in by_room.pop(v["code"], []):
                terminal_row(p)
    for rest in by_room.values():  # terminals of a room the report has no row for
        for p in rest:
            terminal_row(p)
    hidden = len(problems) - shown
    more = (
        Text(f"… and {hidden} more terminal(s): ebcd report {s['id']}", style="dim")
        if hidden > 0
        else Text("")
    )
    return Group(head, table, more)


def _not_online(room: dict[str, Any], budget: int, width: int) -> Table:
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False, header_style="bold")
    table.add_column("town", no_wrap=True)
    table.add_column("terminal", no_wrap=True)
    table.add_column("name", no_wrap=True, overflow="ellipsis")
    table.add_column("state", no_wrap=True)
    table.add_column("last seen", no_wrap=True)
    rows = 0
    for t in room["towns"]:
        everyone = t["offline"] + t["unknown"] == t["online"] + t["offline"] + t["unknown"]
        if everyone and t["not_online"] and not any(x["last_seen_s"] is not None for x in t["not_online"]):
            if rows < budget - 1:  # a whole town never heard: one line, not a screenful
                table.add_row(t["name"], f"all {len(t['not_online'])}", "", "unknown", "never")
                rows += 1
            continue
        for x in t["not_online"]:
            if rows < budget - 1:
                table.add_row(t["name"], x["code"], x["name"], x["state"], ago(x["last_seen_s"]))
                rows += 1
    if rows == 0:
        table.add_row("", "every terminal is online", "", "", "")
    return table


# -- the terminal ------------------------------------------------------------------------------
_KEYS = {"\x1b[A": "up", "\x1b[B": "down", "\r": "enter", "\n": "enter", "\x1b": "esc", "\x03": "q"}


def _decode_keys(data: str) -> list[str]:
    out = []
    i = 0
    while i < len(data):
        for seq in ("\x1b[A", "\x1b[B", "\x1b[C", "\x1b[D"):
            if data.startswith(seq, i):
                out.append(_KEYS.get(seq, ""))
                i += len(seq)
                break
        else:
            out.append(_KEYS.get(data[i], data[i]))
            i += 1
    return [k for k in out if k]


def run_top(client: ControlClient) -> int:
    """Run the view until q; 0 when the officer quits, 2 without a terminal or a daemon."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("ebcd: top needs a terminal (for scripts: ebcd alert list --json, ebcd terminals --json)",
              file=sys.stderr)  # fmt: skip
        return 2
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        return asyncio.run(_top(client, fd))
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _top(client: ControlClient, fd: int) -> int:
    console = Console()
    view = View()
    keys: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def on_stdin() -> None:
        for k in _decode_keys(os.read(fd, 64).decode(errors="replace")):
            keys.put_nowait(k)

    loop.add_reader(fd, on_stdin)
    live = Live(console=console, screen=True, auto_refresh=False, vertical_overflow="crop")

    def redraw() -> None:
        live.update(render(view, console.width, console.height), refresh=True)

    async def fetch_detail() -> None:
        picked = view.picked()
        if picked is None:
            return
        with contextlib.suppress(NoDaemon):
            answer = await client.request("report", id=picked)
            if answer.get("ok"):
                view.detail, view.detail_for = answer, picked
                redraw()

    async def follow() -> None:
        last_seen: dict[str, Any] = {}
        while True:
            try:
                async for answer in client.stream("top"):
                    if not answer.get("ok"):
                        view.error = f"{answer.get('message')} [{answer.get('error')}]"
                        redraw()
                        break
                    view.room, view.error = answer["room"], None
                    picked = view.picked()
                    now = next((a["state"] for a in view.alerts() if a["state"]["id"] == picked), None)
                    if view.mode == "detail" and now is not None and now != last_seen.get(picked or ""):
                        last_seen[picked or ""] = now
                        tg.create_task(fetch_detail())
                    redraw()
            except NoDaemon as e:
                view.error = f"lost the daemon: {e}; retrying"
                redraw()
            await asyncio.sleep(1.0)

    async def read_keys() -> None:
        while True:
            k = await keys.get()
            if view.key(k):
                view.detail = None
                tg.create_task(fetch_detail())
            redraw()

    with live:
        redraw()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(follow(), name="top-stream")
                tg.create_task(read_keys(), name="top-keys")
        except* Quit:
            pass
        finally:
            loop.remove_reader(fd)
    return 0
