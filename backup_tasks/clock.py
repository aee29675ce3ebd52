"""Time as the catalog writes it: aware UTC, ISO 8601 with a ``Z`` (``2026-11-27T10:05:00Z``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, tzinfo

_ZONE_WORDS = re.compile(r"\s*(?:UTC|GMT|Z)$", re.IGNORECASE)


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_moment(text: str, zone: tzinfo) -> datetime | None:
    """An ISO 8601 time (``UTC``/``GMT``/``Z`` suffixes too; no zone means ``zone``) in UTC; None if not one."""
    raw = text.strip()
    try:
        moment = datetime.fromisoformat(_ZONE_WORDS.sub("+00:00", raw) if _ZONE_WORDS.search(raw) else raw)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)
