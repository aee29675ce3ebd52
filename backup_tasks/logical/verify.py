"""Prove a dump restores: checksum, restore somewhere that is not production, compare, amcheck.

The restore goes into a throwaway cluster from the local binaries, or into a scratch database on
the server named by ``VERIFY_DATABASE_URL``. The outcome is recorded in the backup's manifest.

Speed (issue 11: verify within 1.2x of a bare ``pg_restore --single-transaction`` into a server
that is already running, ``bench/bench_verify.py``): the restore itself costs what the bare one
does, so the rest is kept off the critical path. The throwaway cluster starts while the checksum
runs (``entered_in_background``) and is copied from a cached initdb template (``TemplateCache``);
the restore goes into its ``postgres`` database (no CREATE DATABASE); row counts and amcheck share
one queue over one connection per core, costliest first (``check_restored``).

Not done: ``pg_restore -j``. pg_restore refuses ``--jobs`` with ``--single-transaction``, and
without one transaction the COPYs are WAL-logged (the throwaway cluster's ``wal_level=minimal``
skips WAL only for tables created in the same transaction); it also needs a seekable file, i.e.
the decompressed archive written to disk first. On 2 cores ``-j2`` from a file gained nothing
(bench/README.md); on many cores it might, at the price of that file and the WAL: not measured here.

Owners, grants and policies (issue 19): the roles saved with the dump (``logical.globals``) are
created in the throwaway cluster first, and the restore keeps owners and privileges, so a dump whose
grants or policies cannot be restored fails for that reason; the database's own properties are then
applied to the copy (after the checks, so its settings cannot change them). ``checked`` says so
("roles", "owners", "privileges", "database-properties"). Two cases restore without owners and
privileges, as ``restore --no-owner`` does (policies cut to the roles present; ``details`` says
which): a dump from before roles were saved, and ``VERIFY_DATABASE_URL`` when its server lacks some
of the roles or we are not superuser there: verify never creates roles on a server it does not own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from backup_tasks.catalog import manifest as catalog
from backup_tasks.catalog.compare import compare_counts
from backup_tasks.catalog.keys import identities_for
from backup_tasks.catalog.manifest import Manifest, Verification
from backup_tasks.clock import isoformat, utcnow
from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupCorrupt, RestoreFailed, RestoreRefused, StorageError
from backup_tasks.logical.globals import check_cluster_objects, load_cluster_objects
from backup_tasks.logical.noowner import NoOwnerPlan, plan_without_owners, run_after
from backup_tasks.logical.pgrestore import WITHOUT_OWNERS, pg_restore_into
from backup_tasks.logical.restore import check_decryptable
from backup_tasks.postgres.cluster import ThrowawayCluster
from backup_tasks.postgres.connect import connect, server_version
from backup_tasks.postgres.globals import ClusterObjects
from backup_tasks.postgres.queries import (
    HeapCheck,
    amcheck_available,
    amcheck_jobs,
    count_jobs,
    create_database,
    drop_database,
    run_parallel,
)
from backup_tasks.postgres.recreate import (
    apply_database_properties,
    create_missing_roles,
    existing_roles,
    missing_roles,
)
from backup_tasks.postgres.template import default_template_cache
from backup_tasks.progress import Progress, no_progress
from backup_tasks.settings import Settings
from backup_tasks.storage.base import Storage, members
from backup_tasks.storage.integrity import LocationCheck, check_locations, summarize
from backup_tasks.streams.crypto import Identities

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    # The cached initdb template saves a verify's initdb (TemplateCache: a bad entry means initdb, never a failure).
    with ThrowawayCluster(min_major=min_major, bin_dir=settings.pg_bin_dir,
                          template_cache=default_template_cache()) as cluster:
        # The cluster's own (empty) postgres database, as initdb made it from template1 = template0:
        # a CREATE DATABASE would cost 0.1-0.3 s of copying for nothing.
        yield cluster.conninfo("postgres")


@contextmanager
def entered_in_background(manager: AbstractContextManager[T]) -> Iterator[Callable[[], T]]:
    """Enter ``manager`` on a thread at once; the body calls the yielded function to wait for its value.

    Starting the throwaway cluster overlaps the checksum (both ~0.1-0.7 s). A failure to enter is
    raised only by the function: when the body never asks (the checksum already failed, a verdict
    about the backup), a verifier problem does not hide that verdict. The manager is exited after
    the body in any case, once the thread has finished (Ctrl-C included: nothing is left running).
    """
    outcome: dict[str, Any] = {}

    def enter() -> None:
        try:
            outcome["value"] = manager.__enter__()
        except BaseException as exc:  # handed over by value() below
            outcome["error"] = exc

    thread = threading.Thread(target=enter, name="verify-target", daemon=True)
    thread.start()

    def value() -> T:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    try:
        yield value
    finally:
        interrupted: BaseException | None = None
        while thread.is_alive():
            try:
                thread.join()
            except KeyboardInterrupt as exc:  # finish starting, then clean up, then re-raise
                interrupted = exc
        if "error" not in outcome:
            manager.__exit__(None, None, None)
        if interrupted is not None:
            raise interrupted


def check_connections() -> int:
    """How many connections check the restored copy at once: one per core we may run on.

    amcheck and counting are CPU-bound in the server backend (the data is in memory just after the
    restore), so more connections than cores only add switching; at most 8 keeps a shared verifier
    server (VERIFY_DATABASE_URL) from being swamped.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def check_restored(target: ConnInfo, expected: dict[str, int], *,
                   heap_check: HeapCheck = "one") -> tuple[str, list[str], int, list[str]]:
    """Row counts and amcheck of the restored copy, over ``check_connections()`` connections at once.

    Returns (server version, problems with the counts, indexes checked, problems with the indexes). Counting and
    amcheck (``bt_index_check`` with heapallindexed: a heap scan per index) share one queue, the
    costliest job first, so the connections finish together; nobody writes to the copy, so counts
    taken in different snapshots are as exact as one.
    """
    restored: dict[str, int] = {}
    with connect(target) as conn:
        version = server_version(conn)
        jobs = count_jobs(conn, restored)
        checks = amcheck_jobs(conn, heap_check=heap_check) if amcheck_available(conn) else []
    index_problems = run_parallel(target, jobs + checks, connections=check_connections())
    return version, compare_counts(expected, restored), len(checks), index_problems


