"""The one thread-and-pipe bridge: bounded memory, errors in both directions, stops, and no thread left behind.

The first half drives ``Pipe`` and ``Bridge`` directly; the second checks that the age streams built
on them (``EncryptingWriter``, ``open_decrypted``) end their thread on every way out: success,
a storage failure, damage, a wrong key, an abort, an early close, a reader dropped unclosed.
"""

from __future__ import annotations

import gc
import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_tasks.errors import BackupCorrupt, EncryptionFailed, IdentityUnusable, StorageError, StorageFull
from backup_tasks.storage.local import LocalStorage
from backup_tasks.streams.bridge import Bridge, ForwardingFile, Pipe, PipeClosed, PipeReader, PipeWriter
from backup_tasks.streams.crypto import EncryptingWriter, check_identity, open_decrypted
from backup_tasks.streams.keys import Identities, load_identities
from tests.support.crypto import write_identity_file
from tests.support.data import random_chunks

MIB = 1 << 20
AGE_THREADS = ("age-encrypt", "age-decrypt", "test-bridge")


def bridge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in AGE_THREADS]


@pytest.fixture(autouse=True)
def no_thread_outlives_a_test() -> Iterator[None]:
    assert bridge_threads() == []
    yield
    gc.collect()  # a reader dropped unclosed is closed by the collector
    deadline = time.monotonic() + 5
    while bridge_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bridge_threads() == []


def wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- the pipe and the bridge -------------------------------------------------------------------------

def test_a_pipe_holds_at_most_max_chunks_and_a_get_frees_a_place() -> None:
    pipe = Pipe(max_chunks=2)
    pipe.put(b"a")
    pipe.put(b"b")
    third = threading.Thread(target=pipe.put, args=(b"c",), name="test-bridge")
    third.start()
    time.sleep(0.1)
    assert third.is_alive()  # blocked: the pipe is full
    assert pipe.get() == b"a"
    third.join(timeout=5)
    assert not third.is_alive()
    pipe.end()
    assert [pipe.get(), pipe.get(), pipe.get(), pipe.get()] == [b"b", b"c", b"", b""]


def test_the_error_a_pipe_ends_with_comes_after_the_chunks_before_it() -> None:
    pipe = Pipe(max_chunks=4)
    pipe.put(b"good")
    failure = ValueError("damaged")
    pipe.end(failure)
    pipe.end()  # only the first end counts
    assert pipe.get() == b"good"
    with pytest.raises(ValueError) as raised:
        pipe.get()
    assert raised.value is failure
    with pytest.raises(PipeClosed):
        pipe.put(b"late")


def test_cancel_wakes_both_ends_and_drops_what_is_queued() -> None:
    full, empty = Pipe(max_chunks=1), Pipe(max_chunks=1)
    full.put(b"x")
    outcomes: dict[str, BaseException] = {}

    def attempt(name: str, call: object) -> None:
        try:
            call()  # type: ignore[operator]
        except BaseException as exc:
            outcomes[name] = exc

    waiting = [threading.Thread(target=attempt, args=("put", lambda: full.put(b"y")), name="test-bridge"),
               threading.Thread(target=attempt, args=("get", empty.get), name="test-bridge")]
    for thread in waiting:
        thread.start()
    time.sleep(0.1)
    full.cancel()
    empty.cancel()
    for thread in waiting:
        thread.join(timeout=5)
    assert isinstance(outcomes["put"], PipeClosed) and isinstance(outcomes["get"], PipeClosed)
    with pytest.raises(PipeClosed):
        full.get()  # b"x" was dropped


def test_a_bridge_pulls_what_the_caller_pushes() -> None:
    def work(pipe: Pipe) -> None:
        reader = PipeReader(pipe)
        received.append(reader.read(3) + reader.read())

    received: list[bytes] = []
    bridge = Bridge(work, name="test-bridge", max_chunks=2)
    for chunk in (b"ab", b"cd", b"ef"):
        bridge.pipe.put(chunk)
    bridge.pipe.end()
    bridge.join()
    assert received == [b"abcdef"] and bridge.error is None and not bridge.running


def test_a_bridge_pushes_what_the_caller_pulls() -> None:
    def work(pipe: Pipe) -> None:
        writer = PipeWriter(pipe)
        for chunk in (b"12", b"345", b"6"):
            writer.write(chunk)

    bridge = Bridge(work, name="test-bridge", max_chunks=1)
    with io.BufferedReader(PipeReader(bridge.pipe), buffer_size=4) as plain:
        assert plain.read() == b"123456"
    bridge.join()


