"""``wal-fetch --archive-url URL``: restore_command reading from a bucket, with read-ahead into a spool.

PostgreSQL asks for one segment at a time and waits for each. Against a bucket every request costs a
round trip plus boto3's import (~0.3 s) in a fresh process, so replay would crawl. As pgBackRest's
archive-get queue and WAL-G's prefetch do, the first call forks a *prefetcher*: one process, one S3
client, ``depth`` threads, keeping segments N+1..N+depth (N: the last one PostgreSQL asked for) as
stored objects in a spool directory beside ``%p`` (``pg_wal/.backup-tasks-prefetch-<tag>``). The
next calls find their segment there and return at once without importing boto3.

Never a wrong file: a spooled object is handed over only after the same check as a local fetch
(decompressed size and sha256 against its trailer) plus the segment's own first page header
(its WAL position and segment size must be the requested segment's). A damaged, stale or misplaced
spool file is discarded and the segment fetched directly. Missing N+k is normal (the end of the
archive), not an error. The spool holds at most ``depth`` objects (older and farther ones are
pruned), and is removed when the archive ends (a segment not archived), when the prefetcher has had
nothing to do for ``IDLE_SECONDS``, and by ``restore-pitr`` when recovery is over.

``fetch_with_prefetch`` serves ``wal-fetch --archive-url URL ... NAME PATH`` (its command line, exit
codes and ``restore_command_for``: ``wal.command``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from backup_tasks.errors import WalCorrupt, WalMissing
from backup_tasks.storage.files import PRIVATE_MODES, write_atomically
from backup_tasks.wal.archive import restore_file
from backup_tasks.wal.layout import object_key
from backup_tasks.wal.names import SEGMENT_RE, segment_name, segment_number, timeline_of
from backup_tasks.wal.objects import TRAILER_SIZE, parse_trailer, verified_chunks

if TYPE_CHECKING:
    from backup_tasks.storage.base import Storage
    from backup_tasks.wal.archive import WalArchive

log = logging.getLogger(__name__)

SPOOL_PREFIX = ".backup-tasks-prefetch-"
IDLE_SECONDS = 20.0  # the prefetcher exits (and empties the spool) after this long without a request
WAIT_SECONDS = 120.0  # a call waits this long for a segment the prefetcher is downloading right now
STALE_SECONDS = 900.0  # a spooled object older than this is not trusted to belong to this recovery
MISSING_RETRY_SECONDS = 2.0
#: A call whose segment the prefetcher should be fetching waits this long for it to start (a direct fetch
#: would import boto3: ~0.3 s), e.g. right after the prefetcher was forked.
START_GRACE_SECONDS = 2.0
MISSING_MARK = ".missing"
POLL_SECONDS = 0.02
WANTED_FILE = "wanted"
LOCK_FILE = "lock"
#: What a spooled object being written carries in its temporary name (``storage.files.AtomicFile``).
PART_MARK = ".part-"

# The long page header at the start of every WAL segment (little-endian, PostgreSQL 9.3+):
# xlp_magic, xlp_info, xlp_tli, xlp_pageaddr, xlp_rem_len, (padding), xlp_sysid, xlp_seg_size.
_LONG_HEADER = struct.Struct("<HHIQI4xQI")
_XLP_LONG_HEADER = 0x0002
MIN_SEGMENT, MAX_SEGMENT = 1 << 20, 1 << 30


def check_segment_header(name: str, first: bytes, size: int) -> None:
    """Refuse content that is not segment ``name``: its first page must carry that WAL position and size."""
    if len(first) < _LONG_HEADER.size:
        raise WalCorrupt(f"{name} is too short to be a WAL segment")
    _magic, info, _tli, pageaddr, _rem, _sysid, seg_size = _LONG_HEADER.unpack_from(first)
    if not info & _XLP_LONG_HEADER or seg_size != size or pageaddr != segment_number(name, size) * size:
        raise WalCorrupt(f"the prefetched {name} holds another segment (WAL position {pageaddr:X}, segment "
                         f"size {seg_size})")


class Spool:
    """The read-ahead directory of one recovery: stored objects named by their WAL file name."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @classmethod
    def beside(cls, destination: Path, url: str, as_of: datetime | None = None) -> Spool:
        """The spool next to ``%p`` (``pg_wal``), one per archive URL (and ``--as-of``) so two never mix."""
        source = url if as_of is None else f"{url}@{as_of.astimezone(UTC).isoformat()}"
        tag = hashlib.sha256(source.encode()).hexdigest()[:12]
        return cls(destination.absolute().parent / f"{SPOOL_PREFIX}{tag}")

    def path(self, name: str) -> Path:
        return self.dir / name

    def ensure(self) -> bool:
        try:
            self.dir.mkdir(mode=PRIVATE_MODES.directory, exist_ok=True)  # the server user's alone
        except OSError:
            return False
        return True

    def entries(self) -> list[str]:
        try:
            return os.listdir(self.dir)
        except OSError:
            return []

    def spooled(self) -> list[str]:
        return sorted(e for e in self.entries() if SEGMENT_RE.match(e))

    def in_flight(self, name: str) -> bool:
        return any(e.startswith(f".{name}{PART_MARK}") for e in self.entries())

    def mark_missing(self, name: str, missing: bool = True) -> None:
        """Record that the bucket has no ``name`` (yet), so a call waiting for it stops waiting."""
        with contextlib.suppress(OSError):
            if missing:
                (self.dir / f"{name}{MISSING_MARK}").touch()
            else:
                (self.dir / f"{name}{MISSING_MARK}").unlink()

    def is_missing(self, name: str) -> bool:
        return (self.dir / f"{name}{MISSING_MARK}").exists()

    def note_wanted(self, name: str, segment_size: int) -> None:
        with contextlib.suppress(OSError):
            write_atomically(self.dir / WANTED_FILE, f"{name} {segment_size}\n".encode(), mode=None)

    def wanted(self) -> tuple[str, int] | None:
        try:
            name, size = (self.dir / WANTED_FILE).read_text().split()
            return (name, int(size)) if SEGMENT_RE.match(name) else None
        except (OSError, ValueError):
            return None

    def put(self, name: str, data: bytes) -> None:
        """Publish a downloaded object (a temporary name, then rename: a reader never sees half of one)."""
        write_atomically(self.path(name), data, mode=None, mark=PART_MARK)
        self.mark_missing(name, False)

    def prune(self, keep: set[str]) -> None:
        """Remove spooled objects (and missing marks) of segments outside ``keep``: the spool stays bounded."""
        for entry in self.entries():
            name = entry.removesuffix(MISSING_MARK)
            if SEGMENT_RE.match(name) and name not in keep:
                with contextlib.suppress(OSError):
                    self.path(entry).unlink()

    def take(self, name: str, destination: Path, identity_file: str | Path | None = None) -> int | None:
        """Hand the spooled ``name`` over to ``destination`` once verified; None when there is no good copy."""
        claimed = self.dir / f".taking-{name}-{os.urandom(4).hex()}"
        try:
            os.rename(self.path(name), claimed)  # ours alone now: the prefetcher cannot prune it midway
        except OSError:
            return None
        try:
            with open(claimed, "rb") as fh:
                stat = os.fstat(fh.fileno())
                if time.time() - stat.st_mtime > STALE_SECONDS:
                    log.warning("discarded a stale prefetched copy of %s; fetching it again", name)
                    return None
                chunks = verified_chunks(fh, stat.st_size, name, hashlib.sha256(), identity_file=identity_file)
                return restore_file(name, destination, _checked_segment(name, chunks))
        except WalCorrupt as exc:
            log.warning("discarded a damaged prefetched copy of %s (%s); fetching it again", name, exc)
            return None
        finally:
            with contextlib.suppress(OSError):
                claimed.unlink()

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _checked_segment(name: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks`` (checked against the trailer as they go), after checking the first page is segment ``name``."""
    first = True
    size = 0
    for chunk in chunks:
        if first:
            header = chunk[:_LONG_HEADER.size]
            first = False
        size += len(chunk)
        yield chunk
    if first:
        raise WalCorrupt(f"the prefetched {name} is empty")
    check_segment_header(name, header, size)  # before restore_file renames it into place


def following(name: str, segment_size: int, depth: int) -> list[str]:
    """The ``depth`` segments after ``name`` on its timeline."""
    segno, tli = segment_number(name, segment_size), timeline_of(name)
    return [segment_name(tli, segno + step, segment_size) for step in range(1, depth + 1)]


# --- the prefetcher (a forked child of the first wal-fetch) ---------------------------------------------

def _lock(spool: Spool) -> int | None:
    """The prefetcher's lock held by this process (an fd), or None when another prefetcher holds it."""
    try:
        fd = os.open(spool.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_MODES.lock_file)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def prefetcher_alive(spool: Spool) -> bool:
    fd = _lock(spool)
    if fd is None:
        return spool.dir.is_dir()
    os.close(fd)
    return False


def start_prefetcher(spool: Spool, url: str, depth: int, as_of: datetime | None = None) -> bool:
    """Fork the prefetcher unless one is running; True when this call started one."""
    fd = _lock(spool)
    if fd is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(fd)  # the child's copy keeps the lock for the prefetcher's whole life
        return True
    try:
        os.setsid()  # out of PostgreSQL's process group: stopping recovery does not signal it midway
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        if _is_pipe(2):
            os.dup2(null, 2)  # a pipe held open would keep whoever reads it (a test, a shell) waiting
        run_prefetcher(spool, url, depth, as_of=as_of)
    except BaseException:  # the child must never return into the caller's code
        pass
    finally:
        os._exit(0)
    return False  # pragma: no cover


def _is_pipe(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return True


def download(storage: Storage, spool: Spool, name: str) -> bool:
    """One object into the spool; False when it is not archived. Only its trailer is checked here (cheap)."""
    from backup_tasks.errors import ObjectMissing

    try:
        data = storage.read_bytes(object_key(name))
    except ObjectMissing:
        spool.mark_missing(name)
        return False
    if len(data) < TRAILER_SIZE:
        raise WalCorrupt(f"archived {name} is damaged: only {len(data)} bytes")
    parse_trailer(data[-TRAILER_SIZE:], f"archived {name}")
    spool.put(name, data)
    return True


def run_prefetcher(spool: Spool, url: str, depth: int, *, idle: float = IDLE_SECONDS,
                   storage: Storage | None = None, as_of: datetime | None = None) -> None:
    """Keep N+1..N+depth spooled while PostgreSQL keeps asking; stop when idle or the spool is removed."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from backup_tasks.storage.locations import open_storage

    storage = storage or open_storage(url, setting="BACKUP_DIR", as_of=as_of, read_only=True)
    in_flight: dict[str, Future[bool]] = {}
    retry_at: dict[str, float] = {}
    last: tuple[str, int] | None = None
    changed = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="wal-prefetch") as pool:
            while spool.dir.is_dir():
                wanted, now = spool.wanted(), time.monotonic()
                if wanted != last:
                    last, changed = wanted, now
                elif now - changed > idle and not in_flight:
                    break
                if wanted is not None:
                    window = following(wanted[0], wanted[1], depth)
                    spool.prune({wanted[0], *window})
                    present = set(spool.spooled())
                    for name in window:
                        if name not in present and name not in in_flight and retry_at.get(name, 0) <= now:
                            in_flight[name] = pool.submit(download, storage, spool, name)
                for name, future in list(in_flight.items()):
                    if future.done():
                        del in_flight[name]
                        try:
                            found = future.result()
                        except Exception as exc:  # the foreground fetch reports real trouble; here just retry later
                            log.warning("prefetching %s failed: %s", name, exc)
                            found = False
                        if not found:
                            retry_at[name] = time.monotonic() + MISSING_RETRY_SECONDS
                if in_flight:
                    wait(list(in_flight.values()), timeout=POLL_SECONDS * 5, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(POLL_SECONDS * 5)
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        spool.clear()


# --- the command -----------------------------------------------------------------------------------------

def fetch_with_prefetch(url: str, name: str, destination: Path, *, depth: int,
                        identity_file: str | Path | None = None, as_of: datetime | None = None,
                        spool: Spool | None = None, archive: WalArchive | None = None) -> int:
    """Restore ``name`` from the archive at ``url`` (as of ``as_of``) to ``destination``: from the spool when it
    is there (verified), else from the bucket; then keep the next ``depth`` segments coming."""
    if not SEGMENT_RE.match(name) or depth <= 0:
        return (archive or _archive(url, identity_file, as_of)).fetch(name, destination)
    spool = spool or Spool.beside(destination, url, as_of)
    size = spool.take(name, destination, identity_file)
    if size is None and _await_prefetched(spool, name, depth):
        size = spool.take(name, destination, identity_file)
    if size is None:  # only now is the bucket opened (a spooled segment never imports boto3)
        try:
            size = (archive or _archive(url, identity_file, as_of)).fetch(name, destination)
        except WalMissing:
            spool.clear()  # the end of the archived WAL: recovery is ending, the read-ahead is done
            raise
    if MIN_SEGMENT <= size <= MAX_SEGMENT and size & (size - 1) == 0 and spool.ensure():
        spool.note_wanted(name, size)
        if not prefetcher_alive(spool):
            start_prefetcher(spool, url, depth, as_of)
    return size


def _archive(url: str, identity_file: str | Path | None, as_of: datetime | None) -> WalArchive:
    from backup_tasks.wal.remote import archive_at

    return archive_at(url, identity_file=identity_file, as_of=as_of)


def _await_prefetched(spool: Spool, name: str, depth: int) -> bool:
    """Wait while the prefetcher is fetching ``name`` (or should start to soon); whether it may be spooled now."""
    wanted = spool.wanted()
    expected = wanted is not None and name in following(wanted[0], wanted[1], depth)
    if not expected and not spool.in_flight(name):
        return False
    now = time.monotonic()
    deadline, grace = now + WAIT_SECONDS, now + START_GRACE_SECONDS
    while time.monotonic() < deadline:
        if spool.path(name).exists():
            return True
        if spool.is_missing(name) or not prefetcher_alive(spool):
            return False
        if not spool.in_flight(name) and time.monotonic() > grace:
            return False
        time.sleep(POLL_SECONDS)
    return False


def clear_spools(wal_dir: Path) -> None:
    """Remove every read-ahead spool under ``wal_dir`` (restore-pitr, once recovery is over)."""
    for entry in wal_dir.glob(f"{SPOOL_PREFIX}*"):
        shutil.rmtree(entry, ignore_errors=True)
