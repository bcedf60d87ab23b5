"""Carrying commands to MQTT terminals: group topics on the first attempt, single topics after.

A district-wide alert is one publish to the district's group topic; an alert that covers whole
towns or villages is one publish per town or village; whatever is left, and every retry, goes to
the terminals' own topics.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from ebcd.metrics import Metrics
from ebcd.protocols.messages import Command
from ebcd.protocols.mqtt.codec import Topics, encode_command
from ebcd.protocols.mqtt.link import MqttLink
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal

log = structlog.get_logger("ebcd.transport")


def group_topics_of(district: District, terminal: Terminal) -> list[str]:
    """The group rooms a terminal listens to: its village (if any), its town, the district."""
    rooms = [terminal.village] if terminal.village else []
    return [*rooms, terminal.town, district.code]


class MqttTransport:
    """Commands to IP/4G terminals over MQTT."""

    name = "mqtt"

    def __init__(
        self, district: District, topics: Topics, link: MqttLink, metrics: Metrics, *, groups: bool
    ) -> None:
        self._district = district
        self._topics = topics
        self._link = link
        self._metrics = metrics
        self._groups = groups
        self._mqtt = [t for t in district.terminals() if t.link == "mqtt"]

    def send(self, cmd: Command, terminals: Sequence[Terminal], *, first: bool) -> None:
        """Publish `cmd` to the fewest topics that reach exactly these terminals."""
        payload = encode_command(cmd)
        rest: list[Terminal] = list(terminals)
        if first and self._groups:
            rooms, rest = self._cover(terminals)
            for room in rooms:
                self._link.enqueue(self._topics.group_cmd(room), payload)
                self._metrics.commands.labels("group").inc()
        enqueue, topic = self._link.enqueue, self._topics.terminal_cmd
        for t in rest:
            enqueue(topic(t.code), payload)
        if rest:  # one counter update for the lot: a re-send after recovery is thousands at once
            self._metrics.commands.labels("terminal").inc(len(rest))

    def _cover(self, terminals: Sequence[Terminal]) -> tuple[list[str], list[Terminal]]:
        wanted = {t.code for t in terminals}
        if len(wanted) == len(self._mqtt) and all(t.code in wanted for t in self._mqtt):
            return [self._district.code], []
        rooms: list[str] = []
        covered: set[str] = set()
        for town in self._district.towns.values():
            town_mqtt = [t.code for t in town.terminals() if t.link == "mqtt"]
            if town_mqtt and all(c in wanted for c in town_mqtt):
                rooms.append(town.code)
                covered.update(town_mqtt)
                continue
            for v in town.villages.values():
                v_mqtt = [t.code for t in v.terminals if t.link == "mqtt"]
                if v_mqtt and all(c in wanted for c in v_mqtt):
                    rooms.append(v.code)
                    covered.update(v_mqtt)
        return rooms, [t for t in terminals if t.code not in covered]
