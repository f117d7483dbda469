"""A generic buffered writer for object stores that upload in parts (S3 multipart, Azure blocks, GCS chunks).

It buffers up to ``part_size`` bytes (plus one ``write`` call's worth), hands each full part to a small
thread pool so up to ``parts_in_flight`` parts upload at once, and retries each part under the policy the
retry layer hands it (:meth:`use_retry`; a bare driver's writer tries once): the part's bytes are still in
hand, so a transient failure costs one part, not the whole stream. Memory is bounded by
``(parts_in_flight + 1) * part_size`` whatever the object size: ``write`` blocks while the pool is full
(backpressure), so a fast producer cannot run ahead of the network.

Objects that fit in one part are stored with a single request. The last part is always sent by ``_finish``,
after every other part has been stored, so drivers that need to know the end of the stream (GCS resumable
uploads) get it there. A part that still fails after its retries aborts the whole upload: the writer
cancels the parts not yet started, waits for the running ones, calls ``_cancel`` and re-raises.

Drivers implement five primitives; each must be idempotent for the same arguments (a retried call after a
lost response must not corrupt the object) and translate SDK errors into :mod:`cloudbk.errors`. Unless the
driver sets ``parallel_parts = False``, ``_upload_part`` is called from worker threads, several at once for
different part numbers, so it must record per-part results by ``number`` (e.g. ``self._etags[number] = …``),
never by call order. ``_begin``, ``_finish``, ``_put_whole`` and ``_cancel`` run in the caller's thread,
never concurrently with ``_upload_part``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
from abc import abstractmethod

from cloudbk.storage.backoff import NO_RETRY, RetryPolicy
from cloudbk.storage.base import ObjectInfo, ObjectWriter, WriteMode

#: Parts of one object uploading at the same time. Four keeps a 1 Gbit/s link busy with 8-16 MiB parts
#: against S3-like stores, while holding only a few parts of memory per stream.
DEFAULT_PARTS_IN_FLIGHT = 4


class PartWriter(ObjectWriter):
    #: Whether parts of one object may upload concurrently. GCS resumable sessions need them in order.
    parallel_parts: bool = True
    #: Upper bound of parts uploading at once (when ``parallel_parts``); 1 means sequential.
    parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT

    def __init__(self, key: str, mode: WriteMode, part_size: int, parts_in_flight: int | None = None) -> None:
        self.key = key
        self.mode = mode
        self.part_size = part_size
        self.policy = NO_RETRY
        if parts_in_flight is not None:
            self.parts_in_flight = max(1, parts_in_flight)
        self._buffer = bytearray()
        self._parts = 0  # parts handed out so far
        self._offset = 0  # bytes handed out so far
        self._started = False
        self._done = False
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: set[cf.Future[None]] = set()

    def use_retry(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def limit_parts(self, parts_in_flight: int) -> None:
        self.parts_in_flight = min(self.parts_in_flight, max(1, parts_in_flight))

    # -- primitives for drivers ---------------------------------------------------------------------------

    @abstractmethod
    def _put_whole(self, data: bytes) -> ObjectInfo:
        """Store the whole object in one request, honouring ``self.mode``."""

    @abstractmethod
    def _begin(self) -> None:
        """Start a multi-part upload (create the S3 upload id / GCS session)."""

    @abstractmethod
    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        """Upload part ``number`` (0-based) holding bytes ``offset .. offset+len(data)`` of the object.

        Called from worker threads, concurrently for different parts, unless ``parallel_parts`` is False.
        """

    @abstractmethod
    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        """Upload the last part (may be empty) and publish the object, honouring ``self.mode``."""

    @abstractmethod
    def _cancel(self) -> None:
        """Discard an upload started by ``_begin``. Best effort; must not raise."""

    # -- the writer ---------------------------------------------------------------------------------------

    @property
    def _concurrent(self) -> bool:
        return self.parallel_parts and self.parts_in_flight > 1

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ValueError(f"write to {self.key} after commit or abort")
        self._buffer += data
        while len(self._buffer) > self.part_size:
            part = bytes(memoryview(self._buffer)[: self.part_size])
            del self._buffer[: self.part_size]
            try:
                self._send(part)
            except BaseException:
                self.abort()
                raise
        return len(data)

    def _send(self, part: bytes) -> None:
        if not self._started:
            self.policy.call(self._begin, f"start upload of {self.key}")
            self._started = True
        number, offset = self._parts, self._offset
        self._parts += 1
        self._offset += len(part)
        what = f"upload part {number} of {self.key}"

        def upload() -> None:
            self.policy.call(lambda: self._upload_part(number, offset, part), what, transfer=True)

        if not self._concurrent:
            upload()
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.parts_in_flight, thread_name_prefix="cloudbk-part")
        # Backpressure: wait for a slot, surfacing the first failure instead of uploading more parts.
        self._reap(block=False)
        while len(self._pending) >= self.parts_in_flight:
            self._reap(block=True)
        # in the caller's context, so the part's retries see an enclosing deadline (cloudbk.storage.deadline)
        self._pending.add(self._pool.submit(contextvars.copy_context().run, upload))

    def _reap(self, block: bool) -> None:
        """Drop finished parts from the pending set; raise the error of a failed one."""
        if not self._pending:
            return
        if block:
            done, _ = cf.wait(self._pending, return_when=cf.FIRST_COMPLETED)
        else:
            done = {f for f in self._pending if f.done()}
        for future in done:
            self._pending.discard(future)
            future.result()  # re-raises the part's error in the caller's thread

    def _drain(self) -> None:
        """Wait for every pending part; raise the first error."""
        while self._pending:
            self._reap(block=True)

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def commit(self) -> ObjectInfo:
        if self._done:
            raise ValueError(f"commit of {self.key} after commit or abort")
        data = bytes(self._buffer)
        try:
            if not self._started:
                info = self.policy.call(lambda: self._put_whole(data), f"write {self.key}", transfer=True)
            else:
                self._drain()
                number, offset = self._parts, self._offset
                info = self.policy.call(
                    lambda: self._finish(number, offset, data), f"complete upload of {self.key}", transfer=True
                )
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._buffer = bytearray()
        self._shutdown_pool()
        return info

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer = bytearray()
        # Parts not started are cancelled; running ones cannot be interrupted, so wait for them before
        # discarding the upload, or a late part could recreate what _cancel removed.
        for future in self._pending:
            future.cancel()
        try:
            cf.wait(self._pending)
        finally:
            self._pending = set()
            self._shutdown_pool()
        if self._started:
            try:
                self._cancel()
            except Exception:
                pass
