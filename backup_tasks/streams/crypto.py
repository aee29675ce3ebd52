"""Encryption at rest in the age format (https://age-encryption.org/v1), streaming, through pyrage.

pyrage binds rage, the Rust implementation of age; its ``encrypt_io``/``decrypt_io`` stream
between file-like objects in 64 KiB authenticated chunks and release the GIL while they work.
They *pull* from a reader, whereas a dump *pushes* chunks as pg_dump produces them, so each
direction runs pyrage on a helper thread joined by a small bounded queue: memory stays flat
(a few MiB) whatever the size of the backup, and encryption overlaps compression.

* ``EncryptingWriter(inner, recipients)`` is an ``ObjectWriter``: plaintext in, age ciphertext
  out to ``inner`` (a storage writer, usually wrapped in a ``HashingWriter`` so the manifest's
  sha256 and size describe the stored ciphertext). ``commit`` finishes the age stream then
  commits ``inner``; ``abort`` stops the thread then aborts ``inner``.
* ``open_decrypted(source, identities, ...)`` is a readable binary stream of the plaintext.
  A wrong identity raises ``IdentityUnusable``; a flipped byte or a truncated object raises
  ``BackupCorrupt`` (age authenticates every chunk and marks the last one), never garbage.
* ``decrypt_bytes(data, identities, ...)`` does the same for a small file held in memory (one WAL
  file); ``is_wrong_identity`` is the one test for pyrage's "no key unwraps this file".

Only public keys (``age1...``) are needed to write backups; the identity file (``age-keygen``
output) is read only by verify, restore and wal-fetch. No secret key ever reaches a message.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from backup_tasks.errors import BackupCorrupt, BackupError, ConfigError, EncryptionFailed, IdentityUnusable

if TYPE_CHECKING:
    from backup_tasks.storage.base import ObjectWriter


FORMAT = "age"


#: The first line of every binary age file.
AGE_MAGIC = b"age-encryption.org/v1\n"


RECIPIENT_SETTING = "BACKUP_ENCRYPT_RECIPIENT"


IDENTITY_SETTING = "BACKUP_DECRYPT_IDENTITY_FILE"


#: Chunks of up to 1 MiB queue between the producer and the encryption thread: at most ~4 MiB held.
QUEUE_CHUNKS = 4


#: Decrypted chunks are 64 KiB: at most ~1 MiB held.
DECRYPT_QUEUE_CHUNKS = 16


_POLL = 0.5


def parse_recipients(raw: str, *, setting: str = RECIPIENT_SETTING) -> tuple[str, ...]:
    """``"age1..., age1..."`` -> the distinct public keys in order; ``ConfigError`` (exit 2) when one is malformed.

    A malformed value is echoed only when it is plainly a public key attempt (``age1...``,
    shortened); anything else, in particular a pasted secret key, is never repeated.
    """
    from pyrage import RecipientError, x25519

    found: list[str] = []
    items = [item.strip() for item in raw.split(",")]
    for number, item in enumerate(items, start=1):
        if not item:
            continue
        where = f"{setting} (item {number} of {len(items)})" if len(items) > 1 else setting
        if item.upper().startswith("AGE-SECRET-KEY-"):
            raise ConfigError(f"{where} holds a secret key; put the public key there instead (`age-keygen -y "
                              f"FILE` prints it) and keep the secret key away from the machines that write "
                              f"backups")
        if not item.startswith("age1"):
            raise ConfigError(f"{where} is not an age public key: it must start with 'age1' (the 'public key:' "
                              f"line of age-keygen's output)")
        try:
            recipient = x25519.Recipient.from_str(item)
        except RecipientError as exc:
            shown = item if len(item) <= 16 else f"{item[:12]}…{item[-4:]}"
            raise ConfigError(f"{where} {shown!r} is not a valid age public key ({exc}); copy it whole "
                              f"from `age-keygen -y FILE`") from None
        key = str(recipient)
        if key not in found:
            found.append(key)
    if not found:
        raise ConfigError(f"{setting} is set but names no public key; unset it or give age1... keys, comma-separated")
    return tuple(found)


def encryption_info(recipients: Sequence[str]) -> dict[str, Any] | None:
    """The manifest's ``encryption`` field: ``None`` or ``{"format": "age", "recipients": [...]}``."""
    if not recipients:
        return None
    return {"format": FORMAT, "recipients": list(recipients)}


def manifest_recipients(encryption: dict[str, Any] | None) -> tuple[str, ...]:
    """The recipients a manifest's ``encryption`` field names (empty when not encrypted)."""
    if not encryption:
        return ()
    if encryption.get("format") != FORMAT:
        raise BackupError(f"unknown encryption format {encryption.get('format')!r} in the manifest")
    return tuple(str(r) for r in encryption.get("recipients") or ())


