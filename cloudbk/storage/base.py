"""The storage contract every backend implements.

A ``Storage`` is rooted at a repository URL (``s3://bucket/prefix`` …); keys are relative to that root, use
``/`` as separator and are validated by :func:`check_key`. The contract, as MUSTs:

- ``open_read`` raises :class:`~cloudbk.errors.NotFound` eagerly (before the first ``read``) when the key is
  absent, and streams: memory does not grow with the object size.
- ``open_write`` returns a writer; nothing is visible under the key before ``commit()`` returns, and nothing is
  ever visible after ``abort()`` (or after the writer is garbage-collected or the process dies uncommitted).
  Memory held by a writer is bounded by the backend's part size, whatever the object size.
- The write mode decides what ``commit`` does when the key exists: ``Overwrite`` replaces it, ``CreateOnly``
  raises :class:`~cloudbk.errors.AlreadyExists`, ``IfVersion(v)`` replaces it only if its current version is
  ``v`` and raises :class:`~cloudbk.errors.PreconditionFailed` otherwise (also when the key is absent).
  Among concurrent conditional writers exactly one wins.
- ``list(prefix)`` yields every key starting with ``prefix`` (a plain string prefix, not a directory),
  sorted by key, fetched lazily page by page; a prefix with no keys yields nothing.
- ``delete_many`` deletes in batches; keys that do not exist are not an error.
- Every SDK error is translated into the taxonomy of :mod:`cloudbk.errors` at the driver boundary.
- Drivers do not retry (SDK-internal retries are turned off); :mod:`cloudbk.storage.retry` does, uniformly.
  A writer that uploads in parts holds their bytes, so the retry layer hands it its policy
  (:meth:`ObjectWriter.use_retry`); a bare driver's writer tries each request once.
- What a backend can do and its limits are data: :class:`Capabilities`; what it needs beyond the URL:
  :class:`StorageOptions`.
"""

from __future__ import annotations

import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from cloudbk.errors import UsageError
from cloudbk.storage.backoff import RetryPolicy

# A chunk size for streaming copies: large enough to amortise per-call overhead, small enough to bound memory.
COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StorageOptions:
    """What a driver needs beyond the URL.

    ``environ`` is where drivers look up credentials and emulator settings (``AWS_*``,
    ``AZURE_STORAGE_*``, ``STORAGE_EMULATOR_HOST`` …); it defaults to the process environment. Tests pass
    their own so two emulators with different credentials can be used from one process.
    """

    endpoint_url: str | None = None
    retry_deadline: float = 60.0
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, and its limits, as data; each driver declares its own, citing the source."""

    #: keys per listing page (S3 and GCS return at most 1,000); tests lower it to exercise pagination
    list_page_size: int = 1000
    #: keys per batched delete request (S3 DeleteObjects takes at most 1,000)
    delete_batch_size: int = 1000
    #: a killed writer can leave an incomplete upload the service keeps (and bills) until it is aborted;
    #: only then do ``list_uploads`` / ``abort_upload`` have anything to do
    incomplete_uploads: bool = False


@dataclass(frozen=True)
class ObjectInfo:
    """What ``stat``, ``list`` and ``commit`` report about one object."""

    key: str
    size: int
    version: str  # opaque compare-and-swap token: S3/Azure ETag, GCS generation, local inode+mtime
    modified: float | None = None  # seconds since the epoch, when the backend reports it


@dataclass(frozen=True)
class UploadInfo:
    """An incomplete multipart upload (S3): parts stored under ``key``, never completed nor aborted."""

    key: str
    upload_id: str
    initiated: float | None  # seconds since the epoch, by the storage's clock; None if not reported


@dataclass(frozen=True)
class Overwrite:
    """Replace whatever is stored under the key."""


@dataclass(frozen=True)
class CreateOnly:
    """Store only if the key is absent; otherwise ``AlreadyExists``."""


@dataclass(frozen=True)
class IfVersion:
    """Replace only if the stored version equals ``version``; otherwise ``PreconditionFailed``."""

    version: str


WriteMode = Overwrite | CreateOnly | IfVersion

OVERWRITE = Overwrite()
CREATE_ONLY = CreateOnly()

_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def check_key(key: str) -> str:
    """Validate a key: the one place key syntax is checked. Returns the key."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise UsageError(f"invalid storage key {key!r}: must be non-empty and not start or end with '/'")
    if _BAD_KEY_CHARS.search(key):
        raise UsageError(f"invalid storage key {key!r}: control characters and backslashes are not allowed")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise UsageError(f"invalid storage key {key!r}: empty, '.' and '..' path segments are not allowed")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix (may be empty, may end with '/')."""
    if prefix:
        check_key(prefix.rstrip("/") or "x")
    return prefix


class ObjectReader(io.RawIOBase):
    """A streaming read of one object (or one byte range of it). Drivers implement ``readinto``."""

    #: the bytes this read delivers when complete, as the storage announced them (None: not announced); the
    #: retry layer reports a read that ends short of it as an ``IntegrityError``
    size: int | None = None

    def readable(self) -> bool:
        return True

    @abstractmethod
    def readinto(self, buffer: Any) -> int:  # pragma: no cover - abstract
        """Fill ``buffer`` with up to ``len(buffer)`` bytes; return 0 at the end of the object."""


class ObjectWriter(ABC):
    """A streaming write of one object: ``write`` any number of times, then ``commit`` or ``abort``."""

    key: str

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``. May upload a part; raises storage errors."""

    @abstractmethod
    def commit(self) -> ObjectInfo:
        """Make the object visible under its key, honouring the write mode. The writer is finished after it."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; nothing becomes visible. Safe to call more than once, never raises."""

    def use_retry(self, policy: RetryPolicy) -> None:
        """Retry each request this writer makes (a part, the completion) under ``policy``.

        Called by the retry layer before the first ``write``. Only the writer holds a part's bytes, so only it
        can send them again; a writer whose requests cannot be repeated (a local file) ignores it.
        """
        return None

    def limit_parts(self, parts_in_flight: int) -> None:
        """Upload at most ``parts_in_flight`` parts at once (before the first ``write``): a caller writing several
        objects at a time bounds its memory this way. A writer that does not upload in parts ignores it."""
        return None

    # file-like conveniences so compressors and tarfile can write into a writer
    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        return None

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Leaving the block without commit() means the object is abandoned: never half-publish.
        self.abort()


