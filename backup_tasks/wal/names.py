"""WAL file names and positions: segment numbering, LSN arithmetic, timelines (pure; standard library only)."""

from __future__ import annotations

import re

from backup_tasks.errors import WalArchiveError

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
BACKUP_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")


def kind_of(name: str) -> str:
    """``segment``, ``partial``, ``backup`` or ``history``; anything else is refused."""
    for kind, pattern in (("segment", SEGMENT_RE), ("partial", PARTIAL_RE), ("backup", BACKUP_RE),
                          ("history", HISTORY_RE)):
        if pattern.match(name):
            return kind
    raise WalArchiveError(f"{name!r} is not a WAL file name (segment, .partial, .backup or .history)")


def parse_lsn(text: str) -> int:
    high, _, low = text.strip().partition("/")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise WalArchiveError(f"{text!r} is not a WAL position like 0/3000028") from None


def segments_per_xlogid(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segment_number(name: str, segment_size: int) -> int:
    return int(name[8:16], 16) * segments_per_xlogid(segment_size) + int(name[16:24], 16)


def segment_name(timeline: int, segno: int, segment_size: int) -> str:
    per = segments_per_xlogid(segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segment_of_lsn(timeline: int, lsn: int, segment_size: int) -> str:
    return segment_name(timeline, lsn // segment_size, segment_size)


def timeline_of(name: str) -> int:
    return int(name[:8], 16)


def position(name: str) -> str:
    """The 16 hex digits after the timeline: ordering segments by it orders them in WAL order."""
    return name[8:24]
