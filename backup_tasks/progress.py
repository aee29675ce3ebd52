"""Progress reporting: long operations call ``progress(phase, **details)``; the worker turns it into Flower states."""

from __future__ import annotations

from collections.abc import Callable

#: Called with a phase name and details ("dumping", bytes_written=..., tables_done=...).
Progress = Callable[..., None]
PROGRESS_EVERY = 64 << 20


def no_progress(phase: str, **info: object) -> None:
    pass
