"""``gs://`` backend: Google Cloud Storage through google-cloud-storage and google-resumable-media.

Reads: one ranged GET per window (``Blob.download_to_file``), the first window large enough to hold a whole
WAL segment with its envelope, so small objects are read in one request (fake-gcs-server makes every ranged
read a new connection); the windows of a longer read are pinned to the generation the first one saw. Memory
held by a reader is one window.

Writes (:mod:`cloudbk.storage.gcsupload`): an object that fits in one part is one multipart upload
(``Blob.upload_from_file`` with ``if_generation_match``); larger ones a resumable session of
google-resumable-media, with the same precondition. Every SDK call is made with ``retry=None`` and a timeout
capped by the current deadline; the session under the client caps every request too
(:mod:`cloudbk.storage.gcsclient`). The one retry layer (:mod:`cloudbk.storage.retry`) retries.

Errors are translated here, at the driver boundary: the SDK's HTTP errors by status, ``requests``/``urllib3``
transport errors as transient, google-auth's by their kind; always chained and naming the key. A 404 is
checked against the bucket once (a one-item listing), so a missing bucket is named as such.
"""

from __future__ import annotations

import contextvars
import io
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from cloudbk.errors import (
    AccessDenied,
    CloudbkError,
    IntegrityError,
    NotFound,
    PermanentError,
    StorageError,
    TransientError,
)
from cloudbk.redact import redact_url
from cloudbk.storage.base import (
    OVERWRITE,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Storage,
    WriteMode,
    check_key,
    check_prefix,
)
from cloudbk.storage.deadline import request_timeout
from cloudbk.storage.gcsclient import ACCESS_HINT, CONNECT_TIMEOUT, READ_TIMEOUT, build_client, endpoint_of

if TYPE_CHECKING:
    from cloudbk.storage.base import StorageOptions

MiB = 1024 * 1024
# "Chunk sizes must be a multiple of 256 KiB (256 x 1024 bytes), unless it's the last chunk"
# (cloud.google.com/storage/docs/performing-resumable-uploads). 8 MiB, as the Google SDKs use.
CHUNK_ALIGN = 256 * 1024
CHUNK_SIZE = 32 * CHUNK_ALIGN
# The SDK's upload_from_file sends up to 8 MiB as one multipart request and switches to its own resumable
# upload above (google.cloud.storage.blob._MAX_MULTIPART_SIZE): parts must not exceed it.
MAX_SINGLE_REQUEST = 8 * MiB
# A 16 MiB WAL segment stored uncompressed, plus its envelope, in one GET; later windows of a long read.
FIRST_WINDOW = 16 * MiB + 256 * 1024
WINDOW = 8 * MiB
# The JSON API deletes one object per request (fake-gcs-server has no batch endpoint): do a few at once.
DELETE_THREADS = 8
CONTENT_TYPE = "application/octet-stream"

T = TypeVar("T")


def transport_error_class(exc: BaseException) -> type[StorageError] | None:
    """The taxonomy class of an exception raised while talking to the server; None if it is not one."""
    import requests
    import urllib3

    auth = sys.modules.get("google.auth.exceptions")
    if auth is not None and isinstance(exc, auth.RefreshError):
        return TransientError if getattr(exc, "retryable", False) else AccessDenied
    if auth is not None and isinstance(exc, auth.TransportError):
        return TransientError
    if isinstance(exc, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError):
        return TransientError  # refused, reset, timed out, cut short
    if isinstance(exc, requests.RequestException):
        return PermanentError  # a malformed URL or request: retrying will not help
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError | ConnectionError):
        return TransientError  # raised by a streaming body, below requests
    return None


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an SDK error (google.api_core) or a resumable-media ``InvalidResponse``."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def status_class(status: int) -> type[StorageError]:
    if status in (401, 403):
        return AccessDenied
    if status in (408, 429) or status >= 500:
        return TransientError
    return PermanentError


