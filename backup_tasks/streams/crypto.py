"""Encryption at rest in the age format (https://age-encryption.org/v1), streaming, through pyrage.

pyrage binds rage, the Rust implementation of age; its ``encrypt_io``/``decrypt_io`` stream
between file-like objects in 64 KiB authenticated chunks and release the GIL while they work.
They *pull* from a reader, whereas a dump *pushes* chunks as pg_dump produces them, so each
direction runs pyrage on a ``bridge.Bridge`` (a helper thread and a small bounded pipe): memory
stays flat (a few MiB) whatever the size of the backup, and encryption overlaps compression.
The keys (recipients, identity files, their errors and checks) live in ``keys``.

* ``EncryptingWriter(inner, recipients)`` is an ``ObjectWriter``: plaintext in, age ciphertext
  out to ``inner`` (a storage writer, usually wrapped in a ``HashingWriter`` so the manifest's
  sha256 and size describe the stored ciphertext). ``commit`` finishes the age stream then
  commits ``inner``; ``abort`` stops the thread then aborts ``inner``.
* ``open_decrypted(source, identities, ...)`` is a readable binary stream of the plaintext.
  A wrong identity raises ``IdentityUnusable``; a flipped byte or a truncated object raises
  ``BackupCorrupt`` (age authenticates every chunk and marks the last one), never garbage.
* ``decrypt_bytes(data, identities, ...)`` does the same for a small file held in memory (one WAL
  file); ``is_wrong_identity`` is the one test for pyrage's "no key unwraps this file".

The key names (``load_identities``, ``parse_recipients``...) stay importable from here.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from backup_tasks.errors import BackupCorrupt, ConfigError, EncryptionFailed
from backup_tasks.streams.bridge import Bridge, ForwardingFile, PipeClosed, PipeReader, PipeWriter
from backup_tasks.streams.keys import (
    FORMAT,
    IDENTITY_SETTING,
    RECIPIENT_SETTING,
    Identities,
    KeyStatus,
    encryption_info,
    key_status,
    load_identities,
    manifest_recipients,
    parse_recipients,
    wrong_identity_error,
)

if TYPE_CHECKING:
    from backup_tasks.storage.base import ObjectWriter

__all__ = [
    "AGE_MAGIC", "DECRYPT_QUEUE_CHUNKS", "FORMAT", "IDENTITY_SETTING", "QUEUE_CHUNKS", "RECIPIENT_SETTING",
    "DecryptingReader", "EncryptingWriter", "Identities", "KeyStatus", "check_identity", "decrypt_bytes",
    "encryption_info", "is_wrong_identity", "key_status", "load_identities", "manifest_recipients",
    "open_decrypted", "parse_recipients", "wrong_identity_error",
]


#: The first line of every binary age file.
AGE_MAGIC = b"age-encryption.org/v1\n"


#: Chunks of up to 1 MiB queue between the producer and the encryption thread: at most ~4 MiB held.
QUEUE_CHUNKS = 4


#: pyrage writes plaintext 8 KiB at a time: at most ~128 KiB held (plus the reader's 1 MiB buffer).
DECRYPT_QUEUE_CHUNKS = 16


def is_wrong_identity(exc: BaseException) -> bool:
    """Whether pyrage failed because none of the identities is a recipient of the file ("No matching keys").

    The one place that knows how pyrage says it: streaming decryption, ``decrypt_bytes`` and the WAL
    archive all ask here.
    """
    import pyrage

    return isinstance(exc, pyrage.DecryptError) and "No matching keys" in str(exc)


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
        self._closed = False
        keys = [x25519.Recipient.from_str(r) for r in self.recipients]
        self._sink = sink = ForwardingFile(write=inner.write)
        self._bridge = Bridge(lambda pipe: pyrage.encrypt_io(PipeReader(pipe), sink, keys),
                              name="age-encrypt", max_chunks=QUEUE_CHUNKS)

    @property
    def bytes_written(self) -> int:
        """Ciphertext bytes handed to ``inner`` so far (what ends up stored)."""
        return int(getattr(self.inner, "bytes_written", 0))

    def _failure(self) -> BaseException:
        """Why the encryption thread stopped (once it has)."""
        if self._sink.error is not None:
            return self._sink.error  # the storage's own error (StorageFull, StorageUnavailable...)
        error = self._bridge.error
        if error is not None and not isinstance(error, PipeClosed):
            return EncryptionFailed(f"age encryption failed: {error}")
        return EncryptionFailed("age encryption stopped unexpectedly")

    def write(self, data: bytes) -> None:
        assert not self._closed, "writer already closed"
        if not data:
            return
        try:
            self._bridge.pipe.put(bytes(data))
        except PipeClosed:
            pass  # the thread stopped: abort, then raise why (outside this block, so nothing is chained to it)
        except BaseException:
            self.abort()
            raise
        else:
            self.plaintext_bytes += len(data)
            return
        self.abort()
        raise self._failure()

    def finish(self) -> None:
        """End the age stream (the last chunk is written to ``inner``) without committing ``inner``."""
        assert not self._closed, "writer already closed"
        self._bridge.pipe.end()
        try:
            self._bridge.join()
        except BaseException:
            self.abort()
            raise
        if self._bridge.error is not None or self._sink.error is not None:
            self.abort()
            raise self._failure()
        self._closed = True

    def commit(self) -> None:
        self.finish()
        self.inner.commit()

    def abort(self) -> None:
        """Stop the encryption thread, then abort ``inner``; never raises."""
        if not self._closed:
            self._closed = True
            self._bridge.cancel()
        try:
            self.inner.abort()
        except Exception:
            pass

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._closed:
            self.abort()


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
        self._source = source
        self._ciphertext = ciphertext = ForwardingFile(read=source.read)
        keys = list(identities.keys)
        # The thread holds no reference to self: a reader dropped unclosed is collected, and closing stops it.
        self._bridge = Bridge(lambda pipe: pyrage.decrypt_io(ciphertext, PipeWriter(pipe), keys),
                              name="age-decrypt", max_chunks=DECRYPT_QUEUE_CHUNKS)
        self._plaintext = PipeReader(self._bridge.pipe)

    def _translate(self, exc: BaseException) -> BaseException:
        import pyrage

        if self._ciphertext.error is not None:
            return self._ciphertext.error  # a storage failure stays a storage failure
        message = str(exc)
        if is_wrong_identity(exc):
            return wrong_identity_error(self.identities, what=self.what, recipients=self.recipients)
        if isinstance(exc, pyrage.DecryptError):
            if self._ciphertext.count < len(AGE_MAGIC):
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
        try:
            n = self._plaintext.readinto(buffer)
        except BaseException as exc:
            if exc is not self._bridge.error:
                raise  # the caller's own interruption (Ctrl-C, a time limit)
            failure = self._translate(exc)
        else:
            if n == 0:
                self._bridge.join()  # the end: the thread has ended the pipe and is returning
            self.plaintext_bytes += n
            return n
        raise failure  # outside the except block: a storage error is raised as it came, nothing chained

    def close(self) -> None:
        if not self.closed:
            self._bridge.cancel()
            try:
                self._source.close()
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
