"""ebcd: emergency broadcast control daemon for a district's three-tier broadcasting network."""

from __future__ import annotations

__version__ = "0.1.0"
