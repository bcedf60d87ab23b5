"""Where serial rooms' ports are: the `{run_dir}` placeholder of rooms.csv, and its default.

A room's port is a device path (`/dev/ttyUSB0`, used as it is), a pyserial URL
(`socket://HOST:PORT`) or, for a simulated bus, a path under `{run_dir}`: the directory of one run
of `ebcd simulate` and of the `ebcd run` that talks to it. Both expand it the same way (`--run-dir`,
else `[simulator] run_dir`, else `default_run_dir`), so two commands started apart with the same
config file and broker find the same buses, and runs with another config file or broker (a second
demo, a CI run) never touch them.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

RUN_DIR_PLACEHOLDER = "{run_dir}"
DEFAULT_RUN_DIR_PREFIX = "ebcd-sim-"
RUN_DIR_HASH_HEX_DIGITS = 8


def uses_run_dir(port: str | None) -> bool:
    """Whether a port names the run directory."""
    return port is not None and RUN_DIR_PLACEHOLDER in port


def expand_port(port: str, run_dir: Path) -> str:
    """The port with `{run_dir}` replaced by `run_dir`; any other port as it is."""
    return port.replace(RUN_DIR_PLACEHOLDER, str(run_dir))


def default_run_dir(config_path: Path, broker: str, temp_dir: Path | None = None) -> Path:
    """`<temp dir>/ebcd-sim-<8 hex>`, from the config file's absolute path and the broker URL.

    `broker` should be normalised by the caller (scheme, host and port spelled out), so that the
    daemon and the simulators, given the same broker in different spellings, still meet.
    """
    key = f"{config_path.resolve()}\n{broker}".encode()
    digest = hashlib.sha256(key).hexdigest()[:RUN_DIR_HASH_HEX_DIGITS]
    return Path(temp_dir or tempfile.gettempdir()) / f"{DEFAULT_RUN_DIR_PREFIX}{digest}"
