"""The duty officer's commands start fast: `ebcd --help`, `alert status` and the like load neither
the ledger's numpy, nor prometheus_client, nor the HTTP and plotting libraries (only `run`,
`simulate` and the commands that read the ledger or draw do). Asserted as what is imported, never
as a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("numpy", "prometheus_client", "aiohttp", "matplotlib", "ebcd.tiers.district", "ebcd.journal.reader")


def test_the_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import json, sys; import ebcd.cli.commands; "
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []


# What the daemon needs only for a feature that is not configured: the shipped district has no
# [ebd] listen, no [web] listen, no sender that signs (signed_by) and no area target at start-up.
DAEMON_UNUSED = (
    "aiohttp",  # the EBD platform link and the wall screen's page
    "ebcd.platform.platform",
    "ebcd.web.server",
    "lxml",  # XML-DSig of signed CAP senders
    "signxml",
    "ebcd.ingest.xmldsig",
    "cryptography.x509",
    "numpy",  # polygon and circle targets
    "ebcd.tiers.geo",
    "matplotlib",
)


def test_the_daemon_loads_only_what_its_config_uses(tmp_path: Path) -> None:
    """`ebcd run`'s modules and a daemon built on the shipped district import none of the unused."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import ebcd.cli.commands, ebcd.log, ebcd.daemon.service\n"
        "from ebcd.config import load_config, shipped_config_path\n"
        "from ebcd.daemon.daemon import Daemon\n"
        "from ebcd.tiers.loader import load_district\n"
        "config = load_config(shipped_config_path())\n"
        "district = load_district(config)\n"
        f"Daemon(config, district, state_dir=Path({str(tmp_path)!r}), broker='mqtt://127.0.0.1:1')\n"
        f"print(json.dumps([m for m in {list(DAEMON_UNUSED)!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout.splitlines()[-1]) == []
