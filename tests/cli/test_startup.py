"""The duty officer's commands start fast: `ebcd --help`, `alert status` and the like load neither
the ledger's numpy, nor prometheus_client, nor the HTTP and plotting libraries (only `run`,
`simulate` and the commands that read the ledger or draw do). Asserted as what is imported, never
as a time."""

from __future__ import annotations

import json
import subprocess
import sys

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
