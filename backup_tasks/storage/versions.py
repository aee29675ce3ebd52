"""Object versions of a versioned bucket: which one was current at a given time, grouped for deletion.

Pure functions over what ``ListObjectVersions`` returns, so the rules are tested without a server:

- ``current_at``: for each key, the newest version or delete marker written at or before a time;
  a delete marker there means the key did not exist then. What ``S3Storage(as_of=...)`` reads.
- ``by_directory``: keys grouped by their "directory", so the versions of many keys are listed with
  one ``Delimiter="/"`` listing per directory rather than one request per key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ObjectVersion:
    """One entry of a key's history: an object version, or a delete marker (``deleted``)."""

    key: str  # the full key in the bucket
    version_id: str
    modified: datetime
    size: int
    deleted: bool


def versions_in_page(page: Mapping[str, Any]) -> Iterator[ObjectVersion]:
    """The versions and delete markers of one ``ListObjectVersions`` page, each list in the server's order."""
    for entry in page.get("Versions", []):
        yield ObjectVersion(str(entry["Key"]), str(entry["VersionId"]), entry["LastModified"],
                            int(entry.get("Size", 0)), False)
    for entry in page.get("DeleteMarkers", []):
        yield ObjectVersion(str(entry["Key"]), str(entry["VersionId"]), entry["LastModified"], 0, True)


def current_at(entries: Iterable[ObjectVersion], moment: datetime) -> dict[str, ObjectVersion | None]:
    """Every key seen, mapped to its version current at ``moment``, or None if it did not exist then.

    The newest entry written at or before ``moment`` wins. S3 lists a key's versions newest first,
    so between two of the same instant the one listed first is the newer; a delete marker beats an
    object version of the same instant (an object is written before it is deleted).
    """
    best: dict[str, tuple[tuple[datetime, int, int], ObjectVersion]] = {}
    seen: set[str] = set()
    for order, entry in enumerate(entries):
        seen.add(entry.key)
        if entry.modified > moment:
            continue
        rank = (entry.modified, int(entry.deleted), -order)
        if entry.key not in best or rank > best[entry.key][0]:
            best[entry.key] = (rank, entry)
    chosen = {key: found for key, (_, found) in best.items()}
    return {key: (None if key not in chosen or chosen[key].deleted else chosen[key]) for key in seen}


def directory_of(full_key: str) -> str:
    """The listing prefix of ``full_key``'s directory (``""`` at the top of the bucket)."""
    head, slash, _ = full_key.rpartition("/")
    return f"{head}{slash}"


def by_directory(full_keys: Iterable[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for full_key in full_keys:
        grouped.setdefault(directory_of(full_key), []).append(full_key)
    return grouped
