"""The three tiers: the district platform, its town rooms and village rooms, and their terminals.

Each tier answers two questions: which terminals does a target name (resolution), and how far
has an alert reached below me (roll-up). `District` is the entry point.
"""

from ebcd.tiers.district import District, Resolution
from ebcd.tiers.terminal import Terminal
from ebcd.tiers.town import Town
from ebcd.tiers.village import Village

__all__ = ["District", "Resolution", "Terminal", "Town", "Village"]
