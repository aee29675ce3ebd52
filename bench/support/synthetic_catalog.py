"""A synthetic catalog with twelve weeks of WAL: 84 daily dumps and 14 weekly snapshots beside N segments.

Manifests with tiny data objects, and archived segments that are tiny objects with valid names and
checksum trailers (``wal.archive`` format): all that ``list``, ``health``, ``prune`` and the metrics
read of them. The two oldest snapshots start before 20% of the segments, the other twelve are spread
after, so a prune with ``BACKUP_KEEP_WEEKLY=12`` expires the first 20% of the WAL.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from backup_tasks.catalog.manifest import Manifest
from backup_tasks.clock import isoformat
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import segment_name, segment_number
from backup_tasks.wal.objects import trailer_bytes

SEGMENT_SIZE = 16 << 20
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(days=100)
DUMPS = 84
SNAPSHOTS = 14  # 12 kept (BACKUP_KEEP_WEEKLY), the 2 oldest expire with the WAL before the third


def snapshot_starts(segments: int) -> list[int]:
    """Segment numbers where the snapshots start, oldest first: two before 20%, twelve spread after."""
    first_kept = segments // 5
    return [0, first_kept // 2] + [first_kept + j * (segments - first_kept) // 12 for j in range(12)]


def segment_time(segno: int, segments: int) -> float:
    return (T0 + timedelta(days=98) * segno / max(segments, 1)).timestamp()


def catalog_objects(segments: int) -> dict[str, bytes]:
    """Every catalog object: key -> bytes (manifests and tiny data objects)."""
    objects: dict[str, bytes] = {}
    for day in range(DUMPS):
        started = NOW - timedelta(days=DUMPS - 1 - day, hours=1)
        backup_id = f"trading-dump-{started:%Y%m%dT%H%M%SZ}"
        m = Manifest(id=backup_id, kind="dump", database="trading", server="db:5432", server_version="16.4",
                     started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=4)),
                     path=f"{backup_id}.dump.zst", size_bytes=5, sha256="0" * 64, compression="zstd",
                     trading_day=started.date().isoformat(), tables={"trades": 10, "orders": 20})
        objects[m.path] = b"dump\n"
        objects[m.key] = m.to_json().encode()
    for k, start in enumerate(snapshot_starts(segments)):
        started = NOW - timedelta(days=7 * (SNAPSHOTS - 1 - k), hours=2)
        backup_id = f"trading-snapshot-{started:%Y%m%dT%H%M%SZ}"
        files = {f"{backup_id}.{part}": {"size": 4, "sha256": "0" * 64, "role": part}
                 for part in ("base.tar.zst", "pg_wal.tar.zst", "backup_manifest", "config.json")}
        m = Manifest(id=backup_id, kind="snapshot", database="trading", server="db:5432", server_version="16.4",
                     started_at=isoformat(started), finished_at=isoformat(started + timedelta(minutes=9)),
                     path=f"{backup_id}.base.tar.zst", size_bytes=16, sha256="0" * 64, compression="zstd",
                     files=files, timeline=1, wal_segment_size=SEGMENT_SIZE,
                     start_segment=segment_name(1, start, SEGMENT_SIZE),
                     stop_segment=segment_name(1, start + 1, SEGMENT_SIZE),
                     restorable_from=datetime.fromtimestamp(segment_time(start + 1, segments), UTC).isoformat())
        for key in files:
            objects[key] = b"snap"
        objects[m.key] = m.to_json().encode()
    return objects


def segment_objects(segments: int) -> dict[str, bytes]:
    """``object_key`` -> a tiny archived object: a few bytes, then a valid trailer (size, sha256, completion)."""
    return {object_key(segment_name(1, n, SEGMENT_SIZE)):
            b"w" + trailer_bytes(b"\0" * 32, SEGMENT_SIZE, segment_time(n, segments)) for n in range(segments)}


def build_local(root: Path, catalog: dict[str, bytes], wal: dict[str, bytes], segments: int) -> None:
    """``catalog`` stored in the directory ``root`` (``BACKUP_DIR``), ``wal`` in its archive ``root/wal``.

    ``segments``: how many the timeline of ``segment_time`` spreads over (``wal`` may be empty).
    """
    storage = open_storage(str(root))
    for key, data in catalog.items():
        storage.put_bytes(key, data)
    archive = root / "wal"
    archive.mkdir(parents=True, exist_ok=True)
    newest: dict[str, str] = {}
    for key in wal:
        directory, _, name = key.partition("/")
        newest[directory] = max(newest.get(directory, ""), name)
    for directory in newest:
        (archive / directory).mkdir(exist_ok=True)
    for key, data in wal.items():
        (archive / key).write_bytes(data)  # no fsync: a benchmark fixture
    for directory, name in newest.items():  # dated as on the server: last written when its last segment came
        when = segment_time(segment_number(name[:24], SEGMENT_SIZE), segments)
        os.utime(archive / directory, (when, when))
