"""MQTT 5 properties of incoming PUBLISH packets, without paho's cost per message.

paho builds a `Properties` object for every PUBLISH it reads over MQTT 5, and its constructor fills
two tables of 27 property names and identifiers each time; `unpack` then runs `clear()`, which asks
`hasattr` for each of the 27 names. At district scale that is most of the MQTT 5 read cost: three
reports per terminal per alert, nearly all of them without any property at all.

`SharedTableProperties` is paho's class with the tables built once and shared (paho only ever reads
them), `clear()` and `isEmpty()` looking at the attributes actually set, and a packet without
properties (a property length of 0) decoded without the loop. Any packet that carries properties
goes through paho's own `unpack`, so response topics, correlation data and user properties come out
exactly as before. `install()` puts the class where paho's PUBLISH decoder looks it up; it refuses
(returns False, and the caller logs it) if that decoder is not where this paho version keeps it, so
an upgrade of paho can make ebcd slower, never wrong.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.properties import Properties

_PRIVATE = frozenset({"packetType", "types", "names", "properties"})


def _tables() -> tuple[list[str], dict[str, int], dict[int, Any]]:
    template = Properties(0)  # type: ignore[no-untyped-call]
    return template.types, template.names, template.properties


_TYPES, _NAMES, _IDENTS = _tables()


class SharedTableProperties(Properties):
    """paho's `Properties` with its name tables built once, not for every packet."""

    def __init__(self, packetType: int) -> None:  # noqa: N803  (paho's signature)
        set_ = object.__setattr__
        set_(self, "packetType", packetType)
        set_(self, "types", _TYPES)
        set_(self, "names", _NAMES)
        set_(self, "properties", _IDENTS)

    def _set(self) -> list[str]:
        return [name for name in self.__dict__ if name not in _PRIVATE]

    def clear(self) -> None:
        """Forget every property set (paho's `clear`, over the attributes set only)."""
        for name in self._set():
            delattr(self, name)

    def isEmpty(self) -> bool:  # noqa: N802  (paho's name)
        """Whether no property is set."""
        return not self._set()

    def unpack(self, buffer: bytes | bytearray) -> tuple[SharedTableProperties, int]:
        """Decode properties from `buffer`; a zero property length is one byte and nothing else."""
        if buffer and buffer[0] == 0:
            self.clear()
            return self, 1
        result: tuple[SharedTableProperties, int] = super().unpack(buffer)  # type: ignore[no-untyped-call]
        return result


def install() -> bool:
    """Make paho decode PUBLISH properties with `SharedTableProperties`; False if it cannot."""
    try:
        from paho.mqtt import _packet
    except ImportError:
        return False
    current = getattr(_packet, "Properties", None)
    if current is SharedTableProperties:
        return True
    if current is not Properties or not callable(getattr(_packet, "decode_publish", None)):
        return False
    _packet.Properties = SharedTableProperties  # type: ignore[attr-defined]
    return True
