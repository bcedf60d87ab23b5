"""structlog set-up: JSON lines when not on a terminal (journald friendly), readable otherwise."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import structlog


def setup(level: str = "info", *, json: bool | None = None, stream: object = None) -> None:
    """Configure structlog and the stdlib loggers of the libraries underneath."""
    out = stream if stream is not None else sys.stderr
    as_json = json if json is not None else not getattr(out, "isatty", lambda: False)()
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # one write per line, newline included (print writes them apart): the processes of
        # `ebcd simulate --processes N` share one stderr, and their lines must not interleave
        logger_factory=structlog.WriteLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=out)  # type: ignore[arg-type]
    for noisy in ("amqtt", "transitions", "passlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def log_tasks() -> None:
    """Log every asyncio task and the chain of awaits it waits in (what is a wedged process doing)."""
    log = structlog.get_logger("ebcd.tasks")
    for task in asyncio.all_tasks():
        where: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(where) < 12:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                where.append(
                    f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
                )
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        log.warning("process.task", task=task.get_name(), done=task.done(), where=where)
