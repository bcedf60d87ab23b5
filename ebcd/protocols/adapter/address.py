"""Where adapters and ebcd's listener are: `tcp://HOST:PORT`, or a port found in a run folder.

A room's `port` is `tcp://HOST:PORT`. For simulated adapters, `tcp://HOST:{run_dir}`: after
`ebcd run` and `ebcd simulate` expanded `{run_dir}` to the same folder (as for serial buses,
`ebcd.protocols.serial.ports`), the simulated adapter binds a free port on HOST and writes it
to `<run_dir>/adapter-<room code>.port`; ebcd reads that file before each connection attempt.
ebcd's listener (`[adapter] listen = "HOST:{run_dir}"`) does the same the other way round, in
`<run_dir>/adapter-listen.port`. So two demos, or a test beside a demo, never share a port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ebcd.protocols.serial.ports import RUN_DIR_PLACEHOLDER

LISTEN_PORT_FILE = "adapter-listen.port"


class AddressError(ValueError):
    """An address that is not `tcp://HOST:PORT` (or HOST:PORT), or whose port file is missing."""


@dataclass(frozen=True, slots=True)
class Address:
    """A host and either a port, or the folder whose port file names it."""

    host: str
    port: int | None
    port_dir: Path | None = None

    def resolve(self, name: str) -> tuple[str, int]:
        """(host, port), reading `<port_dir>/<name>` when the port is found there; AddressError if not."""
        if self.port is not None:
            return self.host, self.port
        assert self.port_dir is not None  # noqa: S101 - parse() sets one of the two
        path = self.port_dir / name
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AddressError(f"{path}: no port published there yet ({exc.__class__.__name__})") from None
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise AddressError(f"{path}: {text[:20]!r} is not a TCP port")
        return self.host, int(text)


def parse(text: str, *, scheme: bool = True) -> Address:
    """`tcp://HOST:PORT` (or `HOST:PORT` when `scheme` is False); a port that is a path names a folder."""
    rest = text
    if scheme:
        if not text.startswith("tcp://"):
            raise AddressError(f"{text!r}: expected tcp://HOST:PORT")
        rest = text[len("tcp://") :]
    host, sep, port = rest.partition(":")
    if not host or not sep or not port:
        raise AddressError(f"{text!r}: expected {'tcp://' if scheme else ''}HOST:PORT")
    if RUN_DIR_PLACEHOLDER in port:
        raise AddressError(f"{text!r}: its {RUN_DIR_PLACEHOLDER} was never expanded")
    if port.startswith("/"):
        return Address(host, None, Path(port))
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise AddressError(f"{text!r}: port {port!r} is not 0-65535")
    return Address(host, int(port))


def room_port_file(room: str) -> str:
    """The port file name of a simulated adapter."""
    return f"adapter-{room}.port"


def publish_port(directory: Path, name: str, port: int) -> None:
    """Write `port` to `<directory>/<name>` atomically (a reader sees the old file or the new one)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.{os.getpid()}"
    tmp.write_text(f"{port}\n", encoding="ascii")
    tmp.replace(directory / name)
