"""The one retry layer: transient storage errors are retried with backoff until a time deadline.

Retry is decided by the error class (:class:`~cloudbk.errors.TransientError`), never by message text.
Drivers turn their SDK's own retries off, so behaviour is uniform and testable. Streaming writes retry their
parts inside :class:`cloudbk.storage.parts.PartWriter` with the same policy; streaming reads resume at the
offset where a transient error interrupted them.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator
from typing import Any

from cloudbk.errors import TransientError
from cloudbk.storage.backoff import NO_RETRY, RetryPolicy
from cloudbk.storage.base import (
    OVERWRITE,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Storage,
    UploadInfo,
    WriteMode,
)

__all__ = ["NO_RETRY", "RetryPolicy", "RetryingStorage"]


class _ResumingReader(ObjectReader):
    """Re-opens the object at the current offset when a transient error interrupts the stream."""

    def __init__(self, storage: Storage, policy: RetryPolicy, key: str, offset: int, length: int | None) -> None:
        super().__init__()
        self._storage = storage
        self._policy = policy
        self._key = key
        self._offset = offset
        self._remaining = length
        self._inner = policy.call(lambda: storage.open_read(key, offset, length), f"read {key}")

    def readinto(self, buffer: Any) -> int:
        if self._remaining == 0:
            return 0
        while True:
            try:
                n = self._inner.readinto(buffer)
            except TransientError:
                self._inner.close()
                self._inner = self._policy.call(
                    lambda: self._storage.open_read(self._key, self._offset, self._remaining), f"read {self._key}"
                )
                continue
            n = n or 0
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
        # Writers retry their own parts (they hold the bytes); hand them the same policy.
        inner.retry_policy = policy
        self.list_page_size = inner.list_page_size
        self.delete_batch_size = inner.delete_batch_size
        self.scheme = inner.scheme

    def stat(self, key: str) -> ObjectInfo:
        return self.policy.call(lambda: self.inner.stat(key), f"stat {key}")

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        return _ResumingReader(self.inner, self.policy, key, offset, length)

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        return self.policy.call(lambda: self.inner.open_write(key, mode), f"write {key}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        last: str | None = None
        while True:
            try:
                for info in self.inner.list(prefix):
                    if last is not None and info.key <= last:
                        continue  # already yielded before a transient error restarted the listing
                    last = info.key
                    yield info
                return
            except TransientError:
                # Wait out the failure by retrying a cheap call, then restart the listing after ``last``.
                self.policy.call(lambda: next(iter(self.inner.list(prefix)), None), f"list {prefix}")

    def delete_many(self, keys: Iterable[str]) -> None:
        batch: builtins.list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) >= self.delete_batch_size:
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

    def close(self) -> None:
        self.inner.close()