class GCSStorage(Storage):
    scheme = "gs"
    #: bytes per resumable chunk, and the largest object stored with a single request
    part_size: int = CHUNK_SIZE

    def __init__(self, url: str, bucket: str, prefix: str, options: StorageOptions) -> None:
        super().__init__(url)
        self.bucket_name = bucket
        self.prefix = prefix
        self._bucket_seen = False  # once the bucket has answered, a 404 is about the object
        self.endpoint = endpoint_of(options)
        self._options = options
        # Built on first use: a WAL command imports the SDK inside its deadline (cloudbk.storage.deadline).
        self._connected: tuple[Any, Any, Any] | None = None
        self._connecting = threading.Lock()

    def _connection(self) -> tuple[Any, Any, Any]:
        if self._connected is None:
            with self._connecting:
                if self._connected is None:
                    client, http = build_client(self._options, self.endpoint)
                    self._connected = (client, http, client.bucket(self.bucket_name))
        return self._connected

    @property
    def client(self) -> Any:
        """The ``google.cloud.storage.Client``."""
        return self._connection()[0]

    @property
    def http(self) -> Any:
        """The session every request goes through (:class:`cloudbk.storage.gcsclient.DeadlineSession`)."""
        return self._connection()[1]

    @property
    def bucket(self) -> Any:
        return self._connection()[2]

    # -- plumbing -----------------------------------------------------------------------------------------

    def name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def where(self, key: str | None = None) -> str:
        return f"gs://{self.bucket_name}/{self.name(key) if key else self.prefix}"

    def blob(self, key: str) -> Any:
        return self.bucket.blob(self.name(key))

    @staticmethod
    def timeout() -> tuple[float, float]:
        """(connect, read) for one SDK call: each wait at most the time left to the current deadline."""
        return request_timeout(CONNECT_TIMEOUT), request_timeout(READ_TIMEOUT)

    def error(self, exc: BaseException, what: str, key: str | None) -> CloudbkError | None:
        """The taxonomy error for an SDK or transport exception (404 and 412 are the caller's); None if the
        exception is neither (a bug: let it through)."""
        if isinstance(exc, CloudbkError):
            return exc  # a deadline or stall raised from inside a wait
        status = status_of(exc)
        detail = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"[:300]
        cls: type[StorageError] | None
        if status is not None:
            cls = status_class(status)
            message = f"{what} {self.where(key)} failed: HTTP {status} {detail}"
        else:
            cls = transport_error_class(exc)
            message = f"{what} {self.where(key)}: {detail}"
        if cls is None:
            if type(exc).__name__ == "DataCorruption":  # google.resumable_media.common
                return IntegrityError(message, key=key)
            return None
        hint = ACCESS_HINT if cls is AccessDenied else None
        if cls is TransientError:
            hint = f"check that {redact_url(self.endpoint)} is reachable"
        return cls(message, key=key, hint=hint)

    def call(self, fn: Callable[[], T], what: str, key: str | None) -> T:
        """Run one SDK call, translating what it raises. A 404 becomes ``NotFound`` or the missing bucket."""
        try:
            return fn()
        except Exception as exc:
            if status_of(exc) == 404:
                raise self.missing(what, key) from exc
            error = self.error(exc, what, key)
            if error is None:
                raise
            if error is exc:
                raise
            raise error from exc

    def no_bucket(self, what: str, key: str | None) -> PermanentError:
        return PermanentError(
            f"bucket gs://{self.bucket_name} does not exist (trying to {what} {self.where(key)})",
            key=key,
            hint=f"create the bucket (gcloud storage buckets create gs://{self.bucket_name}) or fix the repository URL",
        )

    def missing(self, what: str, key: str | None) -> StorageError:
        """A 404: ``NotFound`` for the key, unless the bucket is what is missing."""
        if not self._bucket_seen:  # GCS answers 404 to both; a one-item listing tells them apart
            try:
                pages = self.client.list_blobs(self.bucket, max_results=1, retry=None, timeout=self.timeout())
                next(iter(pages), None)
            except Exception as exc:
                status = status_of(exc)
                if status == 404:
                    return self.no_bucket(what, key)
                if status != 403:  # 403: we may not list; the 404 was the object's
                    error = self.error(exc, f"{what} (checking the bucket of)", key)
                    if isinstance(error, StorageError):
                        return error
                    raise
            self._bucket_seen = True
        if key is None:
            return self.no_bucket(what, key)
        return NotFound(f"object {key} not found in {self.where()}", key=key)

    def info(self, key: str, blob: Any) -> ObjectInfo:
        updated = blob.updated
        return ObjectInfo(key, int(blob.size), str(blob.generation), updated.timestamp() if updated else None)

    # -- the contract -------------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        blob = self.blob(key)
        self.call(lambda: blob.reload(retry=None, timeout=self.timeout()), "stat", key)
        self._bucket_seen = True
        return self.info(key, blob)

    def metadata(self, key: str) -> tuple[ObjectInfo, dict[str, str]] | None:
        """The object's info and custom metadata; None if it is absent."""
        try:
            blob = self.blob(key)
            self.call(lambda: blob.reload(retry=None, timeout=self.timeout()), "stat", key)
        except NotFound:
            return None
        return self.info(key, blob), dict(blob.metadata or {})

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        if length == 0:
            self.stat(key)  # NotFound eagerly, even for an empty range
        return GCSReader(self, key, offset, length)

    def get_bytes_versioned(self, key: str) -> tuple[bytes, str]:
        """One GET for a small object: the bytes and the generation they belong to."""
        with GCSReader(self, key, 0, None) as reader:
            data = reader.read()
            generation = reader.generation
        if generation is None:
            return super().get_bytes_versioned(key)
        return data, generation

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        from cloudbk.storage.gcsupload import GCSWriter

        if self.part_size % CHUNK_ALIGN or self.part_size > MAX_SINGLE_REQUEST:
            raise ValueError(
                f"GCS part size {self.part_size} is not a multiple of {CHUNK_ALIGN} up to {MAX_SINGLE_REQUEST}"
            )
        return GCSWriter(self, key, mode)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        pages = self.call(
            lambda: (
                self.client.list_blobs(
                    self.bucket,
                    prefix=root + prefix,
                    page_size=self.capabilities.list_page_size,
                    fields="items(name,size,generation,updated),nextPageToken",
                    retry=None,
                    timeout=self.timeout(),
                ).pages
            ),
            "list",
            None,
        )
        last: str | None = None
        while True:
            page = self.call(lambda: next(pages, None), "list", None)
            if page is None:
                return
            self._bucket_seen = True
            for blob in page:  # the page was fetched by next(): iterating it sends nothing
                key = blob.name[len(root) :]
                if not key or key.endswith("/"):
                    continue  # a "folder" placeholder made by the console, not a key
                if last is not None and key <= last:  # the retry layer resumes listings by key order
                    raise PermanentError(f"listing of {self.where()} is not sorted at {key!r}")
                last = key
                yield self.info(key, blob)

    def delete_many(self, keys: Iterable[str]) -> None:
        checked = [check_key(key) for key in keys]

        def delete(key: str) -> StorageError | None:
            try:
                self.call(lambda: self.blob(key).delete(retry=None, timeout=self.timeout()), "delete", key)
            except NotFound:
                return None  # absent keys are fine
            except StorageError as exc:
                return exc
            return None

        if not checked:
            return
        with ThreadPoolExecutor(max_workers=min(DELETE_THREADS, len(checked))) as pool:
            # each in a copy of the caller's context: the deletes see its deadline (cloudbk.storage.deadline)
            futures = [pool.submit(contextvars.copy_context().run, delete, key) for key in checked]
        failures = [e for e in (f.exception() or f.result() for f in futures) if e is not None]
        if failures:  # every delete was tried; a retry repeats them all, so raise the least retryable
            raise min(failures, key=lambda e: isinstance(e, TransientError))

    def close(self) -> None:
        if self._connected is not None:
            self._connected[1].close()


