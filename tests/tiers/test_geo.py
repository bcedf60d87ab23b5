"""Polygon and circle targets: the vectorised geometry answers exactly as the old pure-Python loop did.

`pure_in_polygon` and `pure_distance_km` are the implementation `District.resolve` used before
`geo.PointSet`, kept here verbatim as the reference.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ebcd.model.alert import CircleTarget, PolygonTarget
from ebcd.tiers import geo
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal

Ring = list[tuple[float, float]]


# -- the reference: the old implementation, unchanged ---------------------------------------
def pure_in_polygon(lat: float, lon: float, points: Sequence[tuple[float, float]]) -> bool:
    """True if (lat, lon) lies inside the closed polygon of (lat, lon) points (even-odd rule)."""
    inside = False
    n = len(points)
    for i in range(n - 1):
        (y1, x1), (y2, x2) = points[i], points[i + 1]
        if (y1 > lat) != (y2 > lat):
            x_cross = x1 + (lat - y1) * (x2 - x1) / (y2 - y1)
            if lon < x_cross:
                inside = not inside
    return inside


def pure_distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two points, haversine formula."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * geo.EARTH_RADIUS_KM * math.asin(math.sqrt(a))


def pure_resolve(district: District, targets: Sequence[PolygonTarget | CircleTarget]) -> tuple[Terminal, ...]:
    """What the old `District.resolve` returned for polygon and circle targets."""
    chosen: set[str] = set()
    for target in targets:
        for t in district.terminals():
            if isinstance(target, PolygonTarget):
                hit = pure_in_polygon(t.lat, t.lon, target.points)
            else:
                hit = pure_distance_km(target.lat, target.lon, t.lat, t.lon) <= target.radius_km
            if hit:
                chosen.add(t.code)
    return tuple(t for t in district.terminals() if t.code in chosen)


def pure_mask(lats: Sequence[float], lons: Sequence[float], ring: Ring) -> list[bool]:
    return [pure_in_polygon(y, x, ring) for y, x in zip(lats, lons, strict=True)]


# -- strategies ---------------------------------------------------------------------------
# A coarse grid mixed with free floats puts many points exactly on vertices, on edges and on the
# lines of latitude through vertices, where the ray test is most fragile.
GRID = [i / 4 for i in range(-8, 9)]
coord = st.one_of(st.sampled_from(GRID), st.floats(-2.5, 2.5, allow_nan=False))
point = st.tuples(coord, coord)


@st.composite
def rings(draw: st.DrawFn, *, closed: bool = True) -> Ring:
    """Random vertex lists: mostly self-intersecting, with repeated and collinear vertices."""
    vertices = draw(st.lists(point, min_size=1, max_size=40))
    return [*vertices, vertices[0]] if closed else vertices


@st.composite
def probes(draw: st.DrawFn, ring: Ring) -> list[tuple[float, float]]:
    """Free points, the ring's vertices, points on its edges, and points just outside its box."""
    out = draw(st.lists(point, max_size=80))
    out += ring
    for (y1, x1), (y2, x2) in itertools.pairwise(ring):
        t = draw(st.sampled_from([0.0, 0.25, 0.5, 1 / 3]))
        out.append((y1 + t * (y2 - y1), x1 + t * (x2 - x1)))
    west, east = min(x for _, x in ring), max(x for _, x in ring)
    for y in {y for y, _ in ring} | {y for y, _ in out[: len(ring) + 20]}:
        for x in (west - 1.0, west - 1e-8, math.nextafter(west, -math.inf), east + 1e-8, east + 1.0):
            out.append((y, x))
    return out


def _check_polygon(ring: Ring, pts: list[tuple[float, float]]) -> None:
    lats, lons = [p[0] for p in pts], [p[1] for p in pts]
    got = geo.PointSet(lats, lons).in_polygon(ring)
    assert got.dtype == np.bool_
    assert got.tolist() == pure_mask(lats, lons, ring)


# -- polygons -----------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(data=st.data(), ring=rings())
def test_polygon_matches_the_pure_implementation(data: st.DataObject, ring: Ring) -> None:
    _check_polygon(ring, data.draw(probes(ring)))


def test_points_on_a_square_edges_and_corners_match() -> None:
    grid = [(y / 4, x / 4) for y in range(-1, 6) for x in range(-1, 6)]
    for ring in (
        [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, 0.0), (0.0, 0.0)],
        [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.0, 0.0)],  # the other way round
        [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)],  # a bow tie
    ):
        _check_polygon(ring, grid)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), ring=rings(closed=False))