def test_the_helpers_error_stops_a_caller_blocked_on_a_full_pipe() -> None:
    started = threading.Event()

    def work(pipe: Pipe) -> None:
        PipeReader(pipe).read(1)
        started.set()
        raise RuntimeError("the library gave up")

    bridge = Bridge(work, name="test-bridge", max_chunks=1)
    with pytest.raises(PipeClosed):
        for _ in range(100):
            bridge.pipe.put(b"x")
    bridge.join()
    assert started.is_set() and isinstance(bridge.error, RuntimeError)


def test_cancel_stops_a_helper_blocked_on_the_pipe_either_way() -> None:
    def pulls(pipe: Pipe) -> None:
        PipeReader(pipe).read()

    def pushes(pipe: Pipe) -> None:
        while True:
            pipe.put(b"x" * 1000)

    for work in (pulls, pushes):
        bridge = Bridge(work, name="test-bridge", max_chunks=2)
        time.sleep(0.05)
        bridge.cancel()
        assert not bridge.running and isinstance(bridge.error, PipeClosed)


def test_a_signal_interrupts_a_caller_waiting_on_the_pipe() -> None:
    """Ctrl-C and Celery's soft time limit arrive as signals: a full pipe must not make them wait."""
    release = threading.Event()
    bridge = Bridge(lambda pipe: release.wait(), name="test-bridge", max_chunks=1)

    def interrupt(*_: object) -> None:
        raise TimeoutError("soft time limit")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            while True:
                bridge.pipe.put(b"x")
        assert time.monotonic() - started < 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        bridge.cancel()


def test_a_forwarding_file_keeps_the_real_files_error() -> None:
    failure = StorageFull("disk full")

    def refuse(_: bytes) -> None:
        raise failure

    sink = ForwardingFile(write=refuse)
    with pytest.raises(StorageFull):
        sink.write(b"x")
    assert sink.error is failure and sink.count == 0
    source = ForwardingFile(read=io.BytesIO(b"abc").read)
    assert source.read(2) == b"ab" and source.read() == b"c" and source.count == 3 and source.error is None


# --- the age streams end their thread on every way out -------------------------------------------------

