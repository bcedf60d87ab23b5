"""Reading a file whose permissions decide whether it may be trusted (keys, passwords, CAs).

The permissions are checked on the open file, not on the path, so the file judged is the file
read; it must be a regular file (not a FIFO that would block, nor a device) and no larger than the
caller's limit. What counts as safe is the caller's rule, and so are the words of every error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Literal

Problem = Literal["open", "not_regular", "read", "too_large"]


class FileProblem(Exception):
    """The file could not be read as one: `problem` says which way; `strerror` the OS's words."""

    def __init__(self, problem: Problem, strerror: str = "") -> None:
        super().__init__(problem, strerror)
        self.problem = problem
        self.strerror = strerror


def read_checked(path: Path, limit: int, check: Callable[[os.stat_result], None]) -> bytes:
    """The bytes of `path` (at most `limit`), after `check` (which raises its own error) approved
    the open file's status; FileProblem if it cannot be opened, is not regular, or is too large."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise FileProblem("open", e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem("not_regular")
        check(st)
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FileProblem("too_large")
    except OSError as e:
        raise FileProblem("read", e.strerror or str(e)) from None
    finally:
        os.close(fd)
    return b"".join(chunks)
