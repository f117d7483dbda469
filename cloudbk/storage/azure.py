"""``azure://container/prefix`` backend: Azure Blob Storage block blobs, through azure-storage-blob.

Writes: an object that fits in one block is one Put Blob; a larger one stages blocks (Put Block) and publishes
them with one Put Block List. Staged blocks are never visible and the service discards them when another block
list is committed or after a week, so an aborted or killed writer leaves nothing behind and ``abort`` needs no
request. Conditions are HTTP preconditions: ``CreateOnly`` sends ``If-None-Match: *``, ``IfVersion(v)`` sends
``If-Match: v``; the version is the blob's ETag.

Each writer tags its blob with a random writer id (block ids and blob metadata), so a commit whose response was
lost and that is retried can recognise its own earlier success instead of reporting a conflict.

The SDK is imported lazily and its retries are off: :mod:`cloudbk.storage.retry` retries by error class.
"""

from __future__ import annotations

import http.client
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

from cloudbk.errors import (
    AccessDenied,
    AlreadyExists,
    NotFound,
    PermanentError,
    PreconditionFailed,
    StorageError,
    TransientError,
    UsageError,
)
from cloudbk.redact import redact_url
from cloudbk.storage.azureclient import CREDENTIALS_HINT, build_client
from cloudbk.storage.base import (
    OVERWRITE,
    Capabilities,
    CreateOnly,
    IfVersion,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Storage,
    WriteMode,
    check_key,
    check_prefix,
)
from cloudbk.storage.parts import PartWriter

if TYPE_CHECKING:
    from cloudbk.storage.base import StorageOptions

MiB = 1024 * 1024

# Service limits, from the Azure Storage REST reference (learn.microsoft.com/en-us/rest/api/storageservices/):
MAX_BLOCKS = 50_000  # committed blocks per blob ("Put Block List")
MAX_BLOCK_SIZE = 4000 * MiB  # bytes per block, service version 2019-12-12 and later ("Put Block")
MAX_BATCH = 256  # sub-requests per batch ("Blob Batch")

DEFAULT_BLOCK_SIZE = 8 * MiB
# Block sizes for a stream of unknown length: the initial size for the first BLOCKS_PER_DOUBLING blocks, then
# doubling every BLOCKS_PER_DOUBLING blocks up to MAX_BLOCK_SIZE. From 8 MiB, blocks stay at most 32 MiB up to
# ~219 GiB and 256 MiB up to ~1.9 TiB, and MAX_BLOCKS hold ~69 TiB. Writer memory is a few blocks at most.
BLOCKS_PER_DOUBLING = 4000
# Block ids are "<16 hex writer id>-<5 digit block number>". Azure requires all block ids of a blob, committed
# or staged by any writer, to have the same length: never change the length of this format.
BLOCK_ID_FORMAT = "{writer}-{number:05d}"
WRITER_META = "cloudbkwriter"  # blob metadata naming the writer that committed it

_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_URL_QUERY = re.compile(r"\?[^\s'\")]+")  # a SAS token in a URL quoted by a transport error message


