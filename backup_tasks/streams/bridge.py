"""One helper thread and one bounded pipe between code that pushes bytes and code that pulls them.

Some libraries (pyrage's ``encrypt_io``/``decrypt_io``) only work on whole file objects: they
*pull* from a reader and *push* into a writer until the stream ends, while a backup pipeline
pushes chunks as a tool produces them, or pulls them as a restore consumes them. A ``Bridge``
runs such a library call on a helper thread; the calling thread and the helper meet at a
``Pipe``, a queue of at most ``max_chunks`` chunks, so memory stays flat whatever the size of
the stream. Either side may be the writing end:

* encrypting: the caller ``put``s, the helper reads through ``PipeReader``;
* decrypting: the helper writes through ``PipeWriter``, the caller reads through ``PipeReader``.

Errors and stops cross in both directions:

* the helper's exception ends the pipe (``Bridge.error``): the caller's next ``put`` raises
  ``PipeClosed``, its next ``get`` raises that exception once the chunks before it are read;
* the caller's ``Bridge.cancel`` drops what is queued and makes the helper's next ``put``/``get``
  raise ``PipeClosed`` (the library gives up), then waits for the thread: none outlives its bridge;
* ``ForwardingFile`` keeps the exception of the real source or sink the helper uses, which the
  library replaces with its own, so a storage error reaches the caller as itself.

Waits are on a condition, not a poll: a chunk, an end or a cancel wakes the other side at once,
and a signal (Ctrl-C, Celery's soft time limit) still interrupts the calling thread.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class PipeClosed(Exception):
    """The other end is gone: the pipe was cancelled, or the helper stopped before the end of the stream."""


class Pipe:
    """A bounded queue of byte chunks between two threads, ended by its writing side or cancelled by either."""

    def __init__(self, max_chunks: int) -> None:
        self.max_chunks = max_chunks
        self._chunks: deque[bytes] = deque()
        self._ready = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None
        self._cancelled = False

    def put(self, chunk: bytes) -> None:
        """Queue ``chunk``, waiting while the pipe is full; ``PipeClosed`` once it has ended or been cancelled."""
        with self._ready:
            while len(self._chunks) >= self.max_chunks and not (self._ended or self._cancelled):
                self._ready.wait()
            if self._ended or self._cancelled:
                raise PipeClosed("the reading side of the pipe is gone")
            self._chunks.append(chunk)
            self._ready.notify_all()

    def get(self) -> bytes:
        """The next chunk, waiting for one; ``b""`` at the end, or the exception the pipe was ended with."""
        with self._ready:
            while not self._chunks and not (self._ended or self._cancelled):
                self._ready.wait()
            if self._cancelled:
                raise PipeClosed("the pipe was cancelled")
            if self._chunks:
                chunk = self._chunks.popleft()
                self._ready.notify_all()
                return chunk
            if self._error is not None:
                raise self._error
            return b""

    def end(self, error: BaseException | None = None) -> None:
        """No more chunks: the reader gets those queued, then ``b""`` (or ``error``). Only the first call counts."""
        with self._ready:
            if not self._ended:
                self._ended, self._error = True, error
                self._ready.notify_all()

    def cancel(self) -> None:
        """Drop the queued chunks and make every later ``put`` and ``get`` raise ``PipeClosed``."""
        with self._ready:
            self._cancelled = True
            self._chunks.clear()
            self._ready.notify_all()


class PipeReader(io.RawIOBase):
    """A pipe's reading end as a binary file (chunks are sliced to the sizes asked for, not copied twice)."""

    def __init__(self, pipe: Pipe) -> None:
        super().__init__()
        self.pipe = pipe
        self._current = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Whether data is at hand, waiting for the next chunk when none is (False at the end of the stream)."""
        while not self._current:
            if self._done:
                return False
            chunk = self.pipe.get()
            if not chunk:
                self._done = True
                return False
            self._current = memoryview(chunk)
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if not self._fill():
            return b""
        n = min(size, len(self._current))
        out = bytes(self._current[:n])
        self._current = self._current[n:]
        return out

    def readinto(self, buffer: Any) -> int:
        if not self._fill():
            return 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._current))
        view[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


class PipeWriter(io.RawIOBase):
    """A pipe's writing end as a binary file (what a library on the helper thread writes its output to)."""

    def __init__(self, pipe: Pipe) -> None:
        super().__init__()
        self.pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.pipe.put(chunk)
        return len(chunk)


class ForwardingFile(io.RawIOBase):
    """The real source (``read``) or sink (``write``) a library on the helper thread uses, as a binary file.

    The library turns the real file's exception into its own error; this keeps the original in
    ``error`` so the caller can raise it as is. ``count`` is the number of bytes read or written.
    """

    def __init__(self, *, read: Callable[[int], bytes] | None = None,
                 write: Callable[[bytes], object] | None = None) -> None:
        super().__init__()
        self._read, self._write = read, write
        self.error: BaseException | None = None
        self.count = 0

    def readable(self) -> bool:
        return self._read is not None

    def writable(self) -> bool:
        return self._write is not None

    def read(self, size: int | None = -1) -> bytes:
        assert self._read is not None, "not a source"
        try:
            data = self._read(-1 if size is None else size)
        except BaseException as exc:
            self.error = exc
            raise
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def write(self, data: Any) -> int:
        assert self._write is not None, "not a sink"
        chunk = bytes(data)
        try:
            self._write(chunk)
        except BaseException as exc:
            self.error = exc
            raise
        self.count += len(chunk)
        return len(chunk)


class Bridge:
    """``work(pipe)`` running on a helper thread, joined to the calling thread by a ``Pipe`` of ``max_chunks``.

    When ``work`` returns or raises, the pipe ends (with its exception, kept in ``error``), so a
    caller blocked on either end wakes up. ``join`` waits for the thread; ``cancel`` stops it.
    """

    def __init__(self, work: Callable[[Pipe], object], *, name: str, max_chunks: int) -> None:
        self.pipe = Pipe(max_chunks)
        self.error: BaseException | None = None
        self._work = work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._work(self.pipe)
        except BaseException as exc:
            self.error = exc
        finally:
            self.pipe.end(self.error)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        """Wait for ``work`` to finish (its exception, if any, is in ``error``)."""
        self._thread.join()

    def cancel(self) -> None:
        """Stop ``work`` at its next use of the pipe and wait for the thread to end; never raises.

        A thread busy in the real source or sink finishes that call first (it cannot be interrupted).
        """
        self.pipe.cancel()
        self._thread.join()
