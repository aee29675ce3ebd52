"""Prove a dump restores: checksum, restore somewhere that is not production, compare, amcheck.

The restore goes into a throwaway cluster from the local binaries, or into a scratch database on
the server named by ``VERIFY_DATABASE_URL``. The outcome is recorded in the backup's manifest.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from . import manifest as catalog
from .cluster import ThrowawayCluster
from .dump import Progress, no_progress
from .errors import BackupCorrupt, RestoreFailed
from .manifest import Manifest, Verification, isoformat, utcnow
from .pg import amcheck_indexes, connect, count_rows, create_database, drop_database, server_version
from .restore import check_checksum, compare_counts, pg_restore_into
from .settings import ConnInfo, Settings
from .storage import open_storage

log = logging.getLogger(__name__)


@contextmanager
def scratch_database(settings: Settings, min_major: int) -> Iterator[ConnInfo]:
    """A database nobody else uses, dropped afterwards."""
    if settings.verify_database_url:
        server = ConnInfo.from_url(settings.verify_database_url, setting="VERIFY_DATABASE_URL")
        name = f"backup_tasks_verify_{uuid.uuid4().hex[:10]}"
        with connect(server) as admin:
            create_database(admin, name)
        try:
            yield server.with_dbname(name)
        finally:
            with connect(server) as admin:
                drop_database(admin, name, force=True)
        return
    with ThrowawayCluster(min_major=min_major, bin_dir=settings.pg_bin_dir) as cluster:
        with connect(cluster.conninfo()) as admin:
            create_database(admin, "verify")
        yield cluster.conninfo("verify")


def server_major_of(manifest: Manifest) -> int:
    return int(manifest.server_version.split(".")[0])


def verify_backup(settings: Settings, backup_id: str | None = None, *,
                  progress: Progress = no_progress) -> Verification:
    """Verify one dump (the newest when ``backup_id`` is None); record and return the outcome."""
    storage = open_storage(settings.backup_dir)
    manifest = catalog.load(storage, backup_id) if backup_id else catalog.newest(storage, kind="dump")
    started = time.monotonic()
    checked: list[str] = []
    problems: list[str] = []
    tables_compared = indexes_checked = 0
    restored_version: str | None = None
    try:
        progress("checksum", backup_id=manifest.id)
        check_checksum(storage, manifest)
        checked.append("sha256")
        progress("restoring", backup_id=manifest.id)
        with scratch_database(settings, server_major_of(manifest)) as target:
            pg_restore_into(storage, manifest, target, min_major=server_major_of(manifest), settings=settings,
                            extra_args=("--no-owner", "--no-privileges"))
            checked.append("restore")
            progress("comparing", backup_id=manifest.id)
            with connect(target) as conn:
                restored_version = server_version(conn)
                restored = count_rows(conn)
                problems += compare_counts(manifest.tables, restored)
                tables_compared = len(manifest.tables)
                checked.append("row-counts")
                indexes_checked, index_problems = amcheck_indexes(conn)
                if indexes_checked:
                    checked.append("amcheck")
                problems += index_problems
    except (BackupCorrupt, RestoreFailed) as exc:
        # A verdict about the backup. Anything else (no cluster, verifier server down, tool
        # missing) is a failure of the verifier: it propagates and nothing is recorded.
        problems.append(str(exc))
    method = "scratch-database" if settings.verify_database_url else "throwaway-cluster"
    result = Verification(
        ok=not problems, verified_at=isoformat(utcnow()), duration_seconds=round(time.monotonic() - started, 3),
        method=method, checked=checked, tables_compared=tables_compared, indexes_checked=indexes_checked,
        problems=problems, server_version=restored_version,
    )
    catalog.record_verification(storage, manifest.id, result)
    log.info("verification of %s: %s", manifest.id, "ok" if result.ok else "; ".join(problems))
    return result