def block_size_for(number: int, initial: int = DEFAULT_BLOCK_SIZE) -> int:
    """Size of block ``number`` (0-based) of a stream whose length is not known in advance."""
    return min(MAX_BLOCK_SIZE, initial << (number // BLOCKS_PER_DOUBLING))


def max_object_size(initial: int = DEFAULT_BLOCK_SIZE) -> int:
    """The largest object the block schedule can store in ``MAX_BLOCKS`` blocks."""
    return sum(block_size_for(n, initial) for n in range(MAX_BLOCKS))


def _version(etag: str) -> str:
    """ETags quoted the same way everywhere (List Blobs returns them bare, other calls quoted)."""
    return etag if etag.startswith('"') else f'"{etag}"'


def _code(exc: Any) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


@cache
def _sdk_errors() -> tuple[type[BaseException], ...]:
    """Exceptions translated at the boundary: the SDK's, and transport ones that escape it mid-stream."""
    from azure.core.exceptions import AzureError

    types: list[type[BaseException]] = [AzureError, OSError, http.client.HTTPException]
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error

        types.append(Urllib3Error)
    except ImportError:  # pragma: no cover - urllib3 comes with the SDK's transport
        pass
    return tuple(types)


def _redact_url(url: str) -> str:
    return redact_url(url).rstrip("/")


class AzureStorage(Storage):
    scheme = "azure"
    capabilities = Capabilities(delete_batch_size=MAX_BATCH)  # uncommitted blocks expire by themselves

    def __init__(self, url: str, container: str, prefix: str, options: StorageOptions) -> None:
        super().__init__(url)
        if not _CONTAINER_NAME.match(container) and container not in ("$root", "$web"):
            raise UsageError(
                f"invalid Azure container name {container!r} in {url}",
                hint="container names are 3-63 lowercase letters, digits and single hyphens",
            )
        self.container = container
        self.prefix = prefix
        self.block_size = DEFAULT_BLOCK_SIZE
        self._root = f"{prefix}/" if prefix else ""
        self._service = build_client(options)
        self._container = self._service.get_container_client(container)
        self._endpoint = _redact_url(str(self._service.url))

    def close(self) -> None:
        self._service.close()
        close_credential = getattr(self._service.credential, "close", None)  # DefaultAzureCredential
        if callable(close_credential):
            close_credential()

    # -- helpers ------------------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._root + check_key(key)

    def _blob(self, key: str) -> Any:
        return self._container.get_blob_client(self._name(key))

    def _error(self, exc: BaseException, what: str, key: str, mode: WriteMode | None = None) -> StorageError:
        """Translate one SDK or transport error about ``key`` into the taxonomy of cloudbk.errors."""
        from azure.core.exceptions import ClientAuthenticationError, DecodeError, HttpResponseError

        where = f"azure blob {self._root}{key} in container {self.container} at {self._endpoint}"
        status = getattr(exc, "status_code", None) if isinstance(exc, HttpResponseError) else None
        code = _code(exc)
        no_answer = status is None or status < 400 or isinstance(exc, DecodeError)
        if no_answer and not isinstance(exc, ClientAuthenticationError):
            # no error answer from the service: refused or reset connection, timeout, truncated body
            detail = _URL_QUERY.sub("?…", f"{type(exc).__name__}: {exc}".splitlines()[0])
            return TransientError(
                f"{what} {where}: {detail}", key=key, hint="check that the Blob endpoint is reachable and healthy"
            )
        reason = getattr(exc, "reason", None)
        if status is None:  # refused before any answer (e.g. while signing the request)
            detail = _URL_QUERY.sub("?…", f"{type(exc).__name__}: {exc}".splitlines()[0])
        else:
            detail = f"HTTP {status} {code}".rstrip() + (f": {reason}" if reason else "")
        message = f"{what} {where}: {detail}"
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return AccessDenied(message, key=key, hint=CREDENTIALS_HINT)
        if code == "ContainerNotFound":
            return PermanentError(
                message,
                key=key,
                hint=f"create the container first (az storage container create --name {self.container}) or fix "
                "the container in the repository URL",
            )
        if isinstance(mode, CreateOnly) and (status == 412 or code == "BlobAlreadyExists"):
            return AlreadyExists(f"object {key} already exists ({where})", key=key)
        if isinstance(mode, IfVersion) and (status == 412 or code == "BlobNotFound"):
            return PreconditionFailed(f"object {key} changed since version {mode.version} ({where})", key=key)
        if status == 404:
            return NotFound(f"object {key} not found ({where})", key=key)
        if status == 412 and mode is None:
            return PermanentError(message, key=key, hint="the object was replaced while being read; read it again")
        if status in (408, 429) or (status is not None and status >= 500) or code in ("ServerBusy", "InternalError"):
            return TransientError(message, key=key, hint="the service is busy or failing; retried until the deadline")
        return PermanentError(message, key=key)

    @contextmanager
    def _guard(self, what: str, key: str, mode: WriteMode | None = None) -> Iterator[None]:
        try:
            yield
        except _sdk_errors() as exc:
            raise self._error(exc, what, key, mode) from exc

    def _info(self, key: str, size: int, etag: str, modified: Any) -> ObjectInfo:
        return ObjectInfo(key, size, _version(etag), modified.timestamp() if modified is not None else None)

    def _download(self, key: str, offset: int, length: int | None) -> Any:
        """Start a download; the first GET (up to FIRST_GET_SIZE) happens here, so NotFound is eager."""
        blob = self._blob(key)
        with self._guard("cannot read", key):
            if offset == 0 and length is None:
                # a whole read without a range: the SDK then handles empty blobs (a ranged GET of one is a 416)
                return blob.download_blob()
            return blob.download_blob(offset=offset, length=length)

    # -- the contract -------------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        blob = self._blob(key)
        with self._guard("cannot stat", key):
            props = blob.get_blob_properties()
        return self._info(key, props.size, props.etag, props.last_modified)

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        if length == 0:
            self.stat(key)  # NotFound eagerly, then nothing to read
            return _AzureReader(self, key, iter(()))
        try:
            downloader = self._download(key, offset, length)
        except PermanentError as exc:
            if _code(exc.__cause__) != "InvalidRange":
                raise
            self.stat(key)  # a range starting at or past the end: empty, if the blob exists
            return _AzureReader(self, key, iter(()))
        reader = _AzureReader(self, key, downloader.chunks())
        reader.size = int(downloader.size)
        return reader

    def get_bytes_versioned(self, key: str) -> tuple[bytes, str]:
        """Data and ETag from one download; later GETs of a large object are pinned to that ETag by the SDK."""
        while True:
            downloader = self._download(key, 0, None)
            try:
                with self._guard("cannot read", key):
                    data = downloader.readall()
            except PermanentError as exc:
                if getattr(exc.__cause__, "status_code", None) == 412:
                    continue  # replaced between two GETs of a large object: read the new version
                raise
            return data, _version(downloader.properties.etag)

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        return _AzureWriter(self, check_key(key), mode)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        start = self._root + prefix
        with self._guard("cannot list", prefix or "/"):
            pages = self._container.list_blobs(
                name_starts_with=start, results_per_page=self.capabilities.list_page_size
            ).by_page()
        while True:
            with self._guard("cannot list", prefix or "/"):
                page = next(pages, None)  # one List Blobs request per page, only when the caller wants more
                if page is None:
                    return
                items = list(page)
            for props in items:
                yield self._info(props.name[len(self._root) :], props.size, props.etag, props.last_modified)

    def delete_many(self, keys: Iterable[str]) -> None:
        names = [self._name(k) for k in keys]
        size = max(1, self.capabilities.delete_batch_size)
        if len(names) == 1:
            self._delete_one(names[0])  # one plain request is cheaper than a batch of one
            return
        for start in range(0, len(names), size):
            self._delete_batch(names[start : start + size])

    def _delete_one(self, name: str) -> None:
        try:
            with self._guard("cannot delete", name[len(self._root) :]):
                self._container.delete_blob(name, delete_snapshots="include")
        except NotFound:
            return

    def _delete_batch(self, names: Sequence[str]) -> None:
        """One Blob Batch request; a sub-request answering 404 is fine, any other failure is raised."""
        key = names[0][len(self._root) :]
        with self._guard("cannot delete (batch)", key):
            responses = list(
                self._container.delete_blobs(*names, delete_snapshots="include", raise_on_any_failure=False)
            )
        for name, response in zip(names, responses, strict=True):
            status = int(response.status_code)
            if status < 300 or status == 404:
                continue
            key = name[len(self._root) :]
            where = f"azure blob {name} in container {self.container} (batch delete: HTTP {status})"
            if status in (401, 403):
                raise AccessDenied(f"cannot delete {where}", key=key, hint=CREDENTIALS_HINT)
            if status in (408, 429) or status >= 500:
                raise TransientError(f"cannot delete {where}", key=key)
            raise PermanentError(f"cannot delete {where}", key=key)


class _AzureReader(ObjectReader):
    """Copies the downloader's chunks (READ_CHUNK_SIZE each, fetched one at a time) into the caller's buffer."""

    def __init__(self, storage: AzureStorage, key: str, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._chunks = chunks
        self._chunk = memoryview(b"")

    def readinto(self, buffer: Any) -> int:
        while not self._chunk:
            with self._storage._guard("cannot read", self._key):
                chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk = memoryview(chunk)
        n = min(len(buffer), len(self._chunk))
        buffer[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n

    def close(self) -> None:
        self._chunk = memoryview(b"")
        super().close()


class _AzureWriter(PartWriter):
    """Put Blob for one block; Put Block per block and Put Block List to publish larger objects."""

    def __init__(self, storage: AzureStorage, key: str, mode: WriteMode) -> None:
        super().__init__(key, mode, storage.block_size)
        self._storage = storage
        self._client = storage._blob(key)
        self._initial = storage.block_size
        self._writer = uuid.uuid4().hex[:16]
        self._attempted = False  # a publishing request was sent before (its outcome may be unknown)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # Feed the buffer at most one block at a time so each block gets its size from the schedule.
        view = memoryview(data).cast("B")
        if not view:
            return super().write(view)
        start = 0
        while start < len(view):
            self.part_size = block_size_for(self._parts, self._initial)
            super().write(view[start : start + self.part_size])
            start += self.part_size
        return len(view)

    def _block_id(self, number: int) -> str:
        return BLOCK_ID_FORMAT.format(writer=self._writer, number=number)  # the SDK base64-encodes it

    def _conditions(self) -> dict[str, Any]:
        from azure.core import MatchConditions

        if isinstance(self.mode, CreateOnly):
            return {"match_condition": MatchConditions.IfMissing}  # If-None-Match: *
        if isinstance(self.mode, IfVersion):
            return {"etag": self.mode.version, "match_condition": MatchConditions.IfNotModified}  # If-Match
        return {}

    def _publish(self, send: Callable[[], dict[str, Any]], size: int) -> ObjectInfo:
        retry = self._attempted
        self._attempted = True
        try:
            with self._storage._guard("cannot write", self.key, self.mode):
                response = send()
        except (AlreadyExists, PreconditionFailed, PermanentError) as exc:
            mine = self._own_commit(exc, retry)
            if mine is None:
                raise
            return mine
        return self._storage._info(self.key, size, response["etag"], response.get("last_modified"))

    def _own_commit(self, exc: StorageError, retry: bool) -> ObjectInfo | None:
        """After a conflict, our own earlier commit (response lost) if that is what the blob holds now.

        Also turns InvalidBlockList (our staged blocks were discarded by a concurrent commit) into the conflict
        the write mode expects when the blob has changed.
        """
        lost_blocks = _code(exc.__cause__) == "InvalidBlockList"
        if not retry and not lost_blocks:
            return None
        try:
            props = self._client.get_blob_properties()
        except _sdk_errors():
            return None
        if retry and (props.metadata or {}).get(WRITER_META) == self._writer:
            return self._storage._info(self.key, props.size, props.etag, props.last_modified)
        if lost_blocks and isinstance(self.mode, CreateOnly):
            raise AlreadyExists(f"object {self.key} already exists", key=self.key) from exc
        if lost_blocks and isinstance(self.mode, IfVersion) and _version(props.etag) != self.mode.version:
            raise PreconditionFailed(
                f"object {self.key} changed since version {self.mode.version}", key=self.key
            ) from exc
        if lost_blocks:
            raise PermanentError(
                f"{exc.message}; another writer committed {self.key} during the upload, which discarded its blocks",
                key=self.key,
                hint="write the object again",
            ) from exc
        return None

    def _put_whole(self, data: bytes) -> ObjectInfo:
        overwrite = not isinstance(self.mode, CreateOnly)
        meta = {WRITER_META: self._writer}
        return self._publish(
            lambda: self._client.upload_blob(
                data, length=len(data), overwrite=overwrite, metadata=meta, **self._conditions()
            ),
            len(data),
        )

    def _begin(self) -> None:
        return None  # blocks are staged under the blob's name; there is no upload session to create

    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        if number >= MAX_BLOCKS - 1:  # keep the last block for _finish
            raise PermanentError(
                f"object {self.key} is too large for one Azure blob (more than {max_object_size(self._initial)} "
                f"bytes in {MAX_BLOCKS} blocks)",
                key=self.key,
                hint="split the data into several objects",
            )
        self._stage(number, data)

    def _stage(self, number: int, data: bytes) -> None:
        # Thread-safe for distinct numbers: reads only attributes fixed at construction. Idempotent: staging
        # the same id again replaces the block.
        with self._storage._guard("cannot upload block of", self.key):
            self._client.stage_block(self._block_id(number), data, length=len(data))

    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        ids = [self._block_id(n) for n in range(number)]
        if data:
            self._stage(number, data)
            ids.append(self._block_id(number))
        meta = {WRITER_META: self._writer}
        return self._publish(
            lambda: self._client.commit_block_list(ids, metadata=meta, **self._conditions()), offset + len(data)
        )

    def _cancel(self) -> None:
        # Staged blocks cannot be deleted on their own (deleting the blob would delete another writer's
        # committed object); they are invisible, and the service discards them after a week.
        return None
