"""Geometry for CAP areas: point in polygon and great-circle distance.

`in_polygon` and `distance_km` answer for one point. A target is resolved against the whole
ledger at once with a `PointSet`, built once per district, whose answers are bit for bit those
of the one-point functions (see the class for why and how).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

EARTH_RADIUS_KM = 6371.0088

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
IndexArray = NDArray[np.intp]

# (edge, terminal) pairs evaluated at once by `PointSet.in_polygon`: a few MiB of temporaries, which
# stay in cache (measured: 2^16 is faster than 2^18 or 2^20 on a jagged 40,000-point polygon).
_PAIR_CHUNK = 1 << 16
# Longitudes beyond the polygon's bounding box by more than this (relative to the longitudes'
# magnitude) cannot be inside: the computed crossing of an edge lies within a few ulps of the
# edge's own longitudes, and 1e-9 is millions of ulps.
_BBOX_MARGIN = 1e-9
# The bounding box on longitude is used only for coordinates this small, where no difference of
# two of them can overflow (any real latitude or longitude is).
_BBOX_MAX_COORD = 1e9
# A vectorised distance this close to the radius (relative, plus 1 mm) is checked again with
# `distance_km`, so that numpy's and libm's last bits cannot decide the boundary differently.
_CIRCLE_RECHECK_REL = 1e-9
_CIRCLE_RECHECK_ABS_KM = 1e-6
# Near the antipode asin's slope is steep and small errors in `a` grow: check those again too.
_CIRCLE_RECHECK_A = 1.0 - 1e-6


def in_polygon(lat: float, lon: float, points: Sequence[tuple[float, float]]) -> bool:
    """True if (lat, lon) lies inside the closed polygon of (lat, lon) points (even-odd rule).

    One point only: for many, `PointSet.in_polygon` gives the same answers without a Python loop
    over every edge for every point.
    """
    inside = False
    n = len(points)
    for i in range(n - 1):
        (y1, x1), (y2, x2) = points[i], points[i + 1]
        if (y1 > lat) != (y2 > lat):
            x_cross = x1 + (lat - y1) * (x2 - x1) / (y2 - y1)
            if lon < x_cross:
                inside = not inside
    return inside


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two points, haversine formula."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    # Rounding can take `a` a hair past 1 for antipodal points, where asin would raise.
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(a, 1.0)))


def _crossings(
    lat: FloatArray,
    lon: FloatArray,
    lo: IndexArray,
    counts: IndexArray,
    y1: FloatArray,
    x1: FloatArray,
    dx: FloatArray,
    dy: FloatArray,
) -> IndexArray:
    """Per point, how many edges its ray crosses: edge e meets points lo[e] .. lo[e] + counts[e] - 1.

    The (edge, point) pairs are made a chunk at a time, so memory stays bounded however many
    there are.
    """
    crossings = np.zeros(lat.size, dtype=np.intp)
    ends = np.cumsum(counts)
    begin, done = 0, 0
    while begin < counts.size:
        stop = max(begin + 1, int(np.searchsorted(ends, done + _PAIR_CHUNK, side="right")))
        part = slice(begin, stop)
        c = counts[part]
        # number the chunk's pairs 0, 1, ...; pair k of edge e is point lo[e] + k
        pt = np.arange(int(ends[stop - 1]) - done) - np.repeat(ends[part] - done - c - lo[part], c)
        y1r, x1r = np.repeat(y1[part], c), np.repeat(x1[part], c)
        dxr, dyr = np.repeat(dx[part], c), np.repeat(dy[part], c)
        x_cross = x1r + (lat[pt] - y1r) * dxr / dyr  # in_polygon's float operations, in its order
        crossings += np.bincount(pt[lon[pt] < x_cross], minlength=lat.size)
        begin, done = stop, int(ends[stop - 1])
    return crossings


class _Box(NamedTuple):
    """A polygon's bounding box, and which of its sides may exclude points."""

    y_min: float
    y_max: float
    x_min: float
    x_max: float
    lon: bool  # exclude by longitude at all
    west: bool  # exclude west of x_min too