class FailingWriter:
    """An ObjectWriter whose storage fails after ``limit`` bytes, as a filling disk does."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.written = 0
        self.aborted = False
        self.failure: StorageFull | None = None

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.limit:
            try:
                raise OSError(28, "No space left on device")
            except OSError as exc:
                self.failure = StorageFull("no space left on the backup disk")
                raise self.failure from exc
        self.written += len(data)

    def commit(self) -> None:
        raise AssertionError("a failed stream is never committed")

    def abort(self) -> None:
        self.aborted = True


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Identities, str]:
    public = write_identity_file(tmp_path / "k.key")
    return load_identities(tmp_path / "k.key"), public


@pytest.mark.parametrize("limit", [0, 3 * MIB], ids=["first write", "midway"])
def test_a_storage_failure_is_raised_as_itself_and_ends_the_thread(keys: tuple[Identities, str], limit: int) -> None:
    _, public = keys
    inner = FailingWriter(limit)
    writer = EncryptingWriter(inner, [public])  # type: ignore[arg-type]
    with pytest.raises(StorageFull) as raised:
        for chunk in random_chunks(64 * MIB):
            writer.write(chunk)
        writer.commit()
    assert raised.value is inner.failure and isinstance(raised.value.__cause__, OSError)  # its cause kept
    assert inner.aborted and bridge_threads() == []
    writer.abort()  # idempotent


def test_a_failure_on_the_last_chunk_is_raised_by_commit(keys: tuple[Identities, str]) -> None:
    _, public = keys
    inner = FailingWriter(MIB)  # what is written before the end fits; the age stream's last chunk does not
    writer = EncryptingWriter(inner, [public])  # type: ignore[arg-type]
    writer.write(b"x" * (MIB - 100))
    with pytest.raises(StorageFull):
        writer.commit()
    assert inner.aborted and bridge_threads() == []


def test_a_failure_of_the_age_library_is_encryption_failed(keys: tuple[Identities, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def unusable(self: ForwardingFile, data: object) -> int:
        raise TypeError("not a sink pyrage can use")  # not the storage's error: pyrage's own failure

    monkeypatch.setattr(ForwardingFile, "write", unusable)
    _, public = keys
    inner = FailingWriter(10 * MIB)
    writer = EncryptingWriter(inner, [public])  # type: ignore[arg-type]
    with pytest.raises(EncryptionFailed, match="age encryption failed"):
        for chunk in random_chunks(8 * MIB):
            writer.write(chunk)
        writer.commit()
    assert inner.aborted and bridge_threads() == []


def test_abort_while_the_thread_waits_for_data_or_the_storage(tmp_path: Path, keys: tuple[Identities, str]) -> None:
    _, public = keys
    storage = LocalStorage(tmp_path / "b")
    idle = EncryptingWriter(storage.writer("idle"), [public])  # the thread waits for the first chunk
    wait_until(lambda: bridge_threads() != [])
    idle.abort()
    assert bridge_threads() == []

    class SlowWriter(FailingWriter):
        def write(self, data: bytes) -> None:
            time.sleep(0.2)
            super().write(data)

    slow = SlowWriter(1 << 40)
    busy = EncryptingWriter(slow, [public])  # type: ignore[arg-type]
    for chunk in random_chunks(4 * MIB):  # fills the pipe while the thread sits in the storage
        busy.write(chunk)
    busy.abort()
    assert slow.aborted and bridge_threads() == [] and storage.list() == []


@pytest.fixture
def stored(tmp_path: Path, keys: tuple[Identities, str]) -> tuple[LocalStorage, bytes]:
    _, public = keys
    storage = LocalStorage(tmp_path / "b")
    data = b"".join(random_chunks(4 * MIB))
    with EncryptingWriter(storage.writer("x"), [public]) as writer:
        writer.write(data)
        writer.commit()
    assert bridge_threads() == []
    return storage, data


def test_reading_to_the_end_ends_the_thread(stored: tuple[LocalStorage, bytes], keys: tuple[Identities, str]) -> None:
    storage, data = stored
    plain = open_decrypted(storage.open("x"), keys[0], what="x")
    assert plain.read() == data
    assert bridge_threads() == []  # before close: the end of the stream joined it
    plain.close()


def test_damage_and_a_wrong_key_end_the_thread(tmp_path: Path, stored: tuple[LocalStorage, bytes],
                                               keys: tuple[Identities, str]) -> None:
    storage, data = stored
    write_identity_file(tmp_path / "wrong.key")
    with pytest.raises(IdentityUnusable):
        check_identity(storage.open("x"), load_identities(tmp_path / "wrong.key"), what="x")
    assert bridge_threads() == []
    damaged = bytearray((storage.root / "x").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (storage.root / "x").write_bytes(bytes(damaged))
    with pytest.raises(BackupCorrupt, match="good bytes") as raised, \
            open_decrypted(storage.open("x"), keys[0], what="x") as plain:
        while plain.read(MIB):
            pass
    good = int(str(raised.value).split(" after ")[1].split()[0])
    assert 0 < good < len(data) and good % (64 << 10) == 0  # exactly the authenticated chunks before the flip


def test_a_source_failure_is_raised_as_itself(stored: tuple[LocalStorage, bytes], keys: tuple[Identities, str]) -> None:
    storage, _ = stored

    class BrokenSource(io.RawIOBase):
        def __init__(self) -> None:
            super().__init__()
            self.inner = storage.open("x")
            self.failure = StorageError("reading x failed: connection reset")

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            if self.inner.tell() > MIB:
                raise self.failure
            return self.inner.read(size)

    source = BrokenSource()
    with pytest.raises(StorageError) as raised, open_decrypted(source, keys[0], what="x") as plain:  # type: ignore[arg-type]
        plain.read()
    assert raised.value is source.failure and source.closed


def test_closing_early_or_dropping_the_reader_ends_the_thread(stored: tuple[LocalStorage, bytes],
                                                             keys: tuple[Identities, str]) -> None:
    storage, data = stored
    with open_decrypted(storage.open("x"), keys[0], what="x") as plain:
        assert plain.read(10) == data[:10]  # the thread is now blocked on the full pipe
    assert bridge_threads() == []
    dropped = open_decrypted(storage.open("x"), keys[0], what="x")
    assert dropped.read(10) == data[:10]
    del dropped  # never closed: the collector closes it, which stops the thread (checked by the fixture)