class Storage(ABC):
    """One repository root on one backend. Thread-safe: one instance may be shared by worker threads."""

    #: URL scheme(s) this driver serves; informational.
    scheme: str = ""
    #: What this backend can do and its limits (drivers declare theirs).
    capabilities: Capabilities = Capabilities()

    def __init__(self, url: str) -> None:
        self.url = url

    # -- the required operations ------------------------------------------------------------------------

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and version of ``key``; ``NotFound`` if absent."""

    @abstractmethod
    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        """Stream ``length`` bytes (all, if None) of ``key`` starting at ``offset``. ``NotFound`` eagerly."""

    @abstractmethod
    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        """Start a streaming write of ``key``; see the module docstring for the visibility rules."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key, lazily paginated."""

    @abstractmethod
    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` in batches; absent keys are fine."""

    def close(self) -> None:
        """Release clients and connections."""
        return None

    # -- incomplete uploads a killed writer left behind (``capabilities.incomplete_uploads``) ----------------

    def list_uploads(self, prefix: str = "") -> Iterator[UploadInfo]:
        """Incomplete multipart uploads whose key starts with ``prefix``. Backends without the capability (or
        whose service discards them by itself) have none: the default yields nothing."""
        return iter(())

    def abort_upload(self, upload: UploadInfo) -> None:
        """Discard one upload listed by ``list_uploads`` and its parts; one that is gone already is fine."""
        return None

    def whole_call(self) -> AbstractContextManager[object]:
        """A block in which one deadline bounds every operation (the retry layer's; a bare driver has none)."""
        return nullcontext()

    # -- conveniences built on the required operations --------------------------------------------------

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def exists(self, key: str) -> bool:
        from cloudbk.errors import NotFound

        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole (the index, a manifest, a WAL header)."""
        with self.open_read(key) as reader:
            return reader.read()

    def get_bytes_versioned(self, key: str) -> tuple[bytes, str]:
        """Read a small object and the version it had when read, for a later ``IfVersion`` write.

        The version is taken before and checked after the read; if the object changed in between the read
        is repeated, so the pair is consistent.
        """
        while True:
            before = self.stat(key)
            data = self.get_bytes(key)
            after = self.stat(key)
            if before.version == after.version:
                return data, after.version

    def put_bytes(self, key: str, data: bytes, mode: WriteMode = OVERWRITE) -> ObjectInfo:
        writer = self.open_write(key, mode)
        try:
            view = memoryview(data)
            for start in range(0, len(view), COPY_CHUNK):
                writer.write(view[start : start + COPY_CHUNK])
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
