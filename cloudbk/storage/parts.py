"""A generic buffered writer for object stores that upload in parts (S3 multipart, Azure blocks, GCS chunks).

It holds at most ``part_size`` bytes (plus one ``write`` call's worth) in memory, uploads a part whenever the
buffer grows past ``part_size``, and retries each part under the storage's retry policy: the part's bytes are
still in hand, so a transient failure costs one part, not the whole stream. Objects that fit in one part are
stored with a single request. The last part is always sent by ``_finish`` so drivers that need to know the
end of the stream (GCS resumable uploads) get it there.

Drivers implement five primitives; each must be idempotent for the same arguments (a retried call after a
lost response must not corrupt the object) and translate SDK errors into :mod:`cloudbk.errors`.
"""

from __future__ import annotations

from abc import abstractmethod

from cloudbk.storage.backoff import RetryPolicy
from cloudbk.storage.base import ObjectInfo, ObjectWriter, WriteMode


class PartWriter(ObjectWriter):
    def __init__(self, key: str, mode: WriteMode, part_size: int, policy: RetryPolicy) -> None:
        self.key = key
        self.mode = mode
        self.part_size = part_size
        self.policy = policy
        self._buffer = bytearray()
        self._parts = 0  # parts uploaded so far
        self._offset = 0  # bytes uploaded so far
        self._started = False
        self._done = False

    # -- primitives for drivers ---------------------------------------------------------------------------

    @abstractmethod
    def _put_whole(self, data: bytes) -> ObjectInfo:
        """Store the whole object in one request, honouring ``self.mode``."""

    @abstractmethod
    def _begin(self) -> None:
        """Start a multi-part upload (create the S3 upload id / GCS session)."""

    @abstractmethod
    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        """Upload part ``number`` (0-based) holding bytes ``offset .. offset+len(data)`` of the object."""

    @abstractmethod
    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        """Upload the last part (may be empty) and publish the object, honouring ``self.mode``."""

    @abstractmethod
    def _cancel(self) -> None:
        """Discard an upload started by ``_begin``. Best effort; must not raise."""

    # -- the writer ---------------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ValueError(f"write to {self.key} after commit or abort")
        self._buffer += data
        while len(self._buffer) > self.part_size:
            part = bytes(self._buffer[: self.part_size])
            if not self._started:
                self.policy.call(self._begin, f"start upload of {self.key}")
                self._started = True
            number, offset = self._parts, self._offset
            self.policy.call(lambda: self._upload_part(number, offset, part), f"upload part {number} of {self.key}")
            del self._buffer[: self.part_size]
            self._parts += 1
            self._offset += len(part)
        return len(data)

    def commit(self) -> ObjectInfo:
        if self._done:
            raise ValueError(f"commit of {self.key} after commit or abort")
        data = bytes(self._buffer)
        try:
            if not self._started:
                info = self.policy.call(lambda: self._put_whole(data), f"write {self.key}")
            else:
                number, offset = self._parts, self._offset
                info = self.policy.call(lambda: self._finish(number, offset, data), f"complete upload of {self.key}")
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._buffer = bytearray()
        return info

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        if self._started:
            try:
                self._cancel()
            except Exception:
                pass
