"""The district on a map: every terminal a dot coloured by its state, towns outlined and named.

For `ebcd report ID --map FILE` (an alert: acknowledged, uncertain, failed, pending, offline) and
`ebcd terminals --map FILE` (liveness). Drawn with matplotlib (the `map` extra), SVG or PNG by the
file's suffix, sized and coloured for a wall screen. Town outlines are the convex hulls of their
terminals: the ledger has points, not boundaries.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ebcd.tiers.district import District
from ebcd.tiers.hull import convex_hull

SUFFIXES = (".svg", ".png")
# state -> (colour, legend label); colour-blind safe (Okabe-Ito), offline dark so it stands out
ALERT_STATES: dict[str, tuple[str, str]] = {
    "acked": ("#009E73", "acknowledged"),
    "uncertain": ("#E69F00", "uncertain"),
    "failed": ("#D55E00", "failed"),
    "pending": ("#56B4E9", "pending"),
    "cancelled": ("#999999", "cancelled"),
    "offline": ("#000000", "offline"),
    "not_targeted": ("#DDDDDD", "not targeted"),
}
LIVENESS_STATES: dict[str, tuple[str, str]] = {
    "online": ("#009E73", "online"),
    "offline": ("#D55E00", "offline"),
    "unknown": ("#999999", "unknown"),
}
CJK_FONTS = ("WenQuanYi Micro Hei", "Noto Sans CJK SC", "Source Han Sans SC", "SimHei", "Microsoft YaHei")


class MapError(Exception):
    """The map cannot be drawn (no plotting library, a file name it cannot write)."""


def check_path(path: Path) -> None:
    """Refuse a file the map cannot be written to, before anything is asked of the daemon."""
    if path.suffix.lower() not in SUFFIXES:
        raise MapError(f"--map {path}: the file must end in .svg or .png")
    if not path.parent.exists():
        raise MapError(f"--map {path}: no folder {path.parent}")


def alert_states(district: District, report: Mapping[str, Any]) -> dict[str, str]:
    """terminal -> its state on the map for an alert's report (`buckets`, `problems`' liveness)."""
    states = {t.code: "not_targeted" for t in district.terminals()}
    states.update(report.get("buckets", {}))
    for p in report.get("problems", []):
        if p.get("liveness") == "offline" and states.get(p["terminal"]) != "acked":
            states[p["terminal"]] = "offline"
    return states


def alert_title(report: Mapping[str, Any]) -> str:
    s = report["state"]
    at = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.get("accepted_at") or time.time()))
    text = (s.get("text") or "")[:40]
    return (
        f"alert {s['id']}  {s['state']}  coverage {s['coverage']:.1%} ({s['acked']}/{s['targets']})\n"
        f"{at}  level {s['level']}  {text}"
    )


def draw(
    district: District,
    states: Mapping[str, str],
    palette: Mapping[str, tuple[str, str]],
    title: str,
    path: Path,
) -> Counter[str]:
    """Write the map to `path`; the number of terminals per state drawn."""
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import font_manager
    except ImportError as e:
        raise MapError(f"maps need matplotlib: pip install 'ebcd[map]' ({e})") from None
    names = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [f for f in CJK_FONTS if f in names]
    plt.rcParams["font.family"] = [*cjk, "DejaVu Sans"]
    plt.rcParams["svg.fonttype"] = "none"  # text stays text in SVG
    counts: Counter[str] = Counter()
    fig, ax = plt.subplots(figsize=_figsize(district), dpi=100)
    try:
        for town in district.towns.values():
            points = [(t.lon, t.lat) for t in town.terminals()]
            if len(points) >= 3:
                hull = convex_hull(points)
                xs, ys = zip(*[*hull, hull[0]], strict=True)
                ax.fill(xs, ys, color="#F2F2F2", zorder=0)
                ax.plot(xs, ys, color="#555555", linewidth=1.2, zorder=1)
            if points:
                cx = sum(p[0] for p in points) / len(points)
                cy = max(p[1] for p in points)
                label = town.name if cjk else town.area
                ax.annotate(label, (cx, cy), xytext=(0, 8), textcoords="offset points", ha="center",
                            fontsize=15, fontweight="bold", color="#222222", zorder=5)  # fmt: skip
        order = list(palette)
        by_state: dict[str, list[tuple[float, float]]] = {s: [] for s in order}
        for t in district.terminals():
            state = states.get(t.code)
            if state in by_state:
                by_state[state].append((t.lon, t.lat))
        for z, state in enumerate(reversed(order)):  # the first state of the palette on top
            pts = by_state[state]
            counts[state] = len(pts)
            if not pts:
                continue
            colour, label = palette[state]
            xs, ys = zip(*pts, strict=True)
            # what needs the duty officer's eye is drawn biggest
            size = 18 if state == "not_targeted" else 46 if state in ("acked", "online") else 110
            ax.scatter(xs, ys, s=size, c=colour, label=f"{label} ({len(pts)})", zorder=2 + z,
                       edgecolors="white", linewidths=0.5)  # fmt: skip
        handles, labels = ax.get_legend_handles_labels()
        rank = {palette[s][1]: i for i, s in enumerate(order)}
        pairs = sorted(zip(labels, handles, strict=True), key=lambda p: rank.get(p[0].rsplit(" (", 1)[0], 99))
        ax.legend([h for _, h in pairs], [lbl for lbl, _ in pairs], loc="upper left", fontsize=14,
                  markerscale=1.6, framealpha=0.95)  # fmt: skip
        ax.set_title(title, fontsize=17, loc="left")
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.set_aspect(1 / _cos_deg(_mid_lat(district)))
        ax.grid(color="#EEEEEE", zorder=0)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return counts


def _figsize(district: District) -> tuple[float, float]:
    """Inches for the district's extent at 10 in high, room for the legend; at least 10 x 10."""
    lons = [t.lon for t in district.terminals()] or [0.0, 1.0]
    lats = [t.lat for t in district.terminals()] or [0.0, 1.0]
    wide = (max(lons) - min(lons)) * _cos_deg(_mid_lat(district)) / max(1e-6, max(lats) - min(lats))
    return (min(20.0, max(10.0, 10 * wide + 3)), 10.0)


def _mid_lat(district: District) -> float:
    lats = [t.lat for t in district.terminals()]
    return (min(lats) + max(lats)) / 2 if lats else 0.0


def _cos_deg(deg: float) -> float:
    import math

    return max(0.1, math.cos(math.radians(deg)))
