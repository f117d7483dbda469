"""``s3://bucket/prefix`` backend: Amazon S3 and S3-compatible stores, through botocore.

Write modes are conditional requests, so checking and publishing are one atomic step on the server:
``CreateOnly`` sends ``If-None-Match: *`` and ``IfVersion(etag)`` sends ``If-Match: etag``, on PutObject and on
CompleteMultipartUpload alike. The version is the ETag with its quotes, as S3 returns it everywhere.

Objects up to one part are stored with a single PutObject; larger ones with a multipart upload
(:mod:`cloudbk.storage.s3writer`). An upload that is aborted, or never completed because the process died, is
invisible; its parts cost storage until a bucket lifecycle rule (AbortIncompleteMultipartUpload) or
``cloudbk retention`` removes them (``capabilities.incomplete_uploads``).

Listings are returned in S3 key order even from stores that page them as a directory walk (``_walk``).

botocore is used directly (no boto3 resource layer, no s3transfer) and imported only when an ``s3://``
repository is opened: an ``archive_command`` pays for what it uses. Its own retries are off; the retry layer
(:mod:`cloudbk.storage.retry`) retries by error class. Request/response checksums keep botocore's defaults,
which ``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION`` can relax for stores that
reject them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from cloudbk.errors import (
    AccessDenied,
    AlreadyExists,
    CloudbkError,
    IntegrityError,
    NotFound,
    PermanentError,
    PreconditionFailed,
    TransientError,
)
from cloudbk.redact import redact_url
from cloudbk.storage.base import (
    OVERWRITE,
    Capabilities,
    CreateOnly,
    IfVersion,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Storage,
    UploadInfo,
    WriteMode,
    check_key,
    check_prefix,
)
from cloudbk.storage.deadline import WatchedBody
from cloudbk.storage.s3client import READ_TIMEOUT, make_client
from cloudbk.storage.s3writer import DEFAULT_PART_SIZE, S3Writer, etag_version

if TYPE_CHECKING:
    from cloudbk.storage.base import StorageOptions
# DeleteObjects takes at most 1,000 keys, https://docs.aws.amazon.com/AmazonS3/latest/API/API_DeleteObjects.html
MAX_DELETE_KEYS = 1000


_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
        "403",
    }
)
# Worth retrying: throttling, server trouble, a request cut short, a conditional write racing another one
# (409 ConditionalRequestConflict: retried, the next attempt reports the real outcome).
_TRANSIENT = frozenset(
    {
        "BadDigest",
        "ConditionalRequestConflict",
        "IncompleteBody",
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "XAmzContentSHA256Mismatch",
    }
)


def _denied_hint(bucket: str) -> str:
    return (
        "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and "
        f"that they may get, put, list and delete objects in bucket {bucket}; RequestTimeTooSkewed means this "
        "machine's clock is wrong"
    )


class S3Storage(Storage):
    scheme = "s3"
    capabilities = Capabilities(delete_batch_size=MAX_DELETE_KEYS, incomplete_uploads=True)
    #: base part size of multipart uploads; parts grow from it (``part_size_for``)
    part_size: int = DEFAULT_PART_SIZE
    #: list level by level (see ``_walk``) rather than flat; the default with a custom endpoint, because
    #: filer-backed stores (SeaweedFS) page a flat listing as a tree walk, out of key order
    list_by_directory: bool = False

    def __init__(self, url: str, bucket: str, prefix: str, options: StorageOptions) -> None:
        super().__init__(url)
        self.bucket = bucket
        self.prefix = prefix
        self._root = f"{prefix}/" if prefix else ""
        env = options.environ
        self.endpoint_url = (
            options.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        )
        self._client = make_client(url, self.endpoint_url, env)
        self._bucket_seen = False  # once the bucket has answered, a code-less 404 is about the object
        self.list_by_directory = self.endpoint_url is not None

    # -- helpers --------------------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._root + check_key(key)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._root}{key}"

    @contextmanager
    def _errors(self, what: str, key: str, mode: WriteMode = OVERWRITE) -> Iterator[None]:
        """Translate SDK and network errors raised in the block into the storage taxonomy."""
        try:
            yield
        except CloudbkError:
            raise
        except Exception as exc:
            error = self._translate(exc, what, key, mode)
            if error is None:
                raise
            raise error from exc

    def _translate(self, exc: Exception, what: str, key: str, mode: WriteMode) -> CloudbkError | None:
        import http.client

        from botocore import exceptions as bx
        from urllib3.exceptions import HTTPError as Urllib3Error

        where = self._where(key)
        if isinstance(exc, bx.ClientError):
            meta = exc.response.get("ResponseMetadata", {})
            error = exc.response.get("Error", {})
            return self._classify(
                str(error.get("Code", "")), meta.get("HTTPStatusCode"), str(error.get("Message", "")), what, key, mode
            )
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return AccessDenied(
                f"{what} {where}: no usable AWS credentials: {exc}", key=key, hint=_denied_hint(self.bucket)
            )
        if isinstance(exc, bx.FlexibleChecksumError):
            return IntegrityError(
                f"{what} {where}: the data received does not match the checksum S3 sent: {exc}",
                key=key,
                hint="run the command again; if it fails the same way the stored object is damaged",
            )
        if isinstance(
            exc,
            (
                bx.ConnectionError,
                bx.HTTPClientError,
                bx.IncompleteReadError,
                bx.MetadataRetrievalError,
                Urllib3Error,
                http.client.HTTPException,
                ConnectionError,
                TimeoutError,
            ),
        ):
            endpoint = redact_url(self.endpoint_url) if self.endpoint_url else "the AWS S3 endpoint"
            return TransientError(
                f"{what} {where}: network error talking to {endpoint}: {exc}",
                key=key,
                hint="check that the endpoint (--endpoint-url / CLOUDBK_ENDPOINT_URL) is reachable",
            )
        if isinstance(exc, bx.BotoCoreError):
            return PermanentError(f"{what} {where}: {exc}", key=key)
        return None

    def _classify(
        self, code: str, status: int | None, message: str, what: str, key: str, mode: WriteMode
    ) -> CloudbkError:
        """One S3 error answer -> the storage taxonomy (also used for DeleteObjects per-key errors)."""
        where = self._where(key)
        detail = f"{code or status}: {message}" if message and message != code else str(code or status)
        text = f"{what} {where} failed: {detail}"
        if code == "PreconditionFailed" or status == 412:
            if isinstance(mode, CreateOnly):
                return AlreadyExists(f"{where} already exists", key=key)
            if isinstance(mode, IfVersion):
                return PreconditionFailed(f"{where} has changed: its version is no longer {mode.version}", key=key)
        if code == "NoSuchBucket":
            return self._no_bucket(key)
        if code in _NOT_FOUND or (status == 404 and code != "NoSuchUpload"):
            if isinstance(mode, IfVersion):  # S3 answers If-Match on an absent key with 404
                return PreconditionFailed(f"{where} does not exist (expected version {mode.version})", key=key)
            return NotFound(f"object {where} not found", key=key)
        if code in _DENIED or status == 403:
            return AccessDenied(text, key=key, hint=_denied_hint(self.bucket))
        if code in _TRANSIENT or status == 429 or (status is not None and status >= 500):
            return TransientError(text, key=key)
        if code == "NoSuchUpload":
            return PermanentError(
                text, key=key, hint="the multipart upload was aborted (a lifecycle rule?); write the object again"
            )
        return PermanentError(text, key=key)

    # -- the contract -------------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        full = self._full(key)
        try:
            with self._errors("stat", key):
                response = self._client.head_object(Bucket=self.bucket, Key=full)
        except NotFound:
            self._check_bucket(key)  # a HEAD's 404 has no body, so no code: the bucket may be what is missing
            raise
        self._bucket_seen = True
        modified = response.get("LastModified")
        return ObjectInfo(
            key,
            int(response["ContentLength"]),
            etag_version(response["ETag"]),
            modified.timestamp() if modified else None,
        )

    def _no_bucket(self, key: str) -> PermanentError:
        """The one message for a missing bucket, whether a GET said so or a HEAD of the bucket did."""
        return PermanentError(
            f"bucket {self.bucket} does not exist (looking for {self._where(key)})",
            key=key,
            hint=f"create bucket {self.bucket} (aws s3 mb s3://{self.bucket}) or fix the repository URL; "
            "cloudbk does not create buckets",
        )

    def _check_bucket(self, key: str) -> None:
        """Raise "bucket does not exist" if it does not; once it has answered, trust it exists."""
        if self._bucket_seen:
            return
        try:
            with self._errors("stat", key):
                self._client.head_bucket(Bucket=self.bucket)
        except NotFound as exc:
            raise self._no_bucket(key) from exc
        except AccessDenied:
            pass  # we may not HEAD the bucket; the 404 was the object's
        self._bucket_seen = True

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        full = self._full(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range of {key}: offset {offset}, length {length}")
        if length == 0:
            self.stat(key)  # NotFound eagerly, even for an empty range
            return _EmptyReader()
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            params["Range"] = f"bytes={offset}-{end}"
        try:
            with self._errors("read", key):
                response = self._client.get_object(**params)
        except PermanentError as exc:
            # 416 InvalidRange: the range starts at or past the end; the object exists, the range is empty.
            if getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code") == "InvalidRange":
                return _EmptyReader()
            raise
        reader = _S3Reader(self, key, response["Body"])
        reader.size = int(response["ContentLength"]) if "ContentLength" in response else None
        return reader

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        return S3Writer(self, key, mode)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        full = self._root + prefix
        items = self._walk(full) if self.list_by_directory else self._flat(full)
        last: str | None = None
        for item in items:
            key = item["Key"][len(self._root) :]
            if key.endswith("/"):
                continue  # a "folder" marker made by a console; never a cloudbk key
            if last is not None and key <= last:  # S3 Express directory buckets, for one, list unsorted
                raise PermanentError(
                    f"list {self._where(prefix)}: the store returned keys out of order ({last!r}, {key!r})",
                    key=prefix,
                    hint="use a general-purpose bucket, or a store that lists keys in UTF-8 order",
                )
            last = key
            modified = item.get("LastModified")
            yield ObjectInfo(
                key, int(item["Size"]), etag_version(item["ETag"]), modified.timestamp() if modified else None
            )

    def _pages(self, full_prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        while True:
            params["MaxKeys"] = self.capabilities.list_page_size
            with self._errors("list", full_prefix[len(self._root) :]):
                page: dict[str, Any] = self._client.list_objects_v2(**params)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            params["ContinuationToken"] = token

    def _flat(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        for page in self._pages(full_prefix, None):
            yield from page.get("Contents", ())

    def _walk(self, full_prefix: str) -> Iterator[dict[str, Any]]:
        """List one "directory" level with Delimiter="/" and descend into each sub-prefix in key order.

        Correct whether the store pages a level in key order (S3: ``a-b`` < ``a/`` < ``a0``) or in name order,
        a sub-prefix sorting as its bare name (``a`` < ``a-b``), as filer-backed gateways do. After a page,
        every later entry sorts after the greatest name seen, so what sorts up to it is final; a sub-prefix
        waits (as one string) until a name beyond it has been seen.
        """
        pending: list[tuple[str, dict[str, Any] | None]] = []  # (key, item) or (sub-prefix, None)
        for page in self._pages(full_prefix, "/"):
            entries: list[tuple[str, dict[str, Any] | None]] = [(i["Key"], i) for i in page.get("Contents", ())]
            entries += [(p["Prefix"], None) for p in page.get("CommonPrefixes", ())]
            if not entries:
                continue
            bound = max(name.removesuffix("/") if item is None else name for name, item in entries)
            pending = sorted(pending + entries, key=lambda entry: entry[0])
            ready = 0
            while ready < len(pending) and pending[ready][0] <= bound:
                ready += 1
            done, pending = pending[:ready], pending[ready:]
            yield from self._emit(done)
        yield from self._emit(pending)

    def _emit(self, entries: Sequence[tuple[str, dict[str, Any] | None]]) -> Iterator[dict[str, Any]]:
        for name, item in entries:
            if item is None:
                yield from self._walk(name)
            else:
                yield item

    def delete_many(self, keys: Iterable[str]) -> None:
        full = [self._full(key) for key in keys]  # validate every key before deleting any
        size = max(1, self.capabilities.delete_batch_size)
        for start in range(0, len(full), size):
            self._delete_batch(full[start : start + size])

    def _delete_batch(self, batch: Sequence[str]) -> None:
        first = batch[0][len(self._root) :]
        with self._errors(f"delete ({len(batch)} keys from)", first):
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
        failed = [e for e in response.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
        if failed:
            what = "delete" if len(failed) == 1 else f"delete ({len(failed)} keys failed, first)"
            error = failed[0]
            key = str(error.get("Key", batch[0]))[len(self._root) :]
            raise self._classify(str(error.get("Code", "")), None, str(error.get("Message", "")), what, key, OVERWRITE)

    def get_bytes_versioned(self, key: str) -> tuple[bytes, str]:
        # One GetObject: the ETag it returns belongs to the bytes it returns.
        full = self._full(key)
        with self._errors("read", key):
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            body = _watched(response["Body"])
            try:
                data = body.read()
            finally:
                body.close()
        return bytes(data), etag_version(response["ETag"])

    def list_uploads(self, prefix: str = "") -> Iterator[UploadInfo]:
        from cloudbk.storage.s3uploads import list_uploads

        return list_uploads(self, prefix)

    def abort_upload(self, upload: UploadInfo) -> None:
        from cloudbk.storage.s3uploads import abort_upload

        abort_upload(self, upload)

    def close(self) -> None:
        self._client.close()


def _watched(body: Any) -> Any:
    """The GetObject body, its reads made one socket read each and bounded by the current watch.

    botocore's StreamingBody (and its checksum-validating subclass) read ``_raw_stream``, the urllib3
    response, with a buffered ``read(n)``; standing a WatchedBody in its place keeps their length and checksum
    checks and gets control back after every socket read.
    """
    raw = getattr(body, "_raw_stream", None)
    if raw is not None and hasattr(raw, "read1"):
        body._raw_stream = WatchedBody(raw, READ_TIMEOUT)
    return body


class _EmptyReader(ObjectReader):
    def readinto(self, buffer: Any) -> int:
        return 0


class _S3Reader(ObjectReader):
    """Streams a GetObject body; network errors mid-stream become ``TransientError`` (the retry layer resumes)."""

    def __init__(self, storage: S3Storage, key: str, body: Any) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._body = _watched(body)

    def readinto(self, buffer: Any) -> int:
        with self._storage._errors("read", self._key):
            return int(self._body.readinto(buffer))

    def readall(self) -> bytes:
        with self._storage._errors("read", self._key):
            return bytes(self._body.read())  # chunk by chunk: WatchedBody

    def close(self) -> None:
        if not self.closed:
            with suppress(Exception):  # closing a broken connection must not mask the real error
                self._body.close()
        super().close()