class PointSet:
    """Fixed points (the ledger's terminals) with their coordinates as arrays, to test many at once.

    Point in polygon is a vectorised even-odd ray test (numpy), not an edge-bucketed scan: in
    Python, bucketing alone is a loop over all 40,000 edges of a CAP polygon (tens of ms), and
    the scan then loops over every edge in each candidate's bucket, hundreds of thousands of
    interpreted steps for 10,000 terminals; vectorised, the whole test is a few array operations
    whose cost follows the number of actual ray crossings. It is also exact: the same float64
    operations as `in_polygon`, where a bucketed or sweep-line variant would tempt rearranging
    them. Three steps:

    1. Bounding box. A point's ray can only cross an edge when ``min(y1, y2) <= lat < max(y1, y2)``
       (the old ``(y1 > lat) != (y2 > lat)``), so points outside the polygon's latitude span are
       never tested; with the terminals sorted by latitude once, that is two binary searches.
       Points east of the box cross no edge to their east, and points west of a closed ring
       cross every edge their line meets, an even number: both are outside and not tested.
    2. Pairs. With the candidates sorted by latitude, the candidates whose line meets an edge
       form one contiguous run, found by binary search per edge (vectorised). Only those (edge,
       point) pairs are formed: about (points) x (crossings per line of latitude), a few per
       point for a real boundary, instead of points x edges.
    3. Crossings. For each pair, ``lon < x1 + (lat - y1) * (x2 - x1) / (y2 - y1)`` is evaluated
       with the same float64 operations in the same order as `in_polygon`, so every comparison,
       and so every answer, is the same as the one-point test's, points on an edge included.
       The parity of the crossings per point says inside or outside.

    The pairs are made in chunks, so memory stays bounded. Only a pathological polygon, with
    thousands of edges zigzagging across every line of latitude, makes many pairs: then the time
    grows towards points x edges, as it always did, but in numpy (bench/geo.py's "jagged" row).

    Circles use the haversine formula of `distance_km` over all points at once; the few points
    whose distance is within rounding of the radius are checked again with `distance_km` itself,
    so the answers are `distance_km(...) <= radius_km` exactly.
    """

    __slots__ = ("_cos_lat", "_lat", "_lat_rad", "_lat_sorted", "_lon", "_lon_sorted", "_order")

    def __init__(self, lats: Sequence[float], lons: Sequence[float]) -> None:
        if len(lats) != len(lons):
            raise ValueError(f"{len(lats)} latitudes for {len(lons)} longitudes")
        self._lat: FloatArray = np.array(lats, dtype=np.float64)
        self._lon: FloatArray = np.array(lons, dtype=np.float64)
        self._order: IndexArray = np.argsort(self._lat, kind="stable")
        self._lat_sorted: FloatArray = self._lat[self._order]
        self._lon_sorted: FloatArray = self._lon[self._order]
        self._lat_rad: FloatArray = np.radians(self._lat)
        self._cos_lat: FloatArray = np.cos(self._lat_rad)
        arrays = (self._lat, self._lon, self._order, self._lat_sorted, self._lon_sorted)
        for a in (*arrays, self._lat_rad, self._cos_lat):
            a.flags.writeable = False  # the ledger does not change at run time

    def __len__(self) -> int:
        return int(self._lat.size)

    # -- polygons --------------------------------------------------------------------------
    def in_polygon(self, points: Sequence[tuple[float, float]]) -> BoolArray:
        """Which points lie inside the polygon of (lat, lon) points: `in_polygon` for each."""
        inside = np.zeros(self._lat.size, dtype=np.bool_)
        n = len(points)
        if n < 2 or self._lat.size == 0:
            return inside
        ring = np.fromiter(chain.from_iterable(points), dtype=np.float64, count=2 * n).reshape(n, 2)
        start, end = ring[:-1], ring[1:]
        keep = start[:, 0] != end[:, 0]  # a flat edge is never crossed
        finite = bool(np.isfinite(ring).all())
        if not finite:  # an edge with a NaN never toggles: its crossing is NaN, or not reached
            keep &= ~(np.isnan(start).any(axis=1) | np.isnan(end).any(axis=1))
        y1, x1 = start[keep, 0], start[keep, 1]
        y2, x2 = end[keep, 0], end[keep, 1]
        if y1.size == 0:
            return inside
        y_lo, y_hi = np.minimum(y1, y2), np.maximum(y1, y2)

        # 1. the bounding box
        box = _Box(
            float(y_lo.min()),
            float(y_hi.max()),
            float(min(x1.min(), x2.min())),
            float(max(x1.max(), x2.max())),
            # the longitudes are compared only where rounding is bounded, and the west side
            # only for a ring (the even count of crossings there needs one)
            lon=finite and float(np.abs(ring).max()) <= _BBOX_MAX_COORD,
            west=bool((ring[0] == ring[-1]).all()),
        )
        cand_idx = self._candidates(box)
        if cand_idx.size == 0:
            return inside
        cand_lat, cand_lon = self._lat[cand_idx], self._lon[cand_idx]

        # 2. per edge, the run of candidates whose line of latitude meets it
        lo = np.searchsorted(cand_lat, y_lo, side="left")
        hi = np.searchsorted(cand_lat, y_hi, side="left")
        met = hi > lo
        lo, counts = lo[met], (hi - lo)[met]
        y1, x1 = y1[met], x1[met]
        dx, dy = x2[met] - x1, y2[met] - y1

        # 3. the crossings east of each candidate; their parity says inside
        # (a NaN or an infinity in the ring makes NaNs and infinities there, as it did in floats)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            crossings = _crossings(cand_lat, cand_lon, lo, counts, y1, x1, dx, dy)
        inside[cand_idx] = (crossings & 1).astype(np.bool_)
        return inside

    def _candidates(self, box: _Box) -> IndexArray:
        """The points in the box, by index, in order of latitude: the only ones `in_polygon` tests.

        Latitude is half-open, ``y_min <= lat < y_max``, exactly the points whose line can meet
        an edge; longitude has a margin far beyond the rounding of a computed crossing.
        """
        first = int(np.searchsorted(self._lat_sorted, box.y_min, side="left"))
        last = int(np.searchsorted(self._lat_sorted, box.y_max, side="left"))
        found = self._order[first:last]
        if not box.lon or found.size == 0:
            return found
        lon = self._lon_sorted[first:last]
        margin = _BBOX_MARGIN * (1.0 + max(abs(box.x_min), abs(box.x_max)))
        sel = lon <= box.x_max + margin
        if box.west:
            sel &= lon >= box.x_min - margin
        return found[sel]

    # -- circles ---------------------------------------------------------------------------
    def within_km(self, lat: float, lon: float, radius_km: float) -> BoolArray:
        """Which points lie within `radius_km` of (lat, lon): `distance_km(lat, lon, ...) <= radius_km`."""
        if self._lat.size == 0:
            return np.zeros(0, dtype=np.bool_)
        p1 = math.radians(lat)
        dp = self._lat_rad - p1
        dl = np.radians(self._lon - lon)
        a = np.sin(dp / 2) ** 2 + math.cos(p1) * self._cos_lat * np.sin(dl / 2) ** 2
        d = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.minimum(a, 1.0)))
        within: BoolArray = d <= radius_km
        close = np.abs(d - radius_km) <= _CIRCLE_RECHECK_ABS_KM + _CIRCLE_RECHECK_REL * radius_km
        close |= a >= _CIRCLE_RECHECK_A
        close |= np.isnan(d)
        for i in np.flatnonzero(close).tolist():
            within[i] = distance_km(lat, lon, float(self._lat[i]), float(self._lon[i])) <= radius_km
        return within
