"""Progress reporting: long operations call ``progress(phase, **details)``; the worker turns it into Flower states.

Also ``human_size``, how every human-readable output (CLI, status, the HTML page, logs) writes a size.
"""

from __future__ import annotations

from collections.abc import Callable

#: Called with a phase name and details ("dumping", bytes_written=..., tables_done=...).
Progress = Callable[..., None]
PROGRESS_EVERY = 64 << 20


def no_progress(phase: str, **info: object) -> None:
    pass


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
