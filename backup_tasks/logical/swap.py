"""A restore's staging database: created, swapped in under the target's name, or removed, whatever stops it.

``restore`` writes into ``<target>__restoring_<run>`` and gives it the target's name only once
``pg_restore`` succeeded and the row counts match the manifest. Three rules keep that whole under
any interrupt (SIGINT, SIGTERM) or a lost connection:

- **Deferred signals around every statement that changes what a name holds** (create and mark the
  staging copy; the two renames, the drop of the old copy and the unmarking; every clean-up). psycopg
  raises ``KeyboardInterrupt`` even when the interrupted statement has committed, so an interrupt
  taken there leaves the code believing the opposite of the truth; deferred, it is taken between
  statements, where the code knows what is where. The window with no database under the name is
  two catalog updates long, with no signal taken inside it.
- **The truth is read from the server, by OID** (``settle``): a rename keeps a database's OID, so the
  old target's and the staging copy's OIDs say where the old and the restored data are, whatever
  the exception said. A missing name gets its old data back; a restored copy not under the name is
  dropped; the message says what is where, and names the database holding the old data when that
  is not the target.
- **Leftovers are ours only when provably so** (``clear_dead_runs``). A run holds a session advisory
  lock keyed by its run id on its maintenance connection for its whole life (the server releases it
  when the process dies, whatever killed it), and its staging database carries a marker (``COMMENT
  ON DATABASE``) naming the run and the target. A database is a dead run's leftover only when its
  name has the pattern, its marker names that same run and target, and the run's lock can be taken.
  The next restore then finishes what the dead run left: a staging copy is dropped, a name left
  empty between the two renames gets its old data back, an old copy whose replacement was swapped
  in is dropped. Anything matching the pattern without that proof is named in a note and left alone
  (one case: a SIGKILL in the round trip between CREATE DATABASE and its COMMENT leaves an empty,
  unmarked staging database; CREATE DATABASE cannot run in a transaction with the COMMENT).
- **The backup's own database properties ride along** (``apply_properties``): owner, settings and ACL
  are applied to the staging copy before the swap, and a rename keeps them (they hang on the OID:
  ``pg_database``'s row, ``pg_db_role_setting`` with the settings of ``ALTER ROLE ... IN DATABASE``,
  ``pg_shdescription``). Only the comment waits: the marker occupies it until the swap, which then sets
  the backup's comment instead of clearing it; the marker carries that comment, so a dead run's
  successor sets it too.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType

import psycopg
from psycopg import sql

from backup_tasks.conninfo import ConnInfo
from backup_tasks.errors import BackupError, RestoreFailed, RestoreRefused
from backup_tasks.postgres.connect import connect
from backup_tasks.postgres.failures import first_line
from backup_tasks.postgres.queries import create_database, drop_database

log = logging.getLogger(__name__)

#: A staging database's comment: this prefix, then JSON naming its run and its target.
MARKER_PREFIX = "backup-tasks restore staging "
#: First key of the two-key advisory lock a run holds while it lives ("btRS"); the second is its run id.
RUN_LOCK_CLASS = 0x62745253
#: How long the sessions of a target may take to leave before a replacing restore is refused
#: (a session closed just before still shows for a moment; RENAME itself waits up to 5 s).
CLIENTS_GRACE_SECONDS = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a restore; its text says what the interrupt left where (the CLI prints it)."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(detail)
        self.signum = signum


class SignalGuard:
    """While installed, SIGINT and SIGTERM raise ``Interrupted``, except inside ``deferred()`` blocks,
    where they are recorded and raised when the block ends."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal of the run, taken or pending
        self._pending: int | None = None
        self._deferring = 0

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = self.received or signum
        if self._deferring:
            self._pending = self._pending or signum
            return
        raise Interrupted(signum)

    @contextmanager
    def installed(self) -> Iterator[SignalGuard]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only: nothing can interrupt this one
            return
        previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        for signum, handler in previous.items():
            if handler is not signal.SIG_IGN:  # nohup and friends: an ignored signal stays ignored
                signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    @contextmanager
    def deferred(self, *, raise_pending: bool = True) -> Iterator[None]:
        """No signal is taken inside the block; one received meanwhile is raised after it, if it succeeded."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._deferring == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            if raise_pending:
                raise Interrupted(signum)


def staging_name(target: str, run: str) -> str:
    return f"{target[:40]}__restoring_{run}"


def aside_name(target: str, run: str) -> str:
    return f"{target[:40]}__replaced_{run}"


def marker_for(run: str, target: str, backup_id: str, comment: str | None = None) -> str:
    fields = {"run": run, "target": target, "backup": backup_id}
    if comment is not None:  # the database's comment in the backup: set when the marker goes
        fields["comment"] = comment
    return MARKER_PREFIX + json.dumps(fields)


def marked_comment(marker: str | None) -> str | None:
    """The backup's database comment a staging marker carries (None: none, or not a marker)."""
    if parse_marker(marker) is None:
        return None
    comment = json.loads(marker[len(MARKER_PREFIX):]).get("comment")  # type: ignore[index]
    return comment if isinstance(comment, str) else None