@dataclass(frozen=True)
class Identities:
    """The secret keys of an identity file, with their public keys (the secrets never print)."""

    path: Path
    keys: tuple[Any, ...] = field(repr=False)  # pyrage.x25519.Identity
    public_keys: tuple[str, ...] = ()

    def matches(self, recipients: Sequence[str]) -> bool:
        return bool(set(self.public_keys) & set(recipients))


def load_identities(path: str | Path | None, *, setting: str = IDENTITY_SETTING, needed_for: str = "") -> Identities:
    """Read an ``age-keygen`` identity file (``#`` comments and blank lines allowed).

    Every problem is an ``IdentityUnusable`` (exit 1) naming the file and line, never the key.
    """
    from pyrage import IdentityError, x25519

    purpose = f" to decrypt {needed_for}" if needed_for else ""
    if path is None or not str(path).strip():
        raise IdentityUnusable(f"{setting} is not set; it must name the age identity file (age-keygen output) "
                               f"whose secret key is needed{purpose}")
    file = Path(str(path).strip()).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdentityUnusable(f"{setting} names {file}, which does not exist") from None
    except UnicodeDecodeError:
        raise IdentityUnusable(f"{setting} names {file}, which is not a text identity file from age-keygen") from None
    except OSError as exc:
        raise IdentityUnusable(f"{setting}: cannot read {file}: {exc.strerror or type(exc).__name__}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.upper().startswith("AGE-SECRET-KEY-1"):
            raise IdentityUnusable(f"line {number} of {file} ({setting}) is not an age identity: expected "
                                   f"AGE-SECRET-KEY-1..., a # comment or a blank line")
        try:
            keys.append(x25519.Identity.from_str(line))
        except IdentityError:
            raise IdentityUnusable(f"line {number} of {file} ({setting}) is a malformed age secret key "
                                   f"(damaged or cut short)") from None
    if not keys:
        raise IdentityUnusable(f"{file} ({setting}) holds no age secret key (no AGE-SECRET-KEY-1... line)")
    return Identities(path=file, keys=tuple(keys), public_keys=tuple(str(k.to_public()) for k in keys))


def is_wrong_identity(exc: BaseException) -> bool:
    """Whether pyrage failed because none of the identities is a recipient of the file ("No matching keys").

    The one place that knows how pyrage says it: streaming decryption, ``decrypt_bytes`` and the WAL
    archive all ask here.
    """
    import pyrage

    return isinstance(exc, pyrage.DecryptError) and "No matching keys" in str(exc)


def wrong_identity_error(identities: Identities, *, what: str, recipients: Sequence[str] = (),
                         damaged: type[BackupCorrupt] = BackupCorrupt) -> BackupError:
    """The error for "no key unwraps ``what``": ``IdentityUnusable`` (wrong identity file), unless the
    identity is one of the recipients the manifest names, in which case the age header is damaged."""
    if recipients and identities.matches(recipients):
        return damaged(f"{what}: the age header is damaged (the identity in {identities.path} is one of its "
                       f"recipients, yet no key unwraps)")
    to = f" to {', '.join(recipients)}" if recipients else ""
    return IdentityUnusable(f"{what} is encrypted{to}; none of the {len(identities.keys)} key(s) in "
                            f"{identities.path} (public: {', '.join(identities.public_keys)}) can decrypt it: "
                            f"wrong identity file")


def decrypt_bytes(data: bytes, identities: Identities, *, what: str, recipients: Sequence[str] = (),
                  damaged: type[BackupCorrupt] = BackupCorrupt) -> bytes:
    """Decrypt a small age file held in memory (one WAL file, a config file).

    A wrong identity raises ``IdentityUnusable``; anything else that fails age's authentication
    raises ``damaged`` (``BackupCorrupt``, or a subclass such as ``WalCorrupt``).
    """
    import pyrage

    try:
        return bytes(pyrage.decrypt(data, list(identities.keys)))
    except pyrage.DecryptError as exc:
        if is_wrong_identity(exc):
            raise wrong_identity_error(identities, what=what, recipients=recipients, damaged=damaged) from None
        raise damaged(f"{what} is damaged: age authentication failed ({' '.join(str(exc).split())})") from None


class _Aborted(Exception):
    """Raised inside the helper thread's reader/writer to make pyrage stop."""


class _QueueReader(io.RawIOBase):
    """What pyrage reads plaintext from: chunks handed over by the producer through a bounded queue."""

    def __init__(self, chunks: queue.Queue[bytes | None]) -> None:
        super().__init__()
        self._chunks = chunks
        self._current = memoryview(b"")
        self._eof = False
        self.aborted = threading.Event()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self._current:
            if self._eof:
                return b""
            item = self._chunks.get()
            if self.aborted.is_set():
                raise _Aborted("encryption aborted")
            if item is None:
                self._eof = True
                return b""
            self._current = memoryview(item)
        n = len(self._current) if size is None or size < 0 else min(size, len(self._current))
        out = bytes(self._current[:n])
        self._current = self._current[n:]
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _SinkWriter(io.RawIOBase):
    """What pyrage writes ciphertext to: the inner ObjectWriter; its own exception is kept to re-raise as is."""

    def __init__(self, inner: ObjectWriter) -> None:
        super().__init__()
        self.inner = inner
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            self.inner.write(bytes(data))
        except BaseException as exc:
            self.error = exc
            raise
        return len(data)


class EncryptingWriter:
    """An ObjectWriter that age-encrypts everything written to it into ``inner``."""

    def __init__(self, inner: ObjectWriter, recipients: Sequence[str]) -> None:
        import pyrage
        from pyrage import x25519

        if not recipients:
            raise ConfigError("encryption needs at least one age recipient")
        self.inner = inner
        self.recipients = tuple(recipients)
        self.plaintext_bytes = 0
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._reader = _QueueReader(self._chunks)
        self._sink = _SinkWriter(inner)
        self._error: BaseException | None = None
        self._closed = False
        keys = [x25519.Recipient.from_str(r) for r in self.recipients]

        def run() -> None:
            try:
                pyrage.encrypt_io(self._reader, self._sink, keys)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name="age-encrypt", daemon=True)
        self._thread.start()

    @property
    def bytes_written(self) -> int:
        """Ciphertext bytes handed to ``inner`` so far (what ends up stored)."""
        return int(getattr(self.inner, "bytes_written", 0))

    def _raise_failure(self) -> None:
        if self._sink.error is not None:
            raise self._sink.error  # the storage's own error (StorageFull, StorageUnavailable...)
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise EncryptionFailed(f"age encryption failed: {self._error}") from None
        raise EncryptionFailed("age encryption stopped unexpectedly")

    def _put(self, item: bytes | None) -> None:
        while True:
            try:
                self._chunks.put(item, timeout=_POLL)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_failure()

    def write(self, data: bytes) -> None:
        assert not self._closed, "writer already closed"
        if not data:
            return
        if not self._thread.is_alive():
            self.abort()
            self._raise_failure()
        try:
            self._put(bytes(data))
        except BaseException:
            self.abort()
            raise
        self.plaintext_bytes += len(data)

    def finish(self) -> None:
        """End the age stream (the last chunk is written to ``inner``) without committing ``inner``."""
        assert not self._closed, "writer already closed"
        try:
            self._put(None)
            self._thread.join()
            if self._error is not None or self._sink.error is not None:
                self._raise_failure()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def commit(self) -> None:
        self.finish()
        self.inner.commit()

    def abort(self) -> None:
        """Stop the encryption thread, then abort ``inner``; never raises."""
        if not self._closed:
            self._closed = True
            self._reader.aborted.set()
            # Unblock the thread whether it waits for data or the queue is full.
            while self._thread.is_alive():
                try:
                    self._chunks.get_nowait()
                except queue.Empty:
                    pass
                try:
                    self._chunks.put_nowait(None)
                except queue.Full:
                    pass
                self._thread.join(timeout=0.05)
        try:
            self.inner.abort()
        except Exception:
            pass

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._closed:
            self.abort()


