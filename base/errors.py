"""The one exception type a user sees as a one-line message and exit status 2."""
from __future__ import annotations

import re
import sys
from collections.abc import Callable


class UsageError(Exception):
    """A problem with the user's input: the CLI prints the message alone and exits 2."""


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def first_line(exc: BaseException) -> str:
    """A library error quoted in one line: its message's first (<= 200 characters, no colour)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def exit_status(command: Callable[[], int | None]) -> int:
    """Run a command-line tool's work: its own status (0 for None), 2 with the message of
    a ``UsageError`` on one line of stderr, or 1 with that of an ``OSError`` (a full disk,
    a file that cannot be written: the message names it)."""
    try:
        status = command()
    except (UsageError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    return 0 if status is None else status
