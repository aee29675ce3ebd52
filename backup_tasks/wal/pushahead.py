"""wal-push into BACKUP_COPY_TO at archive speed: push-ahead, and copy markers that later calls trust.

PostgreSQL runs one wal-push per segment, in order, and waits for each. With a copy in a bucket one
call costs a Python start, the boto3 import and a fresh client (~0.3 s on loopback, 3 segments/s):
a busy server falls behind. So the call that has to open the copy anyway (the one for segment N)
also stores the files already marked ``.ready`` in ``pg_wal/archive_status/`` (the directory of
``%p``), with one client and a few threads, and records for each that it is stored everywhere. The
calls for those files then find the record and return at once, never importing boto3 (as
pgBackRest's asynchronous archive-push).

The record is a *copy marker*, ``<archive>/.copied/<name>``: written (atomically: temporary file,
rename) only after the copy's put returned, and it describes the exact local object that was put:
its trailer (sha256 and size of the original), inode, size and mtime, and the copy location. A later
call acknowledges from it only if all of that still matches the archived object and the file it is
handed now hashes to the trailer's sha256 (the same check as a repeated push); a different file is a
``WalConflict``, never a silent success. A missing, damaged or stale marker (crash, other copy
location, archived object replaced, older than a day) only means the slow path: store here and in
the copy as before. A marker is removed when its file is acknowledged, so ``.copied`` holds only
what is ahead.

The copy never holds the server: every put into it is given ``copy_within`` seconds (wal-push's
``--copy-timeout``). The file asked for that the copy did not take in time is queued for it
(``wal.backlog``) and acknowledged all the same; a file ahead that it did not take gets no marker,
and pushing ahead stops there. While anything is queued, or the copy failed less than
``backlog.RETRY_SECONDS`` ago, calls do not try the copy for their own file: they store it here
and queue it behind the rest, so the copy receives the backlog in WAL order and a copy that hangs
costs one bound, not one per file. Once that failure is old enough (or the copy answers), a call
ships the backlog for up to ``DRAIN_SECONDS`` (``wal.ship``) before it returns. The bulk is
shipped by the worker's beat task and ``backup-tasks wal-ship``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from backup_tasks.errors import StorageError, WalArchiveError, WalConflict
from backup_tasks.storage.files import TEMP_MARK, is_temporary, make_dirs, write_atomically
from backup_tasks.wal.archive import PushResult, WalArchive
from backup_tasks.wal.backlog import COPY_TIMEOUT, Backlog
from backup_tasks.wal.layout import DIR_MODE, FILE_MODE, object_key
from backup_tasks.wal.names import kind_of
from backup_tasks.wal.objects import DEFAULT_LEVEL, TRAILER_SIZE, file_sha256, parse_trailer

if TYPE_CHECKING:
    from concurrent.futures import Future

log = logging.getLogger(__name__)

MARKER_DIR = ".copied"
MARKER_VERSION = 1
#: At most this many ``.ready`` files are stored ahead by one call (memory: one object per thread).
MAX_AHEAD = 48
#: Threads storing (compressing locally, putting into the copy) in parallel: the copy's round trips overlap.
THREADS = 4
#: No new file is started ahead after this long: the call for N must not keep PostgreSQL waiting much.
AHEAD_SECONDS = 30.0
#: Behind a backlog, a call ships it for this long at most (new puts; each put still gets ``copy_within``).
DRAIN_SECONDS = 2.0
#: A marker older than this proves nothing (its file takes the slow path) and is swept: it waits only for
#: its file's own call, seconds or minutes later; a day bounds what WAL expiry or a hand could do meanwhile.
STALE_MARKER_SECONDS = 86400.0
#: The detached pusher's lock (holding its pid) and its claims, ``.claim.<name>``, in the marker directory.
PUSHER_LOCK = ".pusher.lock"
CLAIM_PREFIX = ".claim."
#: How often a call waiting on a claimed file looks for its marker (and the pusher for new ``.ready`` files).
CLAIM_POLL_SECONDS = 0.005
#: The detached pusher ends once no new ``.ready`` file came for this long (the next call starts another).
IDLE_SECONDS = 1.0


def push(archive: WalArchive, source: Path, *, level: int = DEFAULT_LEVEL,
         copy_within: float = COPY_TIMEOUT, detach: bool = False) -> PushResult:
    """``wal-push``: ``source`` stored in the archive and (within ``copy_within`` seconds, else queued) its copy,
    then its following ``.ready`` files ahead; behind a backlog, queued behind it.

    Push-ahead needs the archive in a local directory (its markers live there) and a copy to skip.
    ``detach`` (the console script, a process of its own): the files ahead are stored by a pusher
    process forked once ``source`` is acknowledged, so the server's next calls overlap with that
    work instead of waiting for all of it in this call; a call whose file that pusher has claimed
    waits for its marker.
    """
    if archive.copy is None or archive.root is None:
        return archive.push(source, level=level, copy_within=copy_within)
    acknowledged = acknowledge_from_marker(archive, source)
    if acknowledged is not None:
        return acknowledged
    if detach:
        acknowledged = await_claimed(archive, source)
        if acknowledged is not None:
            return acknowledged
    backlog = Backlog(archive.root)
    if backlog.pending() or not backlog.retry_due():  # the copy lacks files, or just failed: not waited on
        return push_behind_backlog(archive, backlog, source, level=level, copy_within=copy_within)
    return push_with_ahead(archive, source, level=level, copy_within=copy_within, detach=detach)


def push_behind_backlog(archive: WalArchive, backlog: Backlog, source: Path, *, level: int,
                        copy_within: float) -> PushResult:
    """The copy lacks earlier files (or failed just now): ``source`` stored here and queued after them, then the
    backlog shipped a little once the copy may answer again.

    Never a put of ``source`` ahead of the files queued before it. A local archive that refuses it
    sends it to the copy alone (``WalArchive.push``), the one case where order yields to keeping it.
    """
    assert archive.copy is not None
    try:
        result = archive.push(source, level=level, copy=False)
    except WalConflict:
        raise
    except StorageError:
        return archive.push(source, level=level, copy_within=copy_within)
    try:
        backlog.add(source.name, reason="queued behind earlier files the copy lacks", copy=archive.copy.location)
    except OSError as exc:
        raise WalArchiveError(f"{source.name} is archived in {archive.location} but could not be queued for the "
                              f"copy {archive.copy.location}: {exc.strerror or exc}") from None
    if backlog.retry_due():
        from backup_tasks.wal.ship import ship

        try:
            ship(archive, put_timeout=copy_within, until=time.monotonic() + DRAIN_SECONDS)
        except Exception as exc:  # the file is stored and queued: shipping is never this call's failure
            log.warning("backup-tasks wal-push: shipping the copy's backlog failed (the worker retries): %s", exc)
    return replace(result, copy="queued" if backlog.holds(source.name) else "stored")


def copy_url(archive: WalArchive) -> str:
    """The copy location a marker vouches for (a marker for another BACKUP_COPY_TO proves nothing)."""
    assert archive.copy is not None
    return archive.copy.location


def marker_dir(archive: WalArchive) -> Path:
    assert archive.root is not None
    return archive.root / MARKER_DIR


def marker_path(archive: WalArchive, name: str) -> Path:
    return marker_dir(archive) / name


def acknowledge_from_marker(archive: WalArchive, source: Path) -> PushResult | None:
    """The result for ``source`` if a marker proves it stored in both places, else None (the slow path).

    Raises ``WalConflict`` when the archived object (vouched for by the marker) holds other content
    than ``source``: the server hands over a different file under the same name.
    """
    name = source.name
    kind_of(name)
    recorded = _read_marker(marker_path(archive, name))
    if recorded is None or recorded.get("copy") != copy_url(archive):
        return None
    written_at = recorded.get("written_at")
    if not isinstance(written_at, (int, float)) or abs(time.time() - written_at) > STALE_MARKER_SECONDS:
        return None
    final = archive.path_for(name)
    try:
        with open(final, "rb") as fh:
            stat = os.fstat(fh.fileno())
            if stat.st_size < TRAILER_SIZE:
                return None
            fh.seek(stat.st_size - TRAILER_SIZE)
            trailer_raw = fh.read(TRAILER_SIZE)
    except OSError:
        return None
    if [stat.st_ino, stat.st_size, stat.st_mtime_ns] != recorded.get("object") or \
            trailer_raw.hex() != recorded.get("trailer"):
        return None  # the archived object is not the one that was put into the copy: prove nothing
    trailer = parse_trailer(trailer_raw, f"archived {name}")
    try:
        digest, size = file_sha256(source)
    except OSError:
        return None  # the slow path says clearly what is wrong with the file

    if digest != trailer.sha256 or size != trailer.size:
        # Checks again and raises WalConflict, explained as for any repeated push with other content.
        return archive.already_archived(source)
    _remove_marker(archive, name)  # acknowledged: the marker has done its job
    return PushResult(name, object_key(name), "already-archived", size, stat.st_size, copy="stored")


def ready_after(source: Path) -> list[Path]:
    """The other files the server has marked ``.ready`` next to ``source``, in the order it archives them.

    History files first, then by name (as PostgreSQL's archiver); at most ``MAX_AHEAD``.
    """
    status_dir = source.parent / "archive_status"
    try:
        entries = os.listdir(status_dir)
    except OSError:
        return []
    names = []
    for entry in entries:
        if not entry.endswith(".ready"):
            continue
        name = entry[:-len(".ready")]
        if name == source.name:
            continue
        try:
            kind = kind_of(name)
        except Exception:
            continue
        names.append((kind != "history", name))
    return [source.parent / name for _, name in sorted(names)[:MAX_AHEAD]]


def push_with_ahead(archive: WalArchive, source: Path, *, level: int = DEFAULT_LEVEL,
                    copy_within: float = COPY_TIMEOUT, detach: bool = False) -> PushResult:
    """Store ``source`` everywhere (its result, or its error, is the call's), then its ``ready_after`` with markers.

    The files ahead are stored in this call, or with ``detach`` by a forked pusher after it returns
    (``_fork_pusher``). Nothing goes ahead when ``source`` was queued for the copy instead.
    """
    result = archive.push(source, level=level, copy_within=copy_within)
    _remove_marker(archive, source.name)  # a stale one (it proved nothing): acknowledged the slow way now
    if result.copy != "stored" or not ready_after(source):
        return result
    if not (detach and _fork_pusher(archive, source, level, copy_within)):
        _push_ahead(archive, source, level, copy_within, claims=False)
    return result


def pusher_lock_path(archive: WalArchive) -> Path:
    return marker_dir(archive) / PUSHER_LOCK


def claim_path(archive: WalArchive, name: str) -> Path:
    return marker_dir(archive) / f"{CLAIM_PREFIX}{name}"


def pusher_pid(archive: WalArchive) -> int | None:
    """The pid of the detached pusher now running for this archive, if one is (its lock is held)."""
    import fcntl

    try:
        fd = os.open(pusher_lock_path(archive), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except ValueError:
                return None
        return None
    finally:
        os.close(fd)


def await_claimed(archive: WalArchive, source: Path) -> PushResult | None:
    """The result for ``source`` once the running pusher has stored it (its marker), else None (the slow path).

    Waits only while the file is claimed by a live pusher: never for a file it will not store.
    """
    claim = claim_path(archive, source.name)
    if not claim.exists():
        return None
    until = time.monotonic() + AHEAD_SECONDS
    next_liveness = 0.0
    while claim.exists() and time.monotonic() < until:
        if time.monotonic() >= next_liveness:
            if pusher_pid(archive) is None:
                break  # killed mid-file: its claim is a leftover, and proves nothing
            next_liveness = time.monotonic() + 0.1
        time.sleep(CLAIM_POLL_SECONDS)
    return acknowledge_from_marker(archive, source)


def _fork_pusher(archive: WalArchive, source: Path, level: int, copy_within: float) -> bool:
    """Start the detached pusher for the files after ``source``; False when it cannot run here (do it inline).

    One pusher per archive at a time (a lock it holds). The fork keeps this process's imports and its
    copy client, so the pusher starts at no cost; it runs in a session of its own with no terminal
    and the null device as stdio, so neither the archiver nor anything reading this call's output
    waits for it. Only a process with one thread may fork (a put abandoned in its thread stays here).
    """
    import threading

    if threading.active_count() > 1 or not hasattr(os, "fork"):
        return False
    if pusher_pid(archive) is not None:
        return True  # the running pusher picks up the new ``.ready`` files itself
    try:
        make_dirs(marker_dir(archive), DIR_MODE, inside=archive.root)
    except OSError:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return True
    code = 0
    try:  # the child: never returns into the caller
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _run_pusher(archive, source, level, copy_within)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _run_pusher(archive: WalArchive, source: Path, level: int, copy_within: float) -> None:
    """The detached pusher: under the archive's pusher lock, the ``.ready`` files after ``source`` until idle."""
    import fcntl

    fd = os.open(pusher_lock_path(archive), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another pusher runs: it does the same work
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    for entry in os.listdir(marker_dir(archive)):  # claims of a pusher killed mid-way: nobody stores them now
        if entry.startswith(CLAIM_PREFIX):
            _remove(marker_dir(archive) / entry)
    _push_ahead(archive, source, level, copy_within, claims=True)
    os.ftruncate(fd, 0)  # the pid of a pusher that ended must not be signalled later


def _push_ahead(archive: WalArchive, source: Path, level: int, copy_within: float, *, claims: bool) -> None:
    """Store the ``.ready`` files after ``source`` with markers, ``THREADS`` at a time, in the server's order.

    A failure ahead is silent: no marker, so that file's own call takes the slow path and reports it;
    a failing copy stops everything (the rest would fail the same way). With ``claims`` (the detached
    pusher) each file is claimed while it is in hand, so its own call waits for it rather than storing
    it a second time, and ``.ready`` files the server completes meanwhile are taken up until none
    came for ``IDLE_SECONDS``; without, the files found by the scans before the work runs out.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    deadline = time.monotonic() + AHEAD_SECONDS
    pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="wal-push")
    submitted: set[str] = set()
    pending: dict[Future[None], str] = {}
    idle_since = time.monotonic()
    ok = True
    try:
        while ok:
            if time.monotonic() < deadline:
                for path in ready_after(source):
                    if len(pending) >= MAX_AHEAD:
                        break
                    if path.name in submitted or marker_path(archive, path.name).exists():
                        continue
                    submitted.add(path.name)
                    if claims:
                        _claim(archive, path.name)
                    pending[pool.submit(_store_ahead, archive, path, level, deadline, copy_within)] = path.name
            if not pending:
                if not claims or time.monotonic() - idle_since > IDLE_SECONDS or time.monotonic() >= deadline:
                    break
                time.sleep(CLAIM_POLL_SECONDS * 4)
                continue
            done, _running = wait(pending, timeout=CLAIM_POLL_SECONDS * 4 if claims else None,
                                  return_when=FIRST_COMPLETED)
            for future in done:
                name = pending.pop(future)
                if claims:
                    _remove(claim_path(archive, name))
                try:
                    future.result()
                except StorageError as exc:  # the copy failed (or went down since): the rest would too
                    log.debug("pushing ahead stopped: %s", exc)
                    ok = False
                except Exception as exc:  # its own call retries it and reports what is wrong
                    log.debug("pushing ahead failed: %s", exc)
            idle_since = time.monotonic()
    finally:
        # When the copy failed, the files not started would fail the same way: do not make the server wait
        # for them. What already runs is abandoned (a file ahead gets no marker unless its put succeeded;
        # one killed half-way by the process ending leaves a partial file prune clears, and its own call
        # stores it).
        pool.shutdown(wait=ok, cancel_futures=not ok)
        if claims:
            for name in pending.values():
                _remove(claim_path(archive, name))
    if submitted:
        _sweep_markers(archive)


def _claim(archive: WalArchive, name: str) -> None:
    try:
        os.close(os.open(claim_path(archive, name), os.O_WRONLY | os.O_CREAT, FILE_MODE))
    except OSError:
        pass  # unclaimed, its own call stores it too: the same object, create-only


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _store_ahead(archive: WalArchive, source: Path, level: int, deadline: float, copy_within: float) -> None:
    if time.monotonic() > deadline or not source.is_file():
        return
    name = source.name
    archive.push(source, level=level, copy=False)
    final = archive.path_for(name)
    with open(final, "rb") as fh:  # the object, and the stat describing it, from one open file
        stat = os.fstat(fh.fileno())
        data = fh.read()
    if len(data) != stat.st_size or len(data) < TRAILER_SIZE:
        return  # changed under us (never, for an archived object): no marker
    try:
        archive.copy_object(name, data, within=copy_within)
    except WalConflict:
        raise
    except StorageError as exc:  # the copy is down or slow: the calls that follow queue without waiting on it
        assert archive.root is not None
        Backlog(archive.root).note_failure(str(exc))
        raise
    # Only now, with the put acknowledged by the copy, may anything claim it is there.
    _write_marker(archive, name, {"v": MARKER_VERSION, "copy": copy_url(archive), "written_at": time.time(),
                                  "trailer": data[-TRAILER_SIZE:].hex(),
                                  "object": [stat.st_ino, stat.st_size, stat.st_mtime_ns]})


def _write_marker(archive: WalArchive, name: str, content: dict[str, object]) -> None:
    """Atomically: a crash leaves no marker or a whole one, never half of one.

    Not fsynced: a marker lost in a crash only sends its file down the slow path again.
    """
    directory = marker_dir(archive)
    make_dirs(directory, DIR_MODE, inside=archive.root)
    write_atomically(directory / name, json.dumps(content).encode(), mode=FILE_MODE)


def _remove_marker(archive: WalArchive, name: str) -> None:
    _remove(marker_path(archive, name))


def _read_marker(path: Path) -> dict[str, object] | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        content = json.loads(raw)
    except ValueError:
        return None  # damaged (a crash before its data reached the disk): as if absent
    if not isinstance(content, dict) or content.get("v") != MARKER_VERSION:
        return None
    return content


def _sweep_markers(archive: WalArchive) -> None:
    """Remove markers nobody asked for in a day (a timeline switch, a server gone) and stray temporaries.

    The pusher's lock stays: a lock file removed under its holder would let a second pusher in.
    """
    directory = marker_dir(archive)
    now = time.time()
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if entry == PUSHER_LOCK:
            continue
        path = directory / entry
        try:
            age = now - path.stat().st_mtime
            if age > STALE_MARKER_SECONDS or (is_temporary(entry, TEMP_MARK) and age > 3600):
                path.unlink()
        except OSError:
            continue