def server_major_of(manifest: Manifest) -> int:
    return int(manifest.server_version.split(".")[0])


def judge_checks(checks: list[LocationCheck], problems: list[str], *, what: str = "") -> None:
    """Every location's copy of one object: no location answering is the verifier's problem (``StorageError``),
    none good a verdict (``BackupCorrupt``), some bad a problem recorded while the restore goes on."""
    if not checks:  # no such object (a dump from before roles were saved)
        return
    prefix = f"{what}: " if what else ""
    if not any(c.ok for c in checks) and all(c.state == "unreadable" for c in checks):
        raise StorageError(prefix + summarize(checks))  # no location answers: nothing to judge
    if not any(c.ok for c in checks):
        raise BackupCorrupt(prefix + summarize(checks))
    if not all(c.ok for c in checks):
        problems.append(prefix + summarize(checks))


def roles_for_restore(target: ConnInfo, objects: ClusterObjects | None, *, scratch: bool,
                      details: dict[str, Any]) -> bool:
    """Make the target ready for a restore that keeps owners and privileges; False when it must do without.

    A throwaway cluster is ours: the backup's roles are created in it. A scratch database lives on
    someone's server (``VERIFY_DATABASE_URL``): roles are never created there, so owners are kept only
    when every role exists and we are superuser (else pg_restore could not give objects to them).
    """
    if objects is None:
        details["owners_and_privileges"] = ("not checked: the dump was taken before roles were saved with dumps; "
                                            "restored without owners and privileges")
        return False
    with connect(target) as conn:
        if not scratch:
            notes: list[str] = []
            details["roles_created"] = create_missing_roles(conn, objects, notes)
            if notes:
                details["roles_notes"] = notes
            details["owners_and_privileges"] = "checked: restored with the backup's roles"
            return True
        missing = missing_roles(conn, objects)
        superuser = bool(conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles "
                                      "WHERE rolname = current_user").fetchone()[0])
    if not missing and superuser:
        details["owners_and_privileges"] = "checked: every role the backup needs exists on the verify server"
        return True
    why = (f"the verify server (VERIFY_DATABASE_URL) lacks roles the backup needs ({', '.join(missing)}), and "
           f"verify never creates roles there" if missing else
           "the verify server's user (VERIFY_DATABASE_URL) is not a superuser, so it cannot give objects to "
           "their owners")
    details["owners_and_privileges"] = f"not checked: {why}; restored without owners and privileges"
    return False


def restore_for_verify(storage: Storage, manifest: Manifest, target: ConnInfo, objects: ClusterObjects | None, *,
                       settings: Settings, identities: Identities | None, details: dict[str, Any],
                       checked: list[str]) -> bool:
    """Restore the dump into ``target``: with owners and privileges when the roles allow; whether it did."""
    keep_owners = roles_for_restore(target, objects, scratch=bool(settings.verify_database_url), details=details)
    if keep_owners:
        checked.append("roles")
    plan = NoOwnerPlan()
    if not keep_owners:  # policies naming roles absent here would fail the restore: cut to those present
        with connect(target) as conn:
            present = existing_roles(conn)
        plan = plan_without_owners(storage, manifest, present, min_major=server_major_of(manifest),
                                   settings=settings, identities=identities)
        if plan.changes:
            details["policies_changed"] = plan.changes
    pg_restore_into(storage, manifest, target, min_major=server_major_of(manifest), settings=settings,
                    extra_args=() if keep_owners else WITHOUT_OWNERS, identities=identities, use_list=plan.use_list)
    run_after(target, plan)
    checked += ["restore", "owners", "privileges"] if keep_owners else ["restore"]
    return keep_owners


