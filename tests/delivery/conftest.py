"""The delivery simulation's figures (seeds run, seeds per second) in pytest's closing summary."""

from __future__ import annotations

import pytest

SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture
def sim_summary(request: pytest.FixtureRequest) -> list[str]:
    """Lines a test adds to the "delivery simulation" section at the end of the run."""
    return request.config.stash.setdefault(SUMMARY, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("delivery simulation")
        for line in lines:
            terminalreporter.write_line(line)
