"""Large CAP documents of the forms real feeds send, built here (for the tests and bench/cap.py).

- `audio_alert`: an IPAWS-style alert whose spoken message travels as inline base64 audio in
  `<resource><derefUri>` (a Michigan State Police civil emergency carried 459 KB of it);
- `polygon_alert`: one warning area drawn as a single polygon of tens of thousands of points (a
  national meteorological service sent 41,009); here the points run along a rectangle's edges, so
  which terminals lie inside is known without any point-in-polygon code;
- `geocode_alert`: an area listed as 1,500 geocodes, most of them outside the district;
- `languages_alert`: a weather service Update in 8 languages, each `<info>` with its own geocodes.
"""

from __future__ import annotations

import base64
import random

from tests.ingest.cap_docs import DISTRICT_TOWN, alert, area, info

LANGUAGES = ("de-DE", "en-GB", "fr-FR", "es-ES", "it-IT", "pl-PL", "zh-CN", "ru-RU")
Box = tuple[float, float, float, float]  # south, west, north, east


def audio_alert(audio_bytes: int = 500_000, *, seed: int = 1) -> bytes:
    """An alert carrying `audio_bytes` of (random) MP3 as base64 inline in `<derefUri>`."""
    audio = random.Random(seed).randbytes(audio_bytes)
    encoded = base64.b64encode(audio).decode()
    resource = (
        "<resource><resourceDesc>EAS Broadcast Content</resourceDesc><mimeType>audio/mpeg</mimeType>"
        f"<size>{audio_bytes}</size><derefUri>{encoded}</derefUri></resource>"
    )
    return alert(identifier="IPAWS-AUDIO-0001", infos=[info(extra=resource)])


def rectangle_ring(box: Box, points: int) -> list[tuple[float, float]]:
    """A closed ring of exactly `points` (lat, lon) pairs running along the rectangle's edges."""
    south, west, north, east = box
    corners = [(south, west), (south, east), (north, east), (north, west)]
    per_edge, extra = divmod(points - 1, 4)
    ring: list[tuple[float, float]] = []
    for e in range(4):
        (y1, x1), (y2, x2) = corners[e], corners[(e + 1) % 4]
        steps = per_edge + (1 if e < extra else 0)
        ring.extend((y1 + (y2 - y1) * k / steps, x1 + (x2 - x1) * k / steps) for k in range(steps))
    ring.append(ring[0])
    return ring


def polygon_alert(box: Box, points: int = 40_000) -> bytes:
    """An alert whose only area is one polygon of `points` points around `box`."""
    text = " ".join(f"{lat:.6f},{lon:.6f}" for lat, lon in rectangle_ring(box, points))
    return alert(
        identifier="NMS-POLYGON-0001",
        infos=[info(areas=[area("warning area", polygons=[text], geocodes=())])],
    )


def foreign_codes(count: int) -> list[tuple[str, str]]:
    """`count` geocodes of other provinces' villages (never of the district's county 341523)."""
    return [("AreaCode", f"44{k // 1000:04d}{k % 1000:03d}{(k * 7) % 1000:03d}") for k in range(count)]


def geocode_alert(district_codes: list[str], total: int = 1_500) -> bytes:
    """An alert naming `total` geocodes: `district_codes` among foreign ones."""
    codes = foreign_codes(total - len(district_codes)) + [("AreaCode", c) for c in district_codes]
    random.Random(2).shuffle(codes)
    return alert(identifier="GEO-1500-0001", infos=[info(areas=[area("many areas", geocodes=codes)])])


def languages_alert(geocodes_each: int = 1_500, district_code: str = DISTRICT_TOWN) -> bytes:
    """An Update in the 8 `LANGUAGES`, each `<info>` with `geocodes_each` geocodes (one of the district)."""
    codes = [*foreign_codes(geocodes_each - 1), ("AreaCode", district_code)]
    infos = [
        info(
            language=lang,
            headline=f"暴雨预警 ({lang})" if lang == "zh-CN" else f"Unwetterwarnung ({lang})",
            areas=[area(f"Warngebiet {lang}", geocodes=codes)],
        )
        for lang in LANGUAGES
    ]
    return alert(
        identifier="DWD-UPDATE-0002",
        msg_type="Update",
        references="warning@example.gov.cn,DWD-ALERT-0001,2024-07-01T07:00:00+08:00",
        infos=infos,
    )