class _SourceReader(io.RawIOBase):
    """What pyrage reads ciphertext from; the source's own exception is kept to re-raise as is."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self.source = source
        self.error: BaseException | None = None
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.source.read(size)
        except BaseException as exc:
            self.error = exc
            raise
        self.consumed += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _QueueWriter(io.RawIOBase):
    """What pyrage writes plaintext to: a bounded queue the consumer drains."""

    def __init__(self, chunks: queue.Queue[Any], stopped: threading.Event) -> None:
        super().__init__()
        self._chunks = chunks
        self._stopped = stopped

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        while True:
            if self._stopped.is_set():
                raise _Aborted("reader closed")
            try:
                self._chunks.put(chunk, timeout=_POLL)
                return len(chunk)
            except queue.Full:
                continue


_EOF = object()


@dataclass
class _Failure:
    error: BaseException


class DecryptingReader(io.RawIOBase):
    """The plaintext of an age-encrypted stream, decrypted on a helper thread as it is read."""

    def __init__(self, source: BinaryIO, identities: Identities, *, what: str,
                 recipients: Sequence[str] = ()) -> None:
        import pyrage

        super().__init__()
        self.what = what
        self.identities = identities
        self.recipients = tuple(recipients)
        self.plaintext_bytes = 0
        self._chunks: queue.Queue[Any] = queue.Queue(maxsize=DECRYPT_QUEUE_CHUNKS)
        self._stopped = threading.Event()
        self._source = _SourceReader(source)
        self._current = memoryview(b"")
        self._done = False

        def run() -> None:
            try:
                pyrage.decrypt_io(self._source, _QueueWriter(self._chunks, self._stopped), list(identities.keys))
                outcome: Any = _EOF
            except BaseException as exc:
                if self._stopped.is_set():
                    return
                outcome = _Failure(self._translate(exc))
            while not self._stopped.is_set():
                try:
                    self._chunks.put(outcome, timeout=_POLL)
                    return
                except queue.Full:
                    continue

        self._thread = threading.Thread(target=run, name="age-decrypt", daemon=True)
        self._thread.start()

    def _translate(self, exc: BaseException) -> BaseException:
        import pyrage

        if self._source.error is not None:
            return self._source.error  # a storage failure stays a storage failure
        message = str(exc)
        if is_wrong_identity(exc):
            return wrong_identity_error(self.identities, what=self.what, recipients=self.recipients)
        if isinstance(exc, pyrage.DecryptError):
            if self._source.consumed < len(AGE_MAGIC):
                return BackupCorrupt(f"{self.what} is empty or cut short before its age header ends")
            return BackupCorrupt(f"{self.what} is not a readable age-encrypted file ({message}): damaged or "
                                 f"not encrypted")
        if isinstance(exc, OSError):
            return BackupCorrupt(f"{self.what} fails age authentication after {self.plaintext_bytes} good bytes: "
                                 f"the encrypted data was altered or truncated")
        return BackupCorrupt(f"{self.what} cannot be decrypted: {type(exc).__name__}: {message}")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._current:
            if self._done:
                return 0
            item = self._chunks.get()
            if item is _EOF:
                self._done = True
                self._thread.join()
                return 0
            if isinstance(item, _Failure):
                self._done = True
                raise item.error
            self._current = memoryview(item)
        n = min(len(view), len(self._current))
        view[:n] = self._current[:n]
        self._current = self._current[n:]
        self.plaintext_bytes += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._stopped.set()
            while self._thread.is_alive():  # the thread may be blocked on a full queue
                try:
                    self._chunks.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            try:
                self._source.source.close()
            except Exception:
                pass
        super().close()


def open_decrypted(source: BinaryIO, identities: Identities, *, what: str,
                   recipients: Sequence[str] = ()) -> BinaryIO:
    """A buffered readable stream of the plaintext of ``source`` (closing it closes ``source``)."""
    raw = DecryptingReader(source, identities, what=what, recipients=recipients)
    return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[return-value]


def check_identity(source: BinaryIO, identities: Identities, *, what: str, recipients: Sequence[str] = ()) -> None:
    """Fail fast (before anything is restored) unless ``identities`` open ``source``: reads one chunk, closes."""
    with DecryptingReader(source, identities, what=what, recipients=recipients) as reader:
        reader.read(1)


@dataclass
class KeyStatus:
    """What ``backup-tasks check --json`` reports about encryption keys (public data only)."""

    encrypting: bool
    recipients: list[str]
    identity_file: str | None
    identity_public_keys: list[str]
    identity_matches_recipients: bool | None
    ok: bool
    problems: list[str]
    warnings: list[str]


def key_status(recipients: Sequence[str], identity_file: str | Path | None) -> KeyStatus:
    """Recipients were validated with the settings; here the identity file is read and matched against them.

    No identity file is fine for a worker that only writes backups (it needs only the public
    key), so its absence is a warning, not a problem; a file that is set but unusable is a problem.
    """
    problems: list[str] = []
    warnings: list[str] = []
    public: list[str] = []
    matches: bool | None = None
    if identity_file:
        try:
            identities = load_identities(identity_file)
            public = list(identities.public_keys)
            if recipients:
                matches = identities.matches(recipients)
                if not matches:
                    problems.append(f"the identity file {identities.path} holds none of the secret keys for "
                                    f"BACKUP_ENCRYPT_RECIPIENT: new backups could not be decrypted with it")
            mode = identities.path.stat().st_mode & 0o077
            if mode:
                warnings.append(f"the identity file {identities.path} is readable by group or others "
                                f"(mode {oct(identities.path.stat().st_mode & 0o777)}); chmod 600 it")
        except IdentityUnusable as exc:
            problems.append(str(exc))
    elif recipients:
        warnings.append(f"{IDENTITY_SETTING} is not set: this machine can write encrypted backups but not verify "
                        f"or restore them")
    return KeyStatus(encrypting=bool(recipients), recipients=list(recipients),
                     identity_file=str(identity_file) if identity_file else None, identity_public_keys=public,
                     identity_matches_recipients=matches, ok=not problems, problems=problems, warnings=warnings)