def parse_marker(comment: str | None) -> tuple[str, str] | None:
    """``(run, target)`` of a staging marker, or None when the comment is not one."""
    if not comment or not comment.startswith(MARKER_PREFIX):
        return None
    try:
        fields = json.loads(comment[len(MARKER_PREFIX):])
        run, target = str(fields["run"]), str(fields["target"])
    except (ValueError, KeyError, TypeError):
        return None
    return (run, target) if re.fullmatch(r"[0-9a-f]{8}", run) else None


def _run_key(run: str) -> int:
    """The run id as the signed int4 an advisory-lock key is."""
    value = int(run, 16)
    return value - (1 << 32) if value >= 1 << 31 else value


def rename_database(admin: psycopg.Connection, old: str, new: str) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


def set_comment(admin: psycopg.Connection, dbname: str, comment: str | None) -> None:
    admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(dbname), sql.Literal(comment)))


def database_oids(admin: psycopg.Connection, names: list[str], oids: list[int],
                  invalid: set[str] | None = None) -> dict[str, int]:
    """``{name: oid}`` of the databases that have one of ``names`` or ``oids`` now.

    The names of invalid ones (``datconnlimit = -2``: what a DROP DATABASE cut short leaves, no data
    to speak of) are added to ``invalid``.
    """
    rows = admin.execute("SELECT datname, oid::bigint, datconnlimit = -2 FROM pg_database "
                         "WHERE datname = ANY(%s) OR oid = ANY(%s::oid[])", (names, oids)).fetchall()
    if invalid is not None:
        invalid.update(str(name) for name, _oid, is_invalid in rows if is_invalid)
    return {str(name): int(oid) for name, oid, _invalid in rows}


def refuse_if_in_use(admin: psycopg.Connection, dbname: str, *, server: str) -> None:
    """Refuse before restoring anything when sessions hold ``dbname``: the swap could not rename it."""
    deadline = time.monotonic() + CLIENTS_GRACE_SECONDS
    while True:
        rows = admin.execute(
            """SELECT coalesce(nullif(application_name, ''), backend_type), count(*) FROM pg_stat_activity
               WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type <> 'autovacuum worker'
               GROUP BY 1 ORDER BY 1""", (dbname,)).fetchall()
        if not rows:
            return
        if time.monotonic() >= deadline:
            sessions = ", ".join(f"{count} {name!r}" for name, count in rows)
            raise RestoreRefused(f"database {dbname!r} on {server} is in use ({sessions} session(s)): the restored "
                                 f"copy replaces it by renaming, which needs no one connected; stop them and run the "
                                 f"restore again (nothing was restored)")
        time.sleep(0.1)


