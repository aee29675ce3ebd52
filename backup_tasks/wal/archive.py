"""The continuous WAL archive: ``wal-push`` (archive_command) and ``wal-fetch`` (restore_command).

PostgreSQL runs these once per WAL segment as its own OS user (``postgres``), so this module is
import-light on purpose (standard library and zstandard only: no Celery, Redis, psycopg or Sentry)
and touches nothing but the archive directory.

Layout under the archive directory::

    <TTTTTTTTLLLLLLLL>/<segment>.zst     segments (and their .partial/.backup files), one directory per
                                         timeline and 4 GiB of WAL (256 segments of 16 MiB)
    history/<TTTTTTTT>.history.zst       timeline history files
    restore_points/<segment>-<name>.json named restore points made through backup-tasks

Every ``.zst`` object is one zstd frame (with zstd's content checksum) followed by a zstd
*skippable* frame that carries the sha256 and size of the original file and the time the segment
was completed. ``zstd -d`` skips that trailer, so the archive stays readable without this tool.

Permissions: the archive is shared by root (worker, CLI, prune) and the server's OS user
(archive_command, restore_command). Directories are ``2770`` (setgid: everything inside inherits
the directory's group, the server user's group), files ``0640``; modes are set explicitly because
the server runs its children with umask 077. wal-push creates a missing archive directory itself
when its parent exists and this user may write there (a fresh Docker volume the server user owns);
anywhere else ``backup-tasks check``, run as root, creates it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard

from backup_tasks.errors import (
    BackupError,
    StorageError,
    WalArchiveError,
    WalConflict,
    WalCorrupt,
    WalGap,
    WalMissing,
)
from backup_tasks.storage.base import fsync_dir

if TYPE_CHECKING:
    from backup_tasks.storage.base import Storage
    from backup_tasks.storage.s3 import S3Credentials
    from backup_tasks.wal.index import ArchiveIndex, TimelineRuns
from backup_tasks.wal.files import (  # noqa: F401 (the layout, also read from here by callers)
    COPY_SUBDIR,
    DIR_MODE,
    FILE_MODE,
    HISTORY_DIR,
    INCOMING_MARK,
    RESTORE_POINT_DIR,
    SUFFIX,
)
from backup_tasks.wal.names import (
    HISTORY_RE,
    SEGMENT_RE,
    kind_of,
    position,
)

log = logging.getLogger(__name__)


CHUNK = 1 << 20
DEFAULT_LEVEL = 1  # WAL compresses as well at level 1 as at 3, twice as fast (measured on trading WAL)
#: The first line of an age-encrypted file (as ``crypto.AGE_MAGIC``; not imported, to keep this module light).
AGE_MAGIC = b"age-encryption.org/v1\n"


# Trailer: a zstd skippable frame (magic 0x184D2A5B, then payload length) whose payload is our tag,
# the sha256 and size of the uncompressed file and its completion time (unix microseconds).
TRAILER_MAGIC = 0x184D2A5B
TRAILER_TAG = b"BTWAL001"
_PAYLOAD = struct.Struct("<8s32sQq")
_HEADER = struct.Struct("<II")
TRAILER_SIZE = _HEADER.size + _PAYLOAD.size


def object_key(name: str) -> str:
    """Where ``name`` lives, relative to the archive directory."""
    if kind_of(name) == "history":
        return f"{HISTORY_DIR}/{name}{SUFFIX}"
    return f"{name[:16]}/{name}{SUFFIX}"


@dataclass(frozen=True)
class Trailer:
    sha256: str
    size: int
    completed_at: float  # unix time the file was last written by the server (segment completion)


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    status: str  # "archived" or "already-archived"
    original_bytes: int
    stored_bytes: int


def _trailer_bytes(digest: bytes, size: int, completed_at: float) -> bytes:
    return _HEADER.pack(TRAILER_MAGIC, _PAYLOAD.size) + _PAYLOAD.pack(TRAILER_TAG, digest, size,
                                                                        int(completed_at * 1_000_000))


def parse_trailer(raw: bytes, what: str) -> Trailer:
    if len(raw) == TRAILER_SIZE:
        magic, length = _HEADER.unpack_from(raw)
        if magic == TRAILER_MAGIC and length == _PAYLOAD.size:
            tag, digest, size, micros = _PAYLOAD.unpack_from(raw, _HEADER.size)
            if tag == TRAILER_TAG:
                return Trailer(digest.hex(), size, micros / 1_000_000)
    raise WalCorrupt(f"{what} is damaged: its checksum trailer is missing (truncated, or not written by "
                     f"backup-tasks)")


def file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class WalArchive:
    """A WAL archive in a local (or mounted) directory."""

    def __init__(self, root: Path | str, copy_to: str | None = None, *, recipients: tuple[str, ...] = (),
                 identity_file: str | Path | None = None, copy_credentials: S3Credentials | None = None) -> None:
        self.root = Path(root)
        #: BACKUP_ENCRYPT_RECIPIENT: pushed files are age-encrypted to these public keys (see ``push``).
        self.recipients = tuple(recipients)
        #: BACKUP_DECRYPT_IDENTITY_FILE: read only when an encrypted file is read back.
        self.identity_file = identity_file
        #: BACKUP_COPY_TO: every archived file is also written to ``<copy_to>/wal/<same key>``, and
        #: fetch falls back to it when a file is missing or damaged here.
        self.copy_to = copy_to.strip() if copy_to and copy_to.strip() else None
        #: Credentials for the copy other than the ambient ones (``storage.s3.S3Credentials``: prune's own).
        self.copy_credentials = copy_credentials
        self._copy: Storage | None = None

    @classmethod
    def for_settings(cls, settings: Any, root: Path | None = None) -> WalArchive:
        """The archive of ``Settings``: its directory, BACKUP_COPY_TO, encryption recipients and identity file."""
        return cls(root or settings.wal_archive, settings.copy_to, recipients=settings.encrypt_recipients,
                   identity_file=settings.decrypt_identity_file)

    def _decrypted(self, fh: BinaryIO, total: int, name: str) -> BinaryIO:
        """The zstd frame inside an age-encrypted archived file (small: one WAL file, decrypted in memory)."""
        from backup_tasks.streams.crypto import decrypt_bytes, load_identities

        identities = load_identities(self.identity_file, needed_for=f"the archived WAL file {name}")
        fh.seek(0)
        # A wrong identity is IdentityUnusable, damage WalCorrupt: decided in streams.crypto.
        return io.BytesIO(decrypt_bytes(fh.read(total - TRAILER_SIZE), identities, what=f"archived {name}",
                                        damaged=WalCorrupt))

    def copy_storage(self) -> Storage | None:
        """The copy location of this archive (``<BACKUP_COPY_TO>/wal``), or None; boto3 only for a bucket."""
        if self.copy_to is None:
            return None
        if self._copy is None:
            from backup_tasks.storage.locations import open_storage

            self._copy = open_storage(f"{self.copy_to.rstrip('/')}/{COPY_SUBDIR}", setting="BACKUP_COPY_TO",
                                      credentials=self.copy_credentials)
        return self._copy

    def __repr__(self) -> str:
        return f"WalArchive({str(self.root)!r})"

    def path_for(self, name: str) -> Path:
        return self.root / object_key(name)

    # directories -----------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the archive directory if needed (mode 2770); fail clearly when that is impossible."""
        if self.root.is_dir():
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, DIR_MODE)
        except OSError as exc:
            raise WalArchiveError(f"cannot create the WAL archive directory {self.root}: {exc.strerror}; "
                                  f"create it once as root with `backup-tasks check`") from None

    def ensure_subdir(self, path: Path) -> None:
        if path.is_dir():
            return
        if not self.root.is_dir() and not self._create_root():
            raise WalArchiveError(f"the WAL archive directory {self.root} does not exist (or this user cannot "
                                  f"reach it); create it with `backup-tasks check` as root")
        try:
            path.mkdir(exist_ok=True)
            os.chmod(path, DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise WalArchiveError(f"cannot create {path} in the WAL archive: {exc.strerror}") from None

    def _create_root(self) -> bool:
        """Create the missing archive directory (mode 2770) where this user may; False where it may not.

        Out of the box nobody has run ``check``: the server user owns the backups directory (a fresh
        Docker volume, a BACKUP_DIR made for it) and the archive inside it does not exist yet. Refusing
        there would fail archiving from the very first segment, so wal-push makes it. Only the last
        level: a missing parent is more likely an unmounted volume or a wrong path than a place to
        start an archive, and neither should quietly receive WAL.
        """
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

    @property
    def location(self) -> str:
        """Where the archive is, for messages (a bucket-backed view says its URL: ``wal.remote``)."""
        return str(self.root)

    def available(self) -> bool:
        """Whether there is an archive to read at all (a local one: its directory exists)."""
        return self.root.is_dir()

    def exists(self, name: str) -> bool:
        return self.path_for(name).is_file()

    def trailer(self, name: str) -> Trailer:
        path = self.path_for(name)
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < TRAILER_SIZE:
                    raise WalCorrupt(f"archived {name} is damaged: only {size} bytes")
                fh.seek(size - TRAILER_SIZE)
                return parse_trailer(fh.read(TRAILER_SIZE), f"archived {name}")
        except FileNotFoundError:
            raise WalMissing(f"{name} is not in the WAL archive {self.root}") from None
        except OSError as exc:
            raise WalArchiveError(f"cannot read {path}: {exc.strerror}") from None

    def index(self, *, count_bytes: Callable[[str], bool] | None = None) -> ArchiveIndex:
        """The archive's directories summarized (``wal.index``: cached, each directory checked by its mtime)."""
        from backup_tasks.wal.index import read_index  # readers only: wal-push never lists the archive

        return read_index(self.root, count_bytes=count_bytes)

    def segment_names(self) -> list[str]:
        """Every archived segment (not .partial/.backup/.history) where wal-fetch finds it, in WAL order."""
        return self.index().segment_names()

    def segment_runs(self) -> TimelineRuns:
        """The archived segments as runs per timeline (what ``wal.coverage`` walks): see ``wal.index``.

        Without a local directory (a bucket seen as an archive, ``wal.remote``) they are worked out from
        ``segment_names``, whatever lists those.
        """
        if not self.root.is_dir():
            from backup_tasks.wal.index import timeline_runs_of_names

            return timeline_runs_of_names(self.segment_names())
        return self.index().timeline_runs()

    def names(self) -> list[str]:
        """Every archived WAL file of any kind."""
        return self.index().names()

    def history_names(self) -> list[str]:
        return sorted(entry[:-len(SUFFIX)] for entry in _listdir(self.root / HISTORY_DIR)
                      if entry.endswith(SUFFIX) and HISTORY_RE.match(entry[:-len(SUFFIX)]))

    def _segment_dirs(self) -> Iterator[Path]:
        for entry in _listdir(self.root):
            if len(entry) == 16 and re.fullmatch(r"[0-9A-F]{16}", entry):
                yield self.root / entry

    def read_text(self, name: str) -> str:
        """A small archived file (a .history or .backup file), decompressed and checked."""
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        for chunk in self.verified_chunks(name, digest):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def later_segment_exists(self, name: str) -> bool:
        """Whether a segment after ``name`` on the same timeline is archived (so ``name`` is a gap)."""
        tli, pos = name[:8], position(name)
        for directory in self._segment_dirs():
            if directory.name[:8] != tli or directory.name[8:] < pos[:8]:
                continue
            for entry in _listdir(directory):
                base = entry[:-len(SUFFIX)]
                if entry.endswith(SUFFIX) and SEGMENT_RE.match(base) and position(base) > pos:
                    return True
        return False

    def verified_chunks(self, name: str, digest: hashlib._Hash) -> Iterator[bytes]:
        """Decompressed content of ``name``; raises ``WalCorrupt`` unless size and sha256 match."""
        path = self.path_for(name)
        try:
            fh = open(path, "rb")  # noqa: SIM115 (closed by the `with fh` below)
        except FileNotFoundError:
            if kind_of(name) == "segment" and self.later_segment_exists(name):
                raise WalGap(f"WAL segment {name} is missing from the archive {self.root} although later "
                             f"segments of its timeline are there: recovery cannot go past this gap") from None
            raise WalMissing(f"{name} is not in the WAL archive {self.root}") from None
        except OSError as exc:
            raise WalArchiveError(f"cannot read {path}: {exc.strerror}") from None
        with fh:
            yield from self._verified_stream(fh, os.fstat(fh.fileno()).st_size, name, digest)

    def _verified_stream(self, fh: BinaryIO, total: int, name: str, digest: hashlib._Hash) -> Iterator[bytes]:
        """Decompressed content of one archived object read from ``fh`` (``total`` bytes), checked by its trailer."""
        if total < TRAILER_SIZE:
            raise WalCorrupt(f"archived {name} is damaged: only {total} bytes")
        fh.seek(total - TRAILER_SIZE)
        trailer = parse_trailer(fh.read(TRAILER_SIZE), f"archived {name}")
        fh.seek(0)
        if fh.read(len(AGE_MAGIC)) == AGE_MAGIC:
            fh = self._decrypted(fh, total, name)
        fh.seek(0)
        size = 0
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(fh, read_size=CHUNK, read_across_frames=False)
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                yield chunk
        except zstandard.ZstdError as exc:
            raise WalCorrupt(f"archived {name} is damaged: {exc}") from None
        if size != trailer.size or digest.hexdigest() != trailer.sha256:
            raise WalCorrupt(f"archived {name} is damaged: it decompresses to {size} bytes with sha256 "
                             f"{digest.hexdigest()[:16]}…, but was archived as {trailer.size} bytes with sha256 "
                             f"{trailer.sha256[:16]}…")

    # wal-fetch ---------------------------------------------------------------------------------------

    def fetch(self, name: str, destination: Path) -> int:
        """Restore ``name`` to ``destination`` (atomically: a temporary name, then rename); return its size.

        Raises ``WalMissing`` when it is not archived (the normal end of recovery), ``WalGap`` when later
        segments exist, ``WalCorrupt`` when it fails its checksum: nothing is left at ``destination``.
        """
        kind_of(name)
        try:
            return self._fetch_local(name, destination)
        except (WalArchiveError, WalCorrupt) as local_error:
            copy = self.copy_storage()
            if copy is None:
                raise
            return self._fetch_copy(copy, name, destination, local_error)

    def _fetch_copy(self, copy: Storage, name: str, destination: Path, local_error: BackupError) -> int:
        """BACKUP_COPY_TO's copy of ``name``, checked by its own trailer; the local error when the copy lacks it."""
        key = object_key(name)
        try:
            data = copy.read_bytes(key)
        except Exception as exc:  # a StorageError, or an OSError such as a copy this user cannot enter
            try:
                missing = not copy.exists(key)
            except Exception:
                missing = False
            if missing:
                raise local_error from None
            if isinstance(local_error, WalMissing):
                # PostgreSQL asks for files that never existed (the next timeline's history): an unreachable
                # copy must not turn that normal answer into a fatal one. Said loudly, in the server log.
                log.warning("%s is not in the local WAL archive, and the copy in %s cannot be read to make sure: "
                            "%s", name, copy.location, exc)
                raise local_error from None
            raise WalArchiveError(f"{local_error}; the copy in {copy.location} cannot be read either: {exc}") from None
        log.warning("%s; restoring %s from the copy in %s", local_error, name, copy.location)
        try:
            return self._write_atomically(
                name, destination, self._verified_stream(io.BytesIO(data), len(data), name, hashlib.sha256()))
        except WalCorrupt as exc:
            raise WalCorrupt(f"{local_error}; and the copy in {copy.location} is damaged too: {exc}") from None

    def _fetch_local(self, name: str, destination: Path) -> int:
        if not self.root.is_dir():
            # Not "this file is not archived": the archive itself is gone (unmounted, wrong path).
            raise WalArchiveError(f"the WAL archive directory {self.root} does not exist or cannot be entered")
        return self._write_atomically(name, destination, self.verified_chunks(name, hashlib.sha256()))

    def _write_atomically(self, name: str, destination: Path, chunks: Iterator[bytes]) -> int:
        temp = destination.with_name(f".{destination.name}.fetch-{uuid.uuid4().hex[:12]}")
        size = 0
        try:
            with open(temp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
            os.replace(temp, destination)
        except BaseException as exc:
            try:
                temp.unlink()
            except FileNotFoundError:
                pass
            if isinstance(exc, OSError):
                raise WalArchiveError(f"restoring {name} to {destination} failed: {exc.strerror or exc}") from None
            raise
        return size

    # wal-push ----------------------------------------------------------------------------------------

    def push(self, source: Path, *, level: int = DEFAULT_LEVEL) -> PushResult:
        """Archive ``source``: compressed, checksummed, fsynced and published atomically without clobbering.

        Success is returned only once the object and its directory entry are on disk. A file already
        archived with the same content succeeds again (PostgreSQL retries after crashes); with different
        content it raises ``WalConflict`` and the archived copy stays untouched.
        """
        result = self._push_local(source, level=level)
        self._push_copy(result.name)
        return result

    def _push_copy(self, name: str) -> None:
        """Put the archived object, byte for byte, into BACKUP_COPY_TO (success only once it is there too).

        Create-only (``put_new``), so two pushers never overwrite each other. When the key is taken:
        the same content (trailer: size and sha256 of the original) means already archived, nothing
        to do, as for a repeated push; a damaged object (no valid trailer) is replaced by the good
        local one; different content is a ``WalConflict``, the copy left untouched, as locally.
        """
        if self.copy_to is None:
            return
        self.copy_object(name, self.path_for(name).read_bytes())

    def copy_object(self, name: str, data: bytes) -> None:
        """Store ``data`` (the archived object of ``name``, read by the caller) in BACKUP_COPY_TO, as ``_push_copy``.

        Returns only once the copy holds an object with the same trailer (this one, or an identical
        earlier one); ``WalConflict`` when it holds different content. Push-ahead (``wal.pushahead``)
        calls it with the bytes whose file it recorded, so its marker describes exactly what was put.
        """
        copy = self.copy_storage()
        if copy is None:
            return
        key = object_key(name)
        if copy.put_new(key, data):
            return
        existing = copy.read_bytes(key)
        if existing[-TRAILER_SIZE:] == data[-TRAILER_SIZE:]:
            return
        try:
            parse_trailer(existing[-TRAILER_SIZE:], f"{name} in {copy.location}")
        except WalCorrupt:  # too short or no valid trailer
            copy.put_bytes(key, data)  # a damaged copy is replaced by the good local object
            return
        raise WalConflict(f"{name} is already in the WAL copy {copy.location} with DIFFERENT content; the "
                          f"copy was left untouched")

    def _push_local(self, source: Path, *, level: int = DEFAULT_LEVEL) -> PushResult:
        name = source.name
        kind_of(name)
        final = self.path_for(name)
        try:
            stat = os.stat(source)
        except OSError as exc:
            raise WalArchiveError(f"cannot read {source}: {exc.strerror}") from None
        if final.exists():
            return self._already_archived(source, name, final)
        self.ensure_subdir(final.parent)
        temp = final.with_name(f".{final.name}{INCOMING_MARK}{uuid.uuid4().hex[:12]}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            raise WalArchiveError(f"cannot write to the WAL archive {final.parent}: {exc.strerror}") from None
        try:
            os.fchmod(fd, FILE_MODE)  # the server's umask 077 would leave it unreadable to the group
            with os.fdopen(fd, "wb") as out:
                if self.recipients:
                    digest, size = _compress_encrypted_into(source, out, level, stat.st_size, self.recipients)
                else:
                    digest, size = _compress_into(source, out, level, stat.st_size)
                out.write(_trailer_bytes(digest, size, stat.st_mtime))
                out.flush()
                os.fsync(out.fileno())
                stored = out.tell()
            try:
                os.link(temp, final)  # atomic and never overwrites: a concurrent writer cannot be clobbered
            except FileExistsError:
                return self._already_archived(source, name, final)
            except OSError:
                if final.exists():
                    return self._already_archived(source, name, final)
                os.rename(temp, final)  # filesystems without hard links
            fsync_dir(final.parent)
        except OSError as exc:
            raise WalArchiveError(f"archiving {name} into {final.parent} failed: {exc.strerror or exc}") from None
        finally:
            try:
                temp.unlink()
            except FileNotFoundError:
                pass
        return PushResult(name, object_key(name), "archived", size, stored)

    def _already_archived(self, source: Path, name: str, final: Path) -> PushResult:
        trailer = self.trailer(name)
        digest, size = file_sha256(source)
        if digest == trailer.sha256 and size == trailer.size:
            return PushResult(name, object_key(name), "already-archived", size, final.stat().st_size)
        raise WalConflict(f"{name} is already in the WAL archive {self.root} with DIFFERENT content "
                          f"(archived: {trailer.size} bytes, sha256 {trailer.sha256[:16]}…; now: {size} bytes, "
                          f"sha256 {digest[:16]}…). Two servers may be archiving into the same directory; "
                          f"the archived copy was left untouched")

    def delete(self, name: str) -> None:
        """Remove ``name`` here and from the copy (WAL expiry)."""
        try:
            self.path_for(name).unlink()
        except FileNotFoundError:
            pass
        copy = self.copy_storage()
        if copy is not None:
            copy.delete(object_key(name))

    def size_of(self, name: str) -> int:
        try:
            return self.path_for(name).stat().st_size
        except FileNotFoundError:
            return 0

    def clear_incoming(self, older_than: float) -> list[str]:
        """Remove temporary files a killed wal-push left (only ones older than ``older_than``, a unix time)."""
        removed = []
        for directory in [*self._segment_dirs(), self.root / HISTORY_DIR]:
            for entry in _listdir(directory):
                if INCOMING_MARK in entry:
                    path = directory / entry
                    try:
                        if path.stat().st_mtime < older_than:
                            path.unlink()
                            removed.append(entry)
                    except FileNotFoundError:
                        continue
        return removed

    def delete_many(self, names: list[str], *, batch: int = 1000) -> dict[str, StorageError]:
        """Remove ``names`` from the copy (batched deletes), then here (WAL expiry); ``{name: error}`` of failures
        (typed as the storage contract says: ``ObjectLocked`` for a copy an Object Lock still holds).

        The copy first, ``batch`` names at a time: an interruption leaves files here whose copy is
        gone, which the next prune lists and deletes again, never copies nobody lists any more. A
        name the copy refused stays here too (so it is listed next time).
        """
        failures: dict[str, StorageError] = {}
        copy = self.copy_storage()
        for start in range(0, len(names), batch):
            chunk = names[start:start + batch]
            if copy is not None:
                keys = {object_key(name): name for name in chunk}
                failures.update({keys[key]: reason for key, reason in copy.delete_many(list(keys)).items()})
            for name in chunk:
                if name in failures:
                    continue
                try:
                    self.path_for(name).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failures[name] = WalArchiveError(f"cannot delete {self.path_for(name)}: {exc.strerror}")
        return failures


def _compress_into(source: Path, out: object, level: int, size_hint: int) -> tuple[bytes, int]:
    params = zstandard.ZstdCompressionParameters.from_level(level, write_checksum=True)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj(size=size_hint)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(compressor.compress(chunk))  # type: ignore[attr-defined]
    if size != size_hint:
        raise WalArchiveError(f"{source} changed size while it was being archived ({size_hint} -> {size} bytes)")
    out.write(compressor.flush())  # type: ignore[attr-defined]
    return digest.digest(), size


def _compress_encrypted_into(source: Path, out: object, level: int, size_hint: int,
                             recipients: tuple[str, ...]) -> tuple[bytes, int]:
    """age(zstd frame): one WAL file is compressed in memory, then encrypted in one call.

    The trailer after it stays readable without the key (size and sha256 of the original, completion
    time): a repeated push is recognized, and PITR coverage is computed, by a machine holding only the
    public key.
    """
    import pyrage
    from pyrage import x25519

    buffer = io.BytesIO()
    digest, size = _compress_into(source, buffer, level, size_hint)
    out.write(pyrage.encrypt(buffer.getvalue(), [x25519.Recipient.from_str(r) for r in recipients]))  # type: ignore[attr-defined]
    return digest, size


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except PermissionError:
        raise WalArchiveError(f"permission denied reading the WAL archive directory {path}") from None
