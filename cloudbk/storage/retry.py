"""The one retry layer: transient storage errors are retried with backoff until a time deadline.

Retry is decided by the error class (:class:`~cloudbk.errors.TransientError`), never by message text.
Drivers turn their SDK's own retries off, so behaviour is uniform and testable. A writer holds its parts'
bytes, so the layer hands it the policy when it opens it (:meth:`~cloudbk.storage.base.ObjectWriter.use_retry`)
and the writer retries each part; streaming reads resume at the offset where a transient error interrupted
them.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from cloudbk.errors import IntegrityError, TransientError
from cloudbk.storage import deadline
from cloudbk.storage.backoff import MIN_ATTEMPT, NO_RETRY, RetryPolicy
from cloudbk.storage.base import (
    OVERWRITE,
    Capabilities,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Storage,
    UploadInfo,
    WriteMode,
)

__all__ = ["NO_RETRY", "RetryPolicy", "RetryingStorage"]

log = logging.getLogger("cloudbk.storage")


class _ResumingReader(ObjectReader):
    """Re-opens the object at the current offset when a transient error (or a stall) interrupts the stream.

    One budget for the whole read, carried across every resume: inside a whole call, that call's deadline
    (which also bounds the healthy transfer); otherwise a retry budget that runs from a failure until the
    stream shows the throughput floor again (:class:`~cloudbk.storage.deadline.StallWatch`). A read that ends
    without an error short of its known length (the ``length`` asked for, else the size the storage announced)
    raises ``IntegrityError``: a silent short read is never passed on as the whole object.
    """

    def __init__(self, storage: Storage, policy: RetryPolicy, key: str, offset: int, length: int | None) -> None:
        super().__init__()
        self._storage = storage
        self._policy = policy
        self._key = key
        self._offset = offset
        self._remaining = length
        outer = deadline.enclosing_deadline()
        self._budget = outer or policy.new_deadline()
        self._watch: deadline.Watch = outer or deadline.StallWatch(
            self._budget, policy.stall_floor, policy.stall_window, key
        )
        self._inner = self._open()
        self._expected = self._remaining if self._remaining is not None else self._inner.size
        if self._remaining is None:
            self._remaining = self._inner.size  # a resumed read asks for exactly the rest
        self.size = self._expected

    def _open(self) -> ObjectReader:
        what = f"read {self._key}"
        watch = self._watch
        if not isinstance(watch, deadline.StallWatch):
            return self._policy.call(lambda: self._storage.open_read(self._key, self._offset, self._remaining), what)

        def attempt() -> ObjectReader:
            watch.restart()  # a fresh stall window per attempt: backoff sleeps are not the server's fault
            return self._storage.open_read(self._key, self._offset, self._remaining)

        with watch.reading():  # an open may read data already (Azure's first GET)
            return self._policy.call(attempt, what, self._budget, watch)

    def _read(self, buffer: Any) -> int:
        if isinstance(self._watch, deadline.StallWatch):
            with self._watch.reading():
                return self._inner.readinto(buffer) or 0
        with deadline.watching(self._watch):
            return self._inner.readinto(buffer) or 0

    def readinto(self, buffer: Any) -> int:
        if self._remaining == 0:
            return 0
        while True:
            try:
                n = self._read(buffer)
            except TransientError as exc:
                self._inner.close()
                self._budget.run()
                if self._budget.remaining() < MIN_ATTEMPT:
                    raise
                log.info("resuming read of %s at offset %d after: %s", self._key, self._offset, exc.message)
                self._inner = self._open()
                continue
            if n == 0 and self._remaining and len(memoryview(buffer)):
                raise IntegrityError(
                    f"read of {self._key} ended at byte {self._offset}, {self._remaining} bytes short of the "
                    f"{self._expected} expected",
                    key=self._key,
                    hint="the storage cut the object short without an error; nothing read from it is used. Retry, "
                    "and check the storage if it happens again",
                )
            self._offset += n
            if self._remaining is not None:
                self._remaining -= n
            return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


class RetryingStorage(Storage):
    """Wraps a driver and retries its operations by error class under one policy."""

    def __init__(self, inner: Storage, policy: RetryPolicy) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.policy = policy
        self.scheme = inner.scheme

    @property  # the driver's, read and set through the wrapper
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @capabilities.setter
    def capabilities(self, value: Capabilities) -> None:
        self.inner.capabilities = value

    def stat(self, key: str) -> ObjectInfo:
        return self.policy.call(lambda: self.inner.stat(key), f"stat {key}")

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        return _ResumingReader(self.inner, self.policy, key, offset, length)

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        writer = self.policy.call(lambda: self.inner.open_write(key, mode), f"write {key}")
        writer.use_retry(self.policy)  # only the writer holds its parts' bytes, so it sends them again
        return writer

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        last: str | None = None
        # One budget for the listing, across its restarts: it runs only while a failure is being waited out
        # (the caller may take its time between pages), unless a whole call bounds everything anyway.
        budget = deadline.enclosing_deadline() or self.policy.new_deadline(running=False)
        while True:
            try:
                pages = iter(self.inner.list(prefix))
                while True:
                    with deadline.watching(budget):  # never across a yield: the caller's context is not ours
                        info = next(pages, None)
                    if info is None:
                        return
                    budget.pause()
                    if last is not None and info.key <= last:
                        continue  # already yielded before a transient error restarted the listing
                    last = info.key
                    yield info
            except TransientError:
                # Wait out the failure by retrying a cheap call, then restart the listing after ``last``.
                budget.run()
                self.policy.call(lambda: next(iter(self.inner.list(prefix)), None), f"list {prefix}", budget)

    def delete_many(self, keys: Iterable[str]) -> None:
        batch: builtins.list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) >= self.capabilities.delete_batch_size:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, batch: builtins.list[str]) -> None:
        self.policy.call(lambda: self.inner.delete_many(batch), f"delete {batch[0]} and {len(batch) - 1} more")

    def get_bytes_versioned(self, key: str) -> tuple[bytes, str]:
        return self.policy.call(lambda: self.inner.get_bytes_versioned(key), f"read {key}")

    def list_uploads(self, prefix: str = "") -> Iterator[UploadInfo]:
        # few and small: one retried call collects them all
        uploads = self.policy.call(lambda: builtins.list(self.inner.list_uploads(prefix)), f"list uploads {prefix}")
        return iter(uploads)

    def abort_upload(self, upload: UploadInfo) -> None:
        self.policy.call(lambda: self.inner.abort_upload(upload), f"abort the upload of {upload.key}")

    def whole_call(self) -> AbstractContextManager[object]:
        """Bound every operation inside the block by one deadline of ``policy.deadline`` seconds."""
        return deadline.whole_call(self.policy.deadline)

    def close(self) -> None:
        self.inner.close()
