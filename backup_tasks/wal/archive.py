"""The continuous WAL archive: ``wal-push`` (archive_command), ``wal-fetch`` (restore_command), their promises.

``WalArchive(primary, copy)`` works over any location: the primary is the archive itself (the
local archive directory, which makes a segment durable; for a restore from the bucket alone, that
bucket's ``wal/``, opened read-only), the copy is ``<BACKUP_COPY_TO>/wal``. How objects are stored
is the storage layer's business (``storage/``: temporary names, fsync, modes, ranged reads); in what
order the two locations are written and deleted is its ``copies.WAL`` policy; what an object is,
``wal.objects``; where it lives, ``wal.layout``. This module holds the promises:

- ``push``: returns only once the object is stored in the primary (a directory: fsynced, with its
  directory entry) and then in the copy; with ``copy_within`` (wal-push's bound) a copy that does
  not take it in time gets it queued instead (``wal.backlog``: durable before ``push`` returns;
  ``wal.ship`` drains it), and a primary that cannot be written is replaced by the copy alone, said
  loudly. Create-only everywhere: an object already there with the
  same content (by its trailer) is "already archived", since PostgreSQL retries after crashes; one
  with DIFFERENT content is a ``WalConflict``, the stored object left untouched; a damaged object in
  the copy (no valid trailer) is replaced by the good one.
- ``fetch``: from the primary, else from the copy, whichever holds a good one (``wal.fetch``);
  ``WalMissing`` (the normal end of recovery) only when the file is provably not archived in any
  location, ``WalGap`` when known WAL shows it existed (later segments of its timeline, a timeline
  that branched from it later), ``WalArchiveError`` when a location that may hold it cannot be read,
  ``WalCorrupt`` when no good copy can be read: the rule is ``wal.absence``'s.
- reading (``wal.contents``): the primary and the copy seen as one archive (names, runs, history
  files, existence, trailers, history text), unless ``read_copy=False``; a local directory through
  its cached index, any other location through one listing; a trailer is one ranged read.

PostgreSQL runs push and fetch once per WAL segment as its own OS user (``postgres``), so this is
import-light (standard library, zstandard, the storage layer: no Celery, Redis, psycopg or Sentry;
boto3 only when a bucket is used). Permissions: the archive is shared by root (worker, CLI, prune)
and the server's OS user: ``storage.files.WAL_MODES``. wal-push creates a missing archive directory
itself when its parent exists and this user may write there (a fresh Docker volume the server user
owns); anywhere else ``backup-tasks check``, run as root, creates it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from backup_tasks.errors import (
    ObjectMissing,
    StorageError,
    WalArchiveError,
    WalConflict,
    WalCorrupt,
    WalMissing,
)
from backup_tasks.storage.copies import WAL, Mirror, Outcome, Settle
from backup_tasks.storage.files import WAL_MODES, fsync_dir, make_dirs, write_atomically
from backup_tasks.storage.locations import open_storage
from backup_tasks.wal.layout import (
    COPY_SUBDIR,
    DIR_MODE,
    HISTORY_DIR,
    INCOMING_MARK,
    object_key,
)
from backup_tasks.wal.names import kind_of
from backup_tasks.wal.objects import (
    DEFAULT_LEVEL,
    TRAILER_SIZE,
    Trailer,
    file_sha256,
    parse_trailer,
    stored_object,
    verified_chunks,
)

if TYPE_CHECKING:
    from backup_tasks.storage.base import Features, Storage
    from backup_tasks.storage.locations import S3Credentials
    from backup_tasks.wal.contents import UnionContents
    from backup_tasks.wal.index import ArchiveIndex, TimelineRuns

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    status: str  # "archived", "already-archived", "copy-only" (the archive refused it), "dropped" (``wal.dropped``)
    original_bytes: int
    stored_bytes: int
    #: The copy: "stored" (it holds the file), "queued" (``wal.backlog``: it lacks it yet), None (no copy, not tried).
    copy: str | None = None


class WalArchive:
    """The WAL archive in ``primary``, copied to ``copy``: any locations (see the module docstring)."""

    def __init__(self, primary: Storage, copy: Storage | None = None, *, recipients: tuple[str, ...] = (),
                 identity_file: str | Path | None = None, read_copy: bool = True, copy_on_gap: bool = False) -> None:
        self.primary = primary
        #: BACKUP_COPY_TO's ``wal/``: every archived file is also stored there, and fetch falls back to it.
        self.copy = copy
        #: Readers see the primary and the copy as one archive (``wal.contents``); False: the primary alone
        #: (a reader that must never list the copy, such as the metrics exporter on every scrape).
        self.read_copy = read_copy and not copy_on_gap
        #: ``copy_on_gap``: the primary alone until a reader finds a hole there (``see_the_copy``): a look at the
        #: state (``list``, ``health``) lists the copy (a request per 1,000 segments) only when it may fill one.
        self.copy_on_gap = copy_on_gap
        self.mirror = Mirror(primary, copy, WAL)
        #: BACKUP_ENCRYPT_RECIPIENT: pushed files are age-encrypted to these public keys.
        self.recipients = tuple(recipients)
        #: BACKUP_DECRYPT_IDENTITY_FILE: read only when an encrypted file is read back.
        self.identity_file = identity_file
        self._features: Features | None = None
        self._contents: UnionContents | None = None
        self._trailers: dict[str, Trailer] = {}

    @classmethod
    def in_directory(cls, root: Path | str, copy_to: str | None = None, *, recipients: tuple[str, ...] = (),
                     identity_file: str | Path | None = None,
                     copy_credentials: S3Credentials | None = None, read_copy: bool = True,
                     copy_on_gap: bool = False) -> WalArchive:
        """The archive in the directory ``root``, copied to ``<copy_to>/wal`` (BACKUP_COPY_TO) when given.

        A bucket copy is opened at its first use (a push acknowledged from a marker never opens it);
        ``copy_credentials``: other than the ambient ones (prune's own); ``read_copy``: see ``__init__``.
        """
        copy_to = copy_to.strip() if copy_to else None
        copy = open_storage(f"{copy_to.rstrip('/')}/{COPY_SUBDIR}", setting="BACKUP_COPY_TO",
                            credentials=copy_credentials, when_used=True) if copy_to else None
        return cls(open_storage(str(root), setting="WAL_ARCHIVE_DIR", modes=WAL_MODES), copy, recipients=recipients,
                   identity_file=identity_file, read_copy=read_copy, copy_on_gap=copy_on_gap)

    @classmethod
    def for_settings(cls, settings: Any, root: Path | None = None, *, read_copy: bool = True,
                     copy_on_gap: bool = False) -> WalArchive:
        """The archive of ``Settings``: its directory, BACKUP_COPY_TO, encryption recipients and identity file."""
        return cls.in_directory(root or settings.wal_archive, settings.copy_to, recipients=settings.encrypt_recipients,
                                identity_file=settings.decrypt_identity_file, read_copy=read_copy,
                                copy_on_gap=copy_on_gap)

    def __repr__(self) -> str:
        return f"WalArchive({self.location!r})"

    @property
    def location(self) -> str:
        """Where the archive is, for messages (a directory, or a URL)."""
        return self.primary.location

    @property
    def features(self) -> Features:
        """What the primary can do, asked once (a bucket answers with a request or two, on first use)."""
        if self._features is None:
            self._features = self.primary.features
        return self._features

    @property
    def root(self) -> Path | None:
        """The archive's directory, when the primary is one on this machine: what only a directory has lives
        there (the index cache, the state file, push-ahead markers; ``wal.contents``)."""
        return self.features.local_root

    @property
    def contents(self) -> UnionContents:
        """What the archive holds, as its readers see it: the primary and the copy as one (``wal.contents``)."""
        if self._contents is None:
            from backup_tasks.wal.contents import ArchiveContents, UnionContents  # readers only: never wal-push

            copy = ArchiveContents(self.copy, None) if self.copy is not None and self.read_copy else None
            self._contents = UnionContents(ArchiveContents(self.primary, self.root), copy)
        return self._contents

    def see_the_copy(self) -> bool:
        """With ``copy_on_gap``: read the copy too from now on (a reader found a hole in the primary); whether
        that changes what is read (False: no copy, or it is read already)."""
        if not self.copy_on_gap or self.read_copy or self.copy is None:
            return False
        self.read_copy, self._contents = True, None
        return True

    @property
    def copy_problem(self) -> str | None:
        """Why the copy could not be read when a reader asked it (what only the copy holds was not seen), or None."""
        return self._contents.copy_problem if self._contents is not None else None

    def path_for(self, name: str) -> Path:
        """The file of ``name`` in a local archive directory."""
        if self.root is None:
            raise WalArchiveError(f"the WAL archive {self.location} is not a directory on this machine")
        return self.root / object_key(name)

    # directories -----------------------------------------------------------------------------------

    def available(self) -> bool:
        """Whether there is an archive to read at all (a local one: its directory exists)."""
        return self.root is None or self.root.is_dir()

    def ensure(self) -> None:
        """Create the archive directory if needed (mode 2770); fail clearly when that is impossible."""
        if self.root is None or self.root.is_dir():
            return
        try:
            make_dirs(self.root, DIR_MODE)
        except OSError as exc:
            raise WalArchiveError(f"cannot create the WAL archive directory {self.root}: {exc.strerror}; "
                                  f"create it once as root with `backup-tasks check`") from None

    def _ensure_root(self) -> None:
        if self.root is not None and not self.root.is_dir() and not self._create_root():
            raise WalArchiveError(f"the WAL archive directory {self.root} does not exist (or this user cannot "
                                  f"reach it); create it with `backup-tasks check` as root")

    def _create_root(self) -> bool:
        """Create the missing archive directory (mode 2770) where this user may; False where it may not.

        Out of the box nobody has run ``check``: the server user owns the backups directory (a fresh
        Docker volume, a BACKUP_DIR made for it) and the archive inside it does not exist yet. Refusing
        there would fail archiving from the very first segment, so wal-push makes it. Only the last
        level: a missing parent is more likely an unmounted volume or a wrong path than a place to
        start an archive, and neither should quietly receive WAL.
        """
        assert self.root is not None
        try:
            os.mkdir(self.root, 0o700)  # the final mode is set below: the server's umask 077 would strip it
        except FileExistsError:
            return self.root.is_dir()  # another wal-push made it meanwhile (or a file sits there)
        except OSError:  # the parent is missing, not writable, read-only...: the caller's clear error
            return False
        try:
            os.chmod(self.root, DIR_MODE)
            try:
                fsync_dir(self.root.parent)  # the archive's own entry must survive a crash like the segments in it
            except PermissionError:
                pass  # a parent this user may write but not read (mode 0300) cannot be opened to fsync
        except OSError as exc:
            raise WalArchiveError(f"created the WAL archive directory {self.root} but could not finish "
                                  f"setting it up: {exc.strerror}") from None
        log.warning("created the WAL archive directory %s (mode 2770)", self.root)  # once, in the server log
        return True

    # reading ----------------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.contents.exists(name)

    def size_of(self, name: str) -> int:
        return self.contents.size_of(name)

    def index(self, *, count_bytes: Callable[[str], bool] | None = None) -> ArchiveIndex:
        """The local archive's directories summarized (``wal.index``: cached, each directory checked by its mtime)."""
        return self.contents.index(count_bytes=count_bytes)

    def segment_names(self) -> list[str]:
        """Every archived segment (not .partial/.backup/.history) where wal-fetch finds it, in WAL order."""
        return self.contents.segment_names()

    def segment_runs(self) -> TimelineRuns:
        """The archived segments as runs per timeline (what ``wal.coverage`` walks): see ``wal.index``."""
        return self.contents.segment_runs()

    def names(self) -> list[str]:
        """Every archived WAL file of any kind."""
        return self.contents.names()

    def history_names(self) -> list[str]:
        return self.contents.history_names()

    def later_segment_exists(self, name: str) -> bool:
        """Whether a segment after ``name`` on the same timeline is archived (so ``name`` is a gap)."""
        return self.contents.later_segment_exists(name)

    def trailer(self, name: str, *, primary_only: bool = False) -> Trailer:
        """The trailer of the archived ``name``: one ranged read (remembered where the archive is read-only).

        From the primary; from the copy when the primary lacks it (readers see both as one archive), unless
        ``primary_only`` (what the primary itself holds).
        """
        if name in self._trailers:
            return self._trailers[name]
        try:
            found = self._trailer_in(self.primary, name)
        except WalMissing:
            if primary_only or self.copy is None or not self.read_copy or self.copy_problem is not None:
                raise
            return self._trailer_in(self.copy, name)
        if self.features.read_only:  # nothing changes it through us: read once
            self._trailers[name] = found
        return found

    def _trailer_in(self, location: Storage, name: str) -> Trailer:
        """The trailer of ``name`` as ``location`` (the primary or the copy) holds it."""
        where = "the WAL archive" if location is self.primary else "the WAL copy"
        try:
            tail = location.read_tail(object_key(name), TRAILER_SIZE)
        except ObjectMissing:
            raise WalMissing(f"{name} is not in {where} {location.location}") from None
        except (StorageError, OSError) as exc:
            raise WalArchiveError(f"cannot read {name} in {where} {location.location}: {exc}") from None
        if len(tail) < TRAILER_SIZE:
            raise WalCorrupt(f"archived {name} is damaged: only {len(tail)} bytes")
        return parse_trailer(tail, f"archived {name}")

    def read_text(self, name: str) -> str:
        """A small archived file (a .history or .backup file), decompressed and checked: from the primary, else from
        the copy (``wal.fetch``)."""
        return self._read_anywhere(name, b"".join).decode(errors="replace")

    def _read_anywhere(self, name: str, consume: Callable[[Iterator[bytes]], T], *, judge_absence: bool = False) -> T:
        """``consume`` the checked content of ``name`` from the primary, else from elsewhere (``wal.fetch``)."""
        try:
            return consume(self.verified_chunks(name, hashlib.sha256()))
        except (WalArchiveError, WalCorrupt) as exc:  # WalMissing included; a wrong identity is no location's fault
            primary_error = exc
        from backup_tasks.wal.fetch import elsewhere  # only when the primary cannot give it: off the per-segment path

        return elsewhere(self, name, consume, primary_error, judge_absence=judge_absence)

    def verified_chunks(self, name: str, digest: hashlib._Hash) -> Iterator[bytes]:
        """Decompressed content of the primary's ``name``; raises ``WalCorrupt`` unless size and sha256 match."""
        fh, total = self._open(name)
        with fh:
            yield from verified_chunks(fh, total, name, digest, identity_file=self.identity_file)

    def _open(self, name: str) -> tuple[BinaryIO, int]:
        """The archived object of ``name`` in the primary, seekable, and its size."""
        try:
            fh = self.primary.open(object_key(name))
        except ObjectMissing:
            if not self.available():
                # Not "this file is not archived": the archive itself is gone (unmounted, wrong path).
                raise WalArchiveError(f"the WAL archive directory {self.root} does not exist or cannot be "
                                      f"entered") from None
            raise WalMissing(f"{name} is not in the WAL archive {self.location}") from None
        except StorageError as exc:
            raise WalArchiveError(f"cannot read {name} in the WAL archive {self.location}: {exc}") from None
        try:
            if not fh.seekable():  # a bucket's stream: one WAL file, read whole
                with fh:
                    fh = io.BytesIO(fh.read())
            return fh, fh.seek(0, io.SEEK_END)
        except StorageError as exc:
            raise WalArchiveError(f"cannot read {name} in the WAL archive {self.location}: {exc}") from None

    # wal-fetch ---------------------------------------------------------------------------------------

    def fetch(self, name: str, destination: Path) -> int:
        """Restore ``name`` to ``destination`` (atomically: a temporary name, then rename); return its size.

        From the primary, else from the copy, whichever holds a good one (``wal.fetch``). Raises
        ``WalMissing`` only when it is provably not archived (the normal end of recovery: ``wal.absence``),
        ``WalGap`` when known WAL shows it existed, ``WalCorrupt`` when no good copy passes its checksum,
        ``WalArchiveError`` when a location that may hold it cannot be read: nothing is left at ``destination``.
        """
        kind_of(name)
        return self._read_anywhere(name, lambda chunks: restore_file(name, destination, chunks), judge_absence=True)

    # wal-push ----------------------------------------------------------------------------------------

    def push(self, source: Path, *, level: int = DEFAULT_LEVEL, copy: bool = True,
             copy_within: float | None = None) -> PushResult:
        """Archive ``source``: compressed, checksummed, stored create-only in the primary, then in the copy.

        ``copy=False``: the primary only (push-ahead puts into the copy what it reads back: ``copy_object``;
        behind a backlog, ``wal.pushahead`` queues it). ``copy_within`` (wal-push's ``--copy-timeout``):
        the copy gets that many seconds; when it fails or does not answer in time, the file is queued
        for it (``wal.backlog``, durable before this returns) and the result says ``copy="queued"``.
        Without it a failing copy raises, the primary keeping the file. When the primary cannot be
        written but the copy can, the file goes to the copy alone, said loudly: ``status="copy-only"``.
        """
        name = source.name
        kind_of(name)
        key = object_key(name)
        try:
            stat = os.stat(source)
        except OSError as exc:
            raise WalArchiveError(f"cannot read {source}: {exc.strerror}") from None
        local_failure: StorageError | None = None
        try:
            self._ensure_root()
        except WalArchiveError as exc:
            local_failure = exc
        else:
            from backup_tasks.wal.system import check_push  # the archive's system: refuses another's WAL (exit 2)
            check_push(self.primary, source)
        try:
            stored = stored_object(source, size=stat.st_size, completed_at=stat.st_mtime, level=level,
                                   recipients=self.recipients)
        except OSError as exc:
            raise WalArchiveError(f"cannot read {source}: {exc.strerror or exc}") from None
        settle = self._settle(name, stored.trailer)
        in_primary = None
        if local_failure is None:
            try:
                in_primary = self.mirror.primary_new(key, stored.data, settle=settle)
            except WalConflict:
                raise
            except (StorageError, OSError) as exc:  # full, read-only, permission denied...: the copy may take it
                local_failure = exc if isinstance(exc, StorageError) else WalArchiveError(f"writing {key}: {exc}")
            finally:
                if self._contents is not None:
                    self._contents.changed()
        if local_failure is not None or in_primary is None:
            return self._push_copy_only(name, stored.data, stored.trailer.size, settle, local_failure,
                                        copy=copy, within=copy_within)
        if in_primary is Outcome.CREATED:
            result = PushResult(name, key, "archived", stored.trailer.size, len(stored.data))
        else:
            result = PushResult(name, key, "already-archived", stored.trailer.size, self.primary.size(key))
        if not copy or self.copy is None:
            return result
        # The copy gets what the primary holds, byte for byte.
        data = stored.data if in_primary is Outcome.CREATED else self.primary.read_bytes(key)
        return self._push_copy(result, data, settle, within=copy_within)

    def _push_copy(self, result: PushResult, data: bytes, settle: Settle, *, within: float | None) -> PushResult:
        """The copy's part of ``push``: stored within ``within`` seconds, else queued (see ``push``)."""
        assert self.copy is not None
        try:
            self.mirror.copy_new(result.key, data, settle=settle, within=within)
        except WalConflict:
            raise
        except (StorageError, OSError) as exc:
            if within is None or self.root is None:
                raise
            from backup_tasks.wal.backlog import Backlog

            backlog = Backlog(self.root)
            try:
                backlog.add(result.name, reason=str(exc), copy=self.copy.location)
            except OSError as queue_error:  # neither in the copy nor queued for it: not acknowledged
                raise WalArchiveError(f"{result.name} is archived in {self.location} but the copy "
                                      f"{self.copy.location} did not take it ({exc}) and it could not be queued "
                                      f"for it: {queue_error.strerror or queue_error}") from None
            backlog.note_failure(str(exc))
            log.warning("backup-tasks wal-push: %s is archived in %s; the copy %s did not take it (%s): queued for "
                        "it, shipped by `backup-tasks wal-ship`, the worker or a later wal-push", result.name,
                        self.location, self.copy.location, exc)
            return replace(result, copy="queued")
        return replace(result, copy="stored")

    def _push_copy_only(self, name: str, data: bytes, size: int, settle: Settle, local_failure: StorageError | None,
                        *, copy: bool, within: float | None) -> PushResult:
        """The primary cannot be written: ``data`` into the copy alone, or ``local_failure`` (with the copy's)."""
        assert local_failure is not None
        if not copy or self.copy is None:
            raise local_failure
        try:
            self.mirror.copy_new(object_key(name), data, settle=settle, within=within)
        except WalConflict:
            raise
        except (StorageError, OSError) as exc:
            raise WalArchiveError(f"{local_failure}; and the copy {self.copy.location} did not take {name} "
                                  f"either: {exc}") from None
        log.warning("backup-tasks wal-push: WARNING: the WAL archive %s cannot be written (%s): %s is stored in the "
                    "copy %s ONLY. Fix the archive (`backup-tasks check`)", self.location, local_failure, name,
                    self.copy.location)
        return PushResult(name, object_key(name), "copy-only", size, len(data), copy="stored")

    def copy_object(self, name: str, data: bytes, *, within: float | None = None) -> Outcome | None:
        """Store ``data`` (the archived object of ``name``, as the primary holds it) in the copy, as ``push`` does.

        Returns only once the copy holds an object with the same trailer (this one, or an identical
        earlier one); ``WalConflict`` when it holds different content; ``StorageUnavailable`` when it
        did not answer within ``within`` seconds. Push-ahead (``wal.pushahead``) calls it with the bytes
        whose file it recorded, so its marker describes exactly what was put; the shipper (``wal.ship``)
        with the archived object it checked.
        """
        return self.mirror.copy_new(object_key(name), data, settle=self._settle(name, None), within=within)

    def _settle(self, name: str, ours: Trailer | None) -> Settle:
        """The WAL's rule for a key a location holds already (``copies.Settle``).

        The primary: the same content (size and sha256 of the original) is already archived; other
        content a ``WalConflict``; a damaged object ``WalCorrupt``, as any read of it. The copy: the
        same trailer is already there; a damaged one (no valid trailer) is replaced by the good
        object; another trailer is a ``WalConflict``, the copy left untouched.
        """
        def settle(location: Storage, key: str, data: bytes) -> Outcome:
            if location is self.primary:
                archived = self.trailer(name, primary_only=True)
                assert ours is not None
                if (archived.sha256, archived.size) == (ours.sha256, ours.size):
                    return Outcome.HELD
                raise self._conflict(name, archived, ours.sha256, ours.size)
            existing = location.read_tail(key, TRAILER_SIZE)
            if existing == data[-TRAILER_SIZE:]:
                return Outcome.HELD
            try:
                parse_trailer(existing, f"{name} in {location.location}")
            except WalCorrupt:
                return Outcome.REPLACED
            raise WalConflict(f"{name} is already in the WAL copy {location.location} with DIFFERENT content; the "
                              f"copy was left untouched")
        return settle

    def _conflict(self, name: str, archived: Trailer, digest: str, size: int) -> WalConflict:
        return WalConflict(f"{name} is already in the WAL archive {self.location} with DIFFERENT content "
                           f"(archived: {archived.size} bytes, sha256 {archived.sha256[:16]}…; now: {size} bytes, "
                           f"sha256 {digest[:16]}…). Two servers may be archiving into the same directory; "
                           f"the archived copy was left untouched")

    def already_archived(self, source: Path) -> PushResult:
        """``source`` is archived already with the same content (a repeated push); else ``WalConflict``."""
        name = source.name
        archived = self.trailer(name, primary_only=True)
        digest, size = file_sha256(source)
        if digest != archived.sha256 or size != archived.size:
            raise self._conflict(name, archived, digest, size)
        return PushResult(name, object_key(name), "already-archived", size, self.size_of(name))

    # records and expiry ------------------------------------------------------------------------------

    def put_record(self, key: str, data: bytes) -> None:
        """A small record (a restore point) stored in the archive, then in its copy."""
        self.mirror.put_bytes(key, data)

    def delete_record(self, key: str) -> None:
        """A record removed from the copy, then the archive: a copy that refuses keeps the archive's too."""
        self.mirror.delete(key)

    def delete(self, name: str) -> None:
        """Remove ``name`` from the copy, then here."""
        self.delete_record(object_key(name))
        if self._contents is not None:
            self._contents.changed()

    def delete_many(self, names: list[str]) -> dict[str, StorageError]:
        """Remove ``names`` from the copy, then here (WAL expiry, in ``copies.WAL``'s order and batches);
        ``{name: error}`` of failures, typed as the storage contract says (``ObjectLocked`` for a copy an
        Object Lock still holds). A name the copy refused stays here too, so it is listed next time."""
        keys = {object_key(name): name for name in names}
        try:
            return {keys[key]: reason for key, reason in self.mirror.delete_many(keys).items()}
        finally:
            if self._contents is not None:
                self._contents.changed()

    def clear_incoming(self, older_than: float) -> list[str]:
        """Remove what killed wal-push runs left: partial objects whose writer is gone, and the temporary
        ``.incoming-`` files of wal-push before this version older than ``older_than`` (a unix time)."""
        if self.root is None or self.features.read_only:
            return []
        from backup_tasks.wal.contents import list_directory

        removed = [key.rsplit("/", 1)[-1] for key in self.primary.clear_partials()]
        for directory in [*self.contents.segment_dirs(), HISTORY_DIR]:
            for entry in list_directory(self.root / directory):
                if INCOMING_MARK in entry:
                    path = self.root / directory / entry
                    try:
                        if path.stat().st_mtime < older_than:
                            path.unlink()
                            removed.append(entry)
                    except FileNotFoundError:
                        continue
        return removed


def restore_file(name: str, destination: Path, chunks: Iterator[bytes]) -> int:
    """``chunks`` written to ``destination`` atomically (``pg_wal``'s file: nothing there unless whole); its size."""
    try:
        return write_atomically(destination, chunks, mode=None, mark=".fetch-")
    except OSError as exc:
        raise WalArchiveError(f"restoring {name} to {destination} failed: {exc.strerror or exc}") from None