def test_an_open_chain_matches_the_pure_implementation(data: st.DataObject, ring: Ring) -> None:
    # PolygonTarget always closes its ring; PointSet must still agree on any vertex list
    _check_polygon(ring, data.draw(probes(ring)))


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    ring=st.lists(st.tuples(st.floats(-90, 90), st.floats(-180, 180)), min_size=3, max_size=30).map(
        lambda v: [*v, v[0]]
    ),
)
def test_polygon_matches_over_the_whole_globe(data: st.DataObject, ring: Ring) -> None:
    pts = data.draw(st.lists(st.tuples(st.floats(-90, 90), st.floats(-180, 180)), max_size=80))
    _check_polygon(ring, pts + ring)


def test_polygon_with_nan_or_flat_edges_matches() -> None:
    nan = float("nan")
    pts = [(y / 4, x / 4) for y in range(-2, 7) for x in range(-2, 7)]
    for ring in (
        [(nan, 0.0), (1.0, 1.0), (0.0, 1.0), (nan, 0.0)],
        [(0.0, 0.0), (1.0, nan), (1.0, 1.0), (0.0, 1.0), (0.0, 0.0)],
        [(0.5, 0.0), (0.5, 1.0), (0.5, 0.0)],  # flat: no edge is ever crossed
        [(0.0, 0.0), (1.0, float("inf")), (1.0, 1.0), (0.0, 0.0)],
        [(0.0, 0.0)],
        [],
    ):
        _check_polygon(ring, pts)
    assert geo.PointSet([], []).in_polygon([(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (0.0, 0.0)]).size == 0


def test_polygon_across_the_antimeridian_does_not_crash() -> None:
    # A ring drawn across 180°: the planar even-odd test reads it as the band the long way round,
    # as it always did; China never needs it, it must only not crash.
    ring = [(50.0, 179.0), (50.0, -179.0), (52.0, -179.0), (52.0, 179.0), (50.0, 179.0)]
    rng = random.Random(3)
    pts = [(rng.uniform(49, 53), rng.uniform(-180, 180)) for _ in range(500)]
    pts += [(51.0, 179.5), (51.0, -179.5), (51.0, 180.0), (51.0, -180.0)]
    _check_polygon(ring, pts)


def star(n: int, lat0: float, lon0: float, radius: float) -> Ring:
    """A closed, non-convex ring of `n` points (the last repeats the first) around (lat0, lon0)."""
    ring = []
    for k in range(n - 1):
        th = 2 * math.pi * k / (n - 1)
        r = radius * (1 + 0.3 * math.sin(7 * th))
        ring.append((lat0 + r * math.sin(th), lon0 + r * math.cos(th)))
    return [*ring, ring[0]]


def star_contains(lat: float, lon: float, lat0: float, lon0: float, radius: float) -> bool | None:
    """Inside the exact star curve; None within 1e-5° of it, where the polygon's chords differ."""
    th = math.atan2(lat - lat0, lon - lon0)
    rho = math.hypot(lat - lat0, lon - lon0)
    r = radius * (1 + 0.3 * math.sin(7 * th))
    return None if abs(rho - r) < 1e-5 else rho < r


def test_a_40000_point_polygon_resolves(district: District) -> None:
    lats = [t.lat for t in district.terminals()]
    lons = [t.lon for t in district.terminals()]
    lat0, lon0 = (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
    radius = (max(lats) - min(lats)) / 3
    ring = star(40_000, lat0, lon0, radius)
    # PolygonTarget caps points at 10,000 (ebcd/model/alert.py); resolve itself has no such limit
    target = PolygonTarget.model_construct(kind="polygon", points=ring)
    found = district.resolve([target]).terminals
    assert 0 < len(found) < len(district)
    expected = {t.code: star_contains(t.lat, t.lon, lat0, lon0, radius) for t in district.terminals()}
    assert {t.code for t in found} == {c for c, inside in expected.items() if inside}
    assert all(expected[t.code] is not False for t in found)

    # and the reference agrees on the terminals nearest the boundary, where it matters most
    def gap(t: Terminal) -> float:
        th = math.atan2(t.lat - lat0, t.lon - lon0)
        return abs(math.hypot(t.lat - lat0, t.lon - lon0) - radius * (1 + 0.3 * math.sin(7 * th)))

    nearest = sorted(district.terminals(), key=gap)[:25]
    assert [t in found for t in nearest] == [pure_in_polygon(t.lat, t.lon, ring) for t in nearest]


def test_a_40000_point_polygon_over_10000_terminals() -> None:
    rng = random.Random(7)
    lats = [rng.uniform(31.0, 31.8) for _ in range(10_000)]
    lons = [rng.uniform(116.5, 117.3) for _ in range(10_000)]
    ring = star(40_000, 31.4, 116.9, 0.2)
    got = geo.PointSet(lats, lons).in_polygon(ring).tolist()
    for y, x, g in zip(lats, lons, got, strict=True):
        expect = star_contains(y, x, 31.4, 116.9, 0.2)
        assert expect is None or g == expect
    assert 1000 < sum(got) < 9000


def test_bbox_prefilter_never_tests_far_terminals(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    near = [(rng.uniform(31.0, 31.2), rng.uniform(116.0, 116.2)) for _ in range(200)]
    far = [(rng.uniform(-60, 80), rng.uniform(-170, 170)) for _ in range(2000)]
    far = [(y, x) for y, x in far if not (30.9 < y < 31.3 and 115.9 < x < 116.3)]
    # beside the box on one side only: same latitudes, or same longitudes
    beside = [(31.1, 116.0 + d) for d in (-0.5, 0.5)] + [(31.1 + d, 116.1) for d in (-0.5, 0.5)]
    pts = near + far + beside
    ring = [(31.0, 116.0), (31.0, 116.2), (31.2, 116.2), (31.2, 116.0), (31.0, 116.0)]
    seen: list[list[int]] = []
    candidates = geo.PointSet._candidates

    def spy(self: geo.PointSet, box: geo._Box) -> geo.IndexArray:
        found = candidates(self, box)
        seen.append(found.tolist())
        return found

    monkeypatch.setattr(geo.PointSet, "_candidates", spy)
    got = geo.PointSet([p[0] for p in pts], [p[1] for p in pts]).in_polygon(ring)
    assert len(seen) == 1
    tested = set(seen[0])
    assert tested <= set(range(len(near)))  # no far or beside terminal was ever tested
    assert got.tolist() == pure_mask([p[0] for p in pts], [p[1] for p in pts], ring)
    assert got[: len(near)].sum() > 150


def test_polygon_entirely_outside_the_ledger_tests_nothing(district: District) -> None:
    ring = [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
    assert district.resolve([PolygonTarget(points=ring)]).terminals == ()


# -- circles ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    lat=st.floats(-90, 90),
    lon=st.floats(-180, 180),
    radius=st.one_of(st.floats(0, 20_000), st.sampled_from([0.0, 1.0, 10.0, 20_000.0])),
    pts=st.lists(st.tuples(st.floats(-90, 90), st.floats(-180, 180)), min_size=1, max_size=60),
    on_edge=st.integers(0, 59),
)
def test_circle_matches_the_pure_haversine(
    lat: float, lon: float, radius: float, pts: list[tuple[float, float]], on_edge: int
) -> None:
    try:
        # a radius exactly the distance of one point puts it on the boundary
        boundary = pure_distance_km(lat, lon, *pts[on_edge % len(pts)])
        expected = [pure_distance_km(lat, lon, y, x) <= radius for y, x in pts]
        expected_b = [pure_distance_km(lat, lon, y, x) <= boundary for y, x in pts]
    except ValueError:  # the old formula's asin domain error near the antipode
        assume(False)
        return
    ps = geo.PointSet([p[0] for p in pts], [p[1] for p in pts])
    assert ps.within_km(lat, lon, radius).tolist() == expected
    assert ps.within_km(lat, lon, boundary).tolist() == expected_b


def test_circle_on_an_empty_ledger() -> None:
    assert geo.PointSet([], []).within_km(31.0, 116.0, 10.0).size == 0


# -- District.resolve ---------------------------------------------------------------------
@st.composite
def district_targets(draw: st.DrawFn, box: tuple[float, float, float, float]) -> PolygonTarget | CircleTarget:
    y0, y1, x0, x1 = box
    lat = st.floats(y0 - 0.05, y1 + 0.05)
    lon = st.floats(x0 - 0.05, x1 + 0.05)
    if draw(st.booleans()):
        return CircleTarget(lat=draw(lat), lon=draw(lon), radius_km=draw(st.floats(0, 30)))
    vertices = draw(st.lists(st.tuples(lat, lon), min_size=3, max_size=25))
    return PolygonTarget(points=[*vertices, vertices[0]])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_district_resolve_is_unchanged_for_polygons_and_circles(
    district: District, data: st.DataObject
) -> None:
    lats = [t.lat for t in district.terminals()]
    lons = [t.lon for t in district.terminals()]
    box = (min(lats), max(lats), min(lons), max(lons))
    targets = data.draw(st.lists(district_targets(box), min_size=1, max_size=3))
    res = district.resolve(targets)
    assert res.terminals == pure_resolve(district, targets)
    assert res.unknown == ()
