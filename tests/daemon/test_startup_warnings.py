"""What the daemon says at start about settings that do not fit its district."""

from __future__ import annotations

from pathlib import Path

import structlog

from ebcd.config import Config
from ebcd.tiers.district import District
from tests.conftest import Mosquitto
from tests.helpers import running_daemon


def _queue(config: Config, size: int) -> Config:
    return config.model_copy(update={"mqtt": config.mqtt.model_copy(update={"outgoing_queue_size": size})})


async def test_an_outgoing_queue_smaller_than_the_mqtt_terminals_is_said_at_start(
    shipped_config: Config, district: District, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    on_mqtt = sum(1 for t in district.terminals() if t.link == "mqtt")
    for size, warned in ((on_mqtt - 1, True), (on_mqtt, False)):
        with structlog.testing.capture_logs() as logs:
            queue = _queue(shipped_config, size)
            async with running_daemon(queue, district, mosquitto.url, tmp_path / str(size)):
                pass
        said = [e for e in logs if e["event"] == "mqtt.queue_below_district"]
        assert bool(said) is warned, size
        if warned:
            assert (said[0]["outgoing_queue_size"], said[0]["mqtt_terminals"]) == (size, on_mqtt)
