"""Geometry figures: resolving a polygon or circle target, the old pure-Python loop against `geo.PointSet`.

Run from the project root: `.venv/bin/python -m bench.geo [--runs N] [--full]`. For the shipped
ledger (769 terminals) and a generated one of 10,000 terminals (uniform in the shipped ledger's
bounding box) it prints the time of `District.resolve` for one polygon of 10, 1,000, 10,000 and
40,000 points, old and new, and their ratio; then a jagged 40,000-point polygon and a circle.
The new code's cost follows the number of edges each terminal's line of latitude meets: about 3
for the star boundaries, about 530 for the jagged polygon (1 km of noise at every vertex, 2 m
apart), which is the stress case, far rougher than any real boundary.

The old implementation costs (terminals x edges) Python steps, up to 80 s for 40,000 points
against 10,000 terminals; without --full, an old time that would exceed a couple of seconds is
measured on a sample of the terminals and scaled to the whole ledger (exact for a loop whose
cost per terminal does not depend on the terminal), marked "~". The new median is over --runs
calls. Old and new must agree on every terminal measured, or the benchmark stops.

The polygons are stars around the district's centre (a few lobes, then noise of about the
vertex spacing, as a digitised boundary has). Above 10,000 points they are built with
`PolygonTarget.model_construct`, since `PolygonTarget` caps `points` at 10,000.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ebcd.config import load_config
from ebcd.model.alert import CircleTarget, PolygonTarget
from ebcd.tiers.district import District
from ebcd.tiers.loader import load_district
from ebcd.tiers.terminal import Terminal
from ebcd.tiers.town import Town
from tests.tiers.test_geo import pure_distance_km, pure_in_polygon  # the frozen reference

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10, 1_000, 10_000, 40_000)
GENERATED = 10_000
OLD_BUDGET_S = 2.0  # without --full, the most one old measurement may take before it is sampled


def old_resolve(terminals: Sequence[Terminal], target: PolygonTarget | CircleTarget) -> tuple[Terminal, ...]:
    """The old `District.resolve([target]).terminals` over `terminals`."""
    chosen: dict[str, Terminal] = {}
    if isinstance(target, PolygonTarget):
        found = (t for t in terminals if pure_in_polygon(t.lat, t.lon, target.points))
    else:
        found = (
            t for t in terminals if pure_distance_km(target.lat, target.lon, t.lat, t.lon) <= target.radius_km
        )
    for t in found:
        chosen.setdefault(t.code, t)
    return tuple(t for t in terminals if t.code in chosen)


def generated_district(shipped: District, count: int, rng: random.Random) -> District:
    """A district of `count` terminals spread uniformly over the shipped ledger's bounding box."""
    lats = [t.lat for t in shipped.terminals()]
    lons = [t.lon for t in shipped.terminals()]
    town = Town(code="5" + "0" * 22, name="generated", area=shipped.area)
    for i in range(count):
        town.own_terminals.append(
            Terminal(
                code=f"gen{i:05d}",
                name=f"generated {i}",
                room=town.code,
                village=None,
                town=town.code,
                lat=rng.uniform(min(lats), max(lats)),
                lon=rng.uniform(min(lons), max(lons)),
            )
        )
    district = District(code=shipped.code, name="generated", area=shipped.area, towns={town.code: town})
    district.index()
    return district


def star(
    n: int, centre: tuple[float, float], radius: float, noise: float, rng: random.Random
) -> PolygonTarget:
    """A closed ring of `n` points: a few lobes, plus radial noise of `noise` degrees at each vertex."""
    ring = []
    for k in range(n - 1):
        th = 2 * math.pi * k / (n - 1)
        r = radius * (1 + 0.25 * math.sin(5 * th) + 0.1 * math.sin(13 * th)) + noise * rng.uniform(-1, 1)
        ring.append((centre[0] + r * math.sin(th), centre[1] + r * math.cos(th)))
    ring.append(ring[0])
    if n <= 10_000:
        return PolygonTarget(points=ring)
    return PolygonTarget.model_construct(kind="polygon", points=ring)


def median_s(op: Callable[[], object], runs: int) -> float:
    """The median wall time of `op` in seconds over `runs` calls (after one warm-up)."""
    op()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def compare(
    district: District, target: PolygonTarget | CircleTarget, runs: int, full: bool, rng: random.Random
) -> tuple[str, float, float, bool, int]:
    """(old time as text, old seconds, new seconds, old was sampled, terminals selected)."""
    ledger = list(district.terminals())
    new = district.resolve([target]).terminals
    new_s = median_s(lambda: district.resolve([target]), runs)
    probe = ledger[: min(len(ledger), 50)]
    start = time.perf_counter()
    old_resolve(probe, target)
    per_terminal = (time.perf_counter() - start) / len(probe)
    sampled = not full and per_terminal * len(ledger) > OLD_BUDGET_S
    if sampled:
        sample = rng.sample(ledger, max(len(probe), int(OLD_BUDGET_S / per_terminal)))
        start = time.perf_counter()
        old = old_resolve(sample, target)
        old_s = (time.perf_counter() - start) * len(ledger) / len(sample)
        chosen = set(new)
        if set(old) != {t for t in sample if t in chosen}:
            raise SystemExit(f"old and new disagree on {target} over {len(ledger)} terminals")
    else:
        start = time.perf_counter()
        old = old_resolve(ledger, target)
        old_s = time.perf_counter() - start
        if old != new:
            raise SystemExit(f"old and new disagree on {target} over {len(ledger)} terminals")
    return ("~" if sampled else "") + f"{old_s * 1000:,.1f}", old_s, new_s, sampled, len(new)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=11, help="calls per new median (default 11)")
    parser.add_argument("--full", action="store_true", help="time the old code on every terminal")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    shipped = load_district(load_config(ROOT / "config" / "ebcd.toml"))
    ledgers = {
        f"shipped {len(shipped)}": shipped,
        f"generated {GENERATED:,}": generated_district(shipped, GENERATED, rng),
    }
    lats = [t.lat for t in shipped.terminals()]
    lons = [t.lon for t in shipped.terminals()]
    centre = ((min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2)
    radius = (max(lats) - min(lats)) / 3
    polygons = {f"{n:,}": star(n, centre, radius, 2 * math.pi * radius / n, rng) for n in SIZES}
    polygons["40,000 jagged"] = star(40_000, centre, radius, 0.01, rng)  # about 1 km
    circle = CircleTarget(lat=centre[0], lon=centre[1], radius_km=10.0)

    header = f"{'ledger':<16} {'target':<22} {'old ms':>12} {'new ms':>9} {'old/new':>9} {'inside':>7}"
    print(header)
    print("-" * len(header))
    for name, district in ledgers.items():
        rows: list[tuple[str, PolygonTarget | CircleTarget]] = [
            (f"polygon {label}", p) for label, p in polygons.items()
        ]
        rows.append(("circle 10 km", circle))
        for label, target in rows:
            old_text, old_s, new_s, _, inside = compare(district, target, args.runs, args.full, rng)
            print(
                f"{name:<16} {label:<22} {old_text:>12} {new_s * 1000:>9.2f} "
                f"{old_s / new_s:>8,.0f}x {inside:>7}"
            )
    big = [(y, x) for y, x in polygons["10,000"].points]
    validate_s = median_s(lambda: PolygonTarget(points=big), max(3, args.runs // 3))
    print(f"\n(for scale: validating a 10,000-point PolygonTarget takes {validate_s * 1000:.1f} ms)")
    print("~ = the old loop timed on a sample of the terminals and scaled to the whole ledger")


if __name__ == "__main__":
    main()
