"""Geometry for CAP areas: point in polygon and great-circle distance."""

from __future__ import annotations

import math
from collections.abc import Sequence

EARTH_RADIUS_KM = 6371.0088


def in_polygon(lat: float, lon: float, points: Sequence[tuple[float, float]]) -> bool:
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


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two points, haversine formula."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))