def apply_properties_for_verify(target: ConnInfo, objects: ClusterObjects, *, keep_owners: bool,
                                details: dict[str, Any]) -> None:
    """Apply the backup's database properties to the restored copy, as a restore does before its swap.

    What the server refuses is a verdict (``RestoreFailed``/``RestoreRefused`` from ``apply_database_properties``);
    a connection lost meanwhile is the verifier's trouble and propagates.
    """
    with connect(target) as conn:
        details["database_properties"] = apply_database_properties(
            conn, target.dbname, objects, owner=keep_owners, privileges=keep_owners)


def verify_backup(settings: Settings, backup_id: str | None = None, *,
                  progress: Progress = no_progress) -> Verification:
    """Verify one dump (the newest when ``backup_id`` is None); record and return the outcome."""
    storage = settings.locations()
    manifest = catalog.load(storage, backup_id) if backup_id else catalog.newest(storage, kind="dump")
    # A missing or unusable identity is the verifier's problem, not the backup's: it propagates.
    identities = identities_for(settings, manifest)
    started = time.monotonic()
    checked: list[str] = []
    problems: list[str] = []
    tables_compared = indexes_checked = 0
    restored_version: str | None = None
    details: dict[str, Any] = {}
    try:
        # The throwaway cluster (or scratch database) is set up while the checksum is computed.
        with entered_in_background(scratch_database(settings, server_major_of(manifest))) as scratch:
            progress("checksum", backup_id=manifest.id)
            # Every location (BACKUP_DIR and BACKUP_COPY_TO): any missing or damaged copy fails verify,
            # and the message says which location is still good; the restore uses the first good one.
            checks = check_locations(storage, manifest.path, size=manifest.size_bytes, sha256=manifest.sha256)
            judge_checks(checks, problems)
            good = next(m for m, c in zip(members(storage), checks, strict=True) if c.ok)
            # The saved roles and database properties, checked the same way (none for dumps from before them).
            judge_checks(check_cluster_objects(storage, manifest), problems,
                         what=f"the saved roles of {manifest.id}")
            checked.append("sha256")
            check_decryptable(good, manifest, identities)
            objects = load_cluster_objects(storage, manifest, identities)  # a few kB, from a good copy
            progress("restoring", backup_id=manifest.id)
            target = scratch()
            keep_owners = restore_for_verify(good, manifest, target, objects, settings=settings,
                                             identities=identities, details=details, checked=checked)
            progress("comparing", backup_id=manifest.id)
            restored_version, count_problems, indexes_checked, index_problems = check_restored(
                target, manifest.tables, heap_check=settings.verify_heap_check)
            problems += count_problems
            tables_compared = len(manifest.tables)
            checked.append("row-counts")
            if indexes_checked:
                checked.append("amcheck")
            problems += index_problems
            if objects is not None:  # after the checks: the copy's new settings must not change them
                apply_properties_for_verify(target, objects, keep_owners=keep_owners, details=details)
                checked.append("database-properties")
    except (BackupCorrupt, RestoreFailed, RestoreRefused) as exc:
        # A verdict about the backup. Anything else (no cluster, verifier server down or refusing
        # the login, tool missing) is a failure of the verifier: it propagates and nothing is
        # recorded. Connections here (connect() and pg_restore's own) go through the one classifier
        # (postgres.failures.classify), so such failures are never a RestoreFailed verdict.
        problems.append(str(exc))
    method = "scratch-database" if settings.verify_database_url else "throwaway-cluster"
    result = Verification(
        ok=not problems, verified_at=isoformat(utcnow()), duration_seconds=round(time.monotonic() - started, 3),
        method=method, checked=checked, tables_compared=tables_compared, indexes_checked=indexes_checked,
        problems=problems, server_version=restored_version, details=details or None,
    )
    if settings.as_of is not None:  # a past state of the bucket was read: the verdict is reported, not recorded
        log.info("verification of %s as of %s is not recorded", manifest.id, settings.as_of.isoformat())
    else:
        catalog.clear_partial_records(storage, manifest.id)  # a verdict a killed verify left half-written
        try:
            catalog.record_verification(storage, manifest.id, result)
        except StorageError as exc:  # a location that cannot take the record must not hide the verdict
            log.warning("could not record the verification of %s: %s", manifest.id, exc)
    log.info("verification of %s: %s", manifest.id, "ok" if result.ok else "; ".join(problems))
    return result