class GCSReader(ObjectReader):
    """A read of one object as ranged GETs of one window each; the first is made when the reader is opened
    (``NotFound`` eagerly), the later ones pinned to the generation it saw."""

    def __init__(self, storage: GCSStorage, key: str, offset: int, length: int | None) -> None:
        super().__init__()
        self._s = storage
        self._key = key
        self._blob = storage.blob(key)
        self._next = offset  # object offset of the next window
        self._left = length  # bytes still to fetch; None: up to the end
        self._window = io.BytesIO()
        self._view = memoryview(b"")
        self._eof = length == 0
        self.generation: str | None = None
        if not self._eof:
            self._fetch(FIRST_WINDOW)

    def _fetch(self, size: int) -> None:
        if self._left is not None:
            size = min(size, self._left)
        self._window = io.BytesIO()
        start, window = self._next, self._window
        pin = int(self.generation) if self.generation is not None else None

        def download() -> None:
            self._blob.download_to_file(
                window,
                start=start,
                end=start + size - 1,
                raw_download=True,
                checksum=None,
                if_generation_match=pin,
                retry=None,
                timeout=self._s.timeout(),
            )

        try:
            self._s.call(download, "read", self._key)
        except PermanentError as exc:
            status = status_of(exc.__cause__) if exc.__cause__ is not None else None
            if status == 416:  # the range starts at or past the end of the (existing) object
                self._eof = True
                self._view = memoryview(b"")
                return
            if status == 412:
                raise TransientError(
                    f"{self._s.where(self._key)} was replaced while being read", key=self._key
                ) from exc
            raise
        self._s._bucket_seen = True
        if self.generation is None and self._blob.generation is not None:
            self.generation = str(self._blob.generation)
        got = window.getbuffer()
        self._view = got
        self._next += len(got)
        if self._left is not None:
            self._left -= len(got)
        if len(got) < size or self._left == 0:
            self._eof = True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        while not self._view and not self._eof:
            self._fetch(WINDOW)
        n = min(len(out), len(self._view))
        out[:n] = self._view[:n]
        self._view = self._view[n:]
        return n

    def close(self) -> None:
        self._view = memoryview(b"")
        self._window = io.BytesIO()
        super().close()