class StagingDatabase:
    """One run's staging database on one server, and the run's maintenance connection (which holds its lock)."""

    def __init__(self, maintenance: ConnInfo, target: str, guard: SignalGuard, *, backup_id: str,
                 comment: str | None = None) -> None:
        self.maintenance = maintenance
        self.target = target
        self.guard = guard
        self.backup_id = backup_id
        self.comment = comment  # the database's comment in the backup: the target's once swapped in
        self.run = uuid.uuid4().hex[:8]
        self.name = staging_name(target, self.run)
        self.aside = aside_name(target, self.run)
        self.old_oid: int | None = None  # the target's database before the swap; None: there was none
        self.oid: int | None = None  # the staging database's
        self.created = False  # CREATE DATABASE was sent (it may have committed even when it raised)
        self.remnant: str | None = None  # an invalid database left by a drop of the old copy the server cut short
        self._admin: psycopg.Connection | None = None

    @property
    def admin(self) -> psycopg.Connection:
        assert self._admin is not None, "use inside session()"
        return self._admin

    @contextmanager
    def session(self) -> Iterator[StagingDatabase]:
        """The run's maintenance connection, holding the run's advisory lock until it closes."""
        self._admin = connect(self.maintenance)
        try:
            self._admin.execute("SELECT pg_advisory_lock(%s, %s)", (RUN_LOCK_CLASS, _run_key(self.run)))
            yield self
        finally:
            with self.guard.deferred(raise_pending=False):
                self._admin.close()

    def find_target(self) -> bool:
        """Note the target's OID (where the old data is, whatever its name becomes); whether it exists."""
        self.old_oid = database_oids(self.admin, [self.target], []).get(self.target)
        return self.old_oid is not None

    def create(self) -> None:
        """Create the staging database and mark it as this run's, with no signal taken in between."""
        with self.guard.deferred():
            self.created = True
            create_database(self.admin, self.name)
            self.oid = database_oids(self.admin, [self.name], [])[self.name]
            set_comment(self.admin, self.name, self.marker)

    @property
    def marker(self) -> str:
        return marker_for(self.run, self.target, self.backup_id, self.comment)

    def apply_properties(self, apply: Callable[[psycopg.Connection, str], list[str]]) -> list[str]:
        """Run ``apply(admin, staging name)``: the backup's database properties, all but its comment.

        The comment must stay the marker until the swap, which sets the backup's (``self.comment``);
        ``apply`` must not touch it (a COMMENT would also wait for anyone holding the database's lock).
        """
        with self.guard.deferred():
            return apply(self.admin, self.name)

    def discard(self) -> None:
        with self.guard.deferred():
            drop_database(self.admin, self.name, force=True)

    def swap_in(self) -> list[str]:
        """Give the staging copy the target's name; the old target, if any, is renamed aside and dropped.

        The marker stays on the swapped-in copy until the old copy is gone: if this process dies in
        between, it proves to the next restore that the old copy is this run's to drop.
        """
        notes: list[str] = []
        with self.guard.deferred():
            if self.old_oid is not None:
                rename_database(self.admin, self.target, self.aside)  # clients connected: refused, nothing changed
            rename_database(self.admin, self.name, self.target)
            if self.old_oid is not None:
                try:
                    drop_database(self.admin, self.aside)
                except psycopg.errors.ObjectInUse as exc:  # someone connected to the old copy meanwhile
                    notes.append(f"the previous {self.target!r} is kept as {self.aside!r} "
                                 f"({first_line(str(exc))}); drop it when you no longer need it")
            try:
                set_comment(self.admin, self.target, self.comment)  # unmarked: the backup's comment, or none
            except psycopg.Error as exc:  # the restore is done; the marker only helps a dead run's successor
                log.warning("could not unmark %r: %s", self.target, first_line(str(exc)))
        for note in notes:
            log.warning("%s", note)
        return notes

    def failure(self, exc: BaseException, *, what: str) -> BaseException:
        """The exception to raise for ``exc``, once the server is settled and its message says what is where."""
        interrupted = isinstance(exc, KeyboardInterrupt) or self.guard.received is not None
        outcome = self.settle() if self.created or interrupted else ""
        if interrupted:
            return Interrupted(self.guard.received or getattr(exc, "signum", signal.SIGINT), outcome)
        suffix = f"; {outcome}" if outcome else ""
        if isinstance(exc, BackupError):
            exc.message += suffix
            return exc
        if isinstance(exc, psycopg.Error) and (exc.sqlstate or "08")[:2] in ("08", "57"):  # connection lost
            return RestoreFailed(f"{what} failed: {first_line(str(exc))}{suffix}")
        if isinstance(exc, psycopg.Error):  # CREATE/RENAME DATABASE: privileges, or a client connected meanwhile
            return RestoreRefused(f"{what} refused by the server: {first_line(str(exc))} (needs CREATEDB, and no "
                                  f"one connected to the target){suffix}")
        if isinstance(exc, OSError):
            return RestoreFailed(f"{what} failed: {first_line(str(exc))}{suffix}")
        if outcome:
            exc.add_note(outcome)
        return exc

    def settle(self) -> str:
        """After a failure or an interrupt: read where the old and the restored data are, repair, say so."""
        if not self.created:
            return f"{self.target!r} was left as it was; nothing was created"
        with self.guard.deferred(raise_pending=False):
            try:
                with self._working_admin() as admin:
                    return self._settle(admin)
            except (BackupError, psycopg.Error) as exc:
                return self._unknown(exc)

    @contextmanager
    def _working_admin(self) -> Iterator[psycopg.Connection]:
        """The run's connection if it still answers, else a new one for the time of the block."""
        usable = False
        if self._admin is not None and not self._admin.closed:
            with suppress(psycopg.Error):
                self._admin.execute("SELECT 1")
                usable = True
        if usable:
            assert self._admin is not None
            yield self._admin
        else:
            with connect(self.maintenance) as fresh:
                yield fresh

    def _settle(self, admin: psycopg.Connection) -> str:
        target = self.target
        invalid: set[str] = set()
        found = database_oids(admin, [target, self.aside, self.name],
                              [oid for oid in (self.old_oid, self.oid) if oid is not None], invalid)
        where = {oid: name for name, oid in found.items()}
        staging_oid = self.oid if self.oid is not None else found.get(self.name)
        new_at = where.get(staging_oid) if staging_oid is not None else None
        old_at = where.get(self.old_oid) if self.old_oid is not None else None
        if old_at in invalid:  # its drop was cut short (by the server): no old data is left in it
            self.remnant, old_at = old_at, None
        if new_at is not None and new_at != target:  # not swapped in: the restored copy goes
            if target not in found and old_at is not None:  # the name is empty: its old data goes back
                try:
                    rename_database(admin, old_at, target)
                except psycopg.Error as exc:
                    return (f"{target!r} is missing ({first_line(str(exc))}): its previous data is in {old_at!r} and "
                            f"the restored copy in {new_at!r}; rename one of them to {target!r}")
                old_at = target
            try:
                drop_database(admin, new_at, force=True)
            except psycopg.Error as exc:
                return (f"{self._old_data_phrase(old_at)}; the restored copy remains as {new_at!r} "
                        f"({first_line(str(exc))}): the next restore removes it")
            return f"{self._old_data_phrase(old_at)}; the staging copy was removed"
        if new_at == target:
            with suppress(psycopg.Error):
                set_comment(admin, target, self.comment)  # unmarked: a kept old copy is the user's now, not ours
            if old_at is not None:
                return (f"{target!r} holds the restored data of {self.backup_id}; its previous data is kept as "
                        f"{old_at!r}: drop it when you no longer need it")
            return (f"{target!r} holds the restored data of {self.backup_id} (the restore had completed)"
                    f"{self._remnant_phrase()}")
        return f"{self._old_data_phrase(old_at)}; nothing else was kept"

    def _old_data_phrase(self, old_at: str | None) -> str:
        if self.old_oid is None:
            return f"{self.target!r} was not created"
        if old_at == self.target:
            return f"{self.target!r} was left as it was"
        if old_at is not None:
            return f"{self.target!r} is not its previous database: that one is kept as {old_at!r}"
        return f"the previous {self.target!r} is gone{self._remnant_phrase()}"

    def _remnant_phrase(self) -> str:
        return (f" (its drop was cut short: drop what is left of it, the invalid database {self.remnant!r})"
                if self.remnant else "")

    def _unknown(self, exc: BaseException) -> str:
        where = (f"{self.target!r} holds its previous data or, if it is missing, {self.aside!r} does"
                 if self.old_oid is not None else f"{self.target!r} may not exist")
        return (f"the server could not be checked afterwards ({first_line(str(exc))}): {where}; a restored copy may "
                f"remain as {self.name!r} (the next restore removes it)")

    def clear_dead_runs(self) -> list[str]:
        """Finish what dead runs of this tool left on the server; notes on what was done or left alone."""
        notes: list[str] = []
        with self.guard.deferred():
            rows = self.admin.execute(
                "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                "WHERE starts_with(shobj_description(oid, 'pg_database'), %s)", (MARKER_PREFIX,)).fetchall()
            for name, comment in rows:
                marker = parse_marker(comment)
                if marker is None or name not in (staging_name(marker[1], marker[0]), marker[1]):
                    continue  # renamed by someone since: not ours to judge
                run, target = marker
                key = _run_key(run)
                if not self.admin.execute("SELECT pg_try_advisory_lock(%s, %s)", (RUN_LOCK_CLASS, key)).fetchone()[0]:
                    continue  # that run is alive
                try:
                    notes += self._finish_dead_run(run, target, marked=name, comment=marked_comment(comment))
                except psycopg.Error as exc:  # not this restore's business: say so and carry on
                    notes.append(f"could not clear {name!r}, left by an earlier restore that died: "
                                 f"{first_line(str(exc))}")
                finally:
                    self.admin.execute("SELECT pg_advisory_unlock(%s, %s)", (RUN_LOCK_CLASS, key))
            notes += self._unproven_leftovers()
        for note in notes:
            log.warning("%s", note)
        return notes

    def _finish_dead_run(self, run: str, target: str, *, marked: str, comment: str | None) -> list[str]:
        staging, aside = staging_name(target, run), aside_name(target, run)
        present = database_oids(self.admin, [target, staging, aside], [])
        notes: list[str] = []
        if marked == staging:
            if target not in present and aside in present:  # it died between its two renames
                rename_database(self.admin, aside, target)
                notes.append(f"an earlier restore into {target!r} died between its two renames: {target!r} was "
                             f"given back its previous data from {aside!r}")
            drop_database(self.admin, staging, force=True)
            notes.append(f"removed {staging!r}, the staging copy of an earlier restore that died")
            return notes
        # The marked database is the target: that run swapped its copy in and died before finishing.
        if aside in present:
            try:
                drop_database(self.admin, aside)
                notes.append(f"removed {aside!r}, the data {target!r} held before an earlier restore that died "
                             f"after swapping its copy in")
            except psycopg.errors.ObjectInUse:
                notes.append(f"{aside!r} (the data {target!r} held before an earlier restore) is in use: kept")
        set_comment(self.admin, target, comment)  # the restored database's own comment, which the marker held
        return notes

    def _unproven_leftovers(self) -> list[str]:
        pattern = re.compile(re.escape(self.target[:40]) + r"__(restoring|replaced)_[0-9a-f]{8}")
        rows = self.admin.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1",
                                  (self.target[:40],)).fetchall()
        return [f"{name!r} looks like a copy left by a restore into {self.target!r} but is not provably a dead "
                f"run's: left alone (drop it if you do not need it)"
                for (name,) in rows if pattern.fullmatch(name)]
