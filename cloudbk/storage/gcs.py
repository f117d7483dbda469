"""``gs://`` backend: Google Cloud Storage through its JSON API, spoken with ``requests``.

Not ``google.cloud.storage``: it is slow to import (``archive_command`` pays that per segment), retries on its
own and hides the resumable-session states handled here. Only ``google.auth`` is used, for ADC.

Writes: an object that fits in one part is one ``multipart`` insert, its CRC32C declared so GCS rejects a
corrupted body. Larger objects use a resumable session: ``_begin`` opens it with the mode's
``ifGenerationMatch``, each part is a PUT of its chunk at its offset, ``_finish`` sends the last chunk with the
total size; nothing is visible before, and GCS evaluates the precondition then. A retried chunk is re-sent at
its offset (GCS ignores bytes it holds; its 308 says how far it got); a retried *final* chunk starts with a
status query, as the upload may have completed. Each upload tags the object with a random token, so a write
whose success answer was lost is recognised as ours when its retry is refused. Stored size and CRC32C are
checked against what was sent. Reads: one streaming GET per ``open_read``, whatever the size.

Credentials (SPEC §1), from ``options.environ``: ``STORAGE_EMULATOR_HOST`` -> that endpoint, anonymous; else
application default credentials, against ``options.endpoint_url`` if given.

fake-gcs-server 1.54 ignores ``ifGenerationMatch`` on ``uploadType=media`` (hence ``multipart``) and when a
resumable upload completes (hence the up-front check in ``_begin``); it appends a re-sent chunk and completes
an upload on a status query, which ``_verify`` then catches as a size mismatch.
"""

from __future__ import annotations

import base64
import contextvars
import importlib
import json
import re
import secrets
import sys
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from cloudbk.errors import (
    AccessDenied,
    AlreadyExists,
    IntegrityError,
    NotFound,
    PermanentError,
    PreconditionFailed,
    StorageError,
    TransientError,
)
from cloudbk.redact import redact_url
from cloudbk.storage.base import (
    OVERWRITE,
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
from cloudbk.storage.deadline import WatchedBody, request_timeout
from cloudbk.storage.parts import PartWriter

if TYPE_CHECKING:
    import requests

    from cloudbk.storage.base import StorageOptions

GCS_ENDPOINT = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
# "Chunk sizes must be a multiple of 256 KiB (256 x 1024 bytes), unless it's the last chunk"
# (cloud.google.com/storage/docs/performing-resumable-uploads). 8 MiB, as the Google SDKs use.
CHUNK_ALIGN = 256 * 1024
CHUNK_SIZE = 32 * CHUNK_ALIGN
# The JSON API deletes one object per request (fake-gcs-server has no batch endpoint): do a few at once.
DELETE_THREADS = 8
TOKEN_FIELD = "cloudbk-writer"  # custom metadata naming the upload that wrote the object
CONTENT_TYPE = "application/octet-stream"
ACCESS_HINT = (
    "check the credentials (GOOGLE_APPLICATION_CREDENTIALS or application default credentials) and that the "
    "identity holds roles/storage.objectUser (or objectAdmin) on the bucket"
)
_SESSION_ID = re.compile(r"upload_id=[^&\s'\"]+")  # a resumable session URI lets anyone upload into it


def _crc32c(data: bytes, crc: int = 0) -> int:
    import google_crc32c

    return int(google_crc32c.extend(crc, data))


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _transport_error_class(exc: BaseException) -> type[StorageError] | None:
    """The taxonomy class of an exception raised while talking to the server; None if it is not one."""
    import requests
    import urllib3

    auth = sys.modules.get("google.auth.exceptions")  # loaded only on the ADC path
    if auth is not None and isinstance(exc, auth.RefreshError):
        return TransientError if getattr(exc, "retryable", False) else AccessDenied
    if auth is not None and isinstance(exc, auth.TransportError):
        return TransientError
    network = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    if isinstance(exc, network):
        return TransientError  # refused, reset, timed out, cut short
    if isinstance(exc, requests.RequestException):
        return PermanentError  # a malformed URL or request: retrying will not help
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return TransientError  # raised by a streaming body, below requests
    return None


class GCSStorage(Storage):
    scheme = "gs"
    #: bytes per resumable chunk, and the largest object stored with a single request
    part_size: int = CHUNK_SIZE
    #: (connect, read) seconds; the read timeout bounds each wait for the server, not a whole transfer
    timeout: tuple[float, float] = (10.0, 60.0)

    def __init__(self, url: str, bucket: str, prefix: str, options: StorageOptions) -> None:
        super().__init__(url)
        self.bucket = bucket
        self.prefix = prefix
        self._bucket_seen = False  # once the bucket has answered, a 404 is about the object
        self._session, self.endpoint = self._connect(options.environ, options.endpoint_url)
        self._objects_url = f"{self.endpoint}/storage/v1/b/{quote(bucket, safe='')}/o"
        self._upload_url = f"{self.endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o"

    @staticmethod
    def _connect(environ: Mapping[str, str], endpoint_url: str | None) -> tuple[requests.Session, str]:
        import requests
        from requests.adapters import HTTPAdapter

        emulator = environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            session = requests.Session()  # anonymous
            endpoint = emulator if "://" in emulator else f"http://{emulator}"
        else:
            auth: Any = importlib.import_module("google.auth")  # Any: google-auth is only partly annotated
            transport: Any = importlib.import_module("google.auth.transport.requests")
            try:
                key_file = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
                if key_file:
                    credentials, _ = auth.load_credentials_from_file(key_file, scopes=[SCOPE])
                else:
                    credentials, _ = auth.default(scopes=[SCOPE])
            except auth.exceptions.DefaultCredentialsError as exc:
                raise AccessDenied(f"no usable Google Cloud credentials: {exc}", hint=ACCESS_HINT) from exc
            session = transport.AuthorizedSession(credentials)
            endpoint = endpoint_url or GCS_ENDPOINT
        adapter = HTTPAdapter(pool_maxsize=4 * DELETE_THREADS, max_retries=0)  # retries are the retry layer's
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session, endpoint.rstrip("/")

    # -- plumbing -----------------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None = None) -> str:
        return f"gs://{self.bucket}/{self._name(key) if key else self.prefix}"

    def _object_url(self, key: str) -> str:
        return f"{self._objects_url}/{quote(self._name(key), safe='')}"

    def _request(self, method: str, url: str, what: str, key: str | None, **kwargs: Any) -> requests.Response:
        """Send one request; failing to get an answer raises. The status is the caller's to judge."""
        try:
            connect, read = self.timeout  # each wait at most the time left to the current deadline
            timeout = (request_timeout(connect), request_timeout(read))
            return self._session.request(method, url, timeout=timeout, allow_redirects=False, **kwargs)
        except Exception as exc:
            cls = _transport_error_class(exc)
            if cls is None:
                raise
            detail = _SESSION_ID.sub("upload_id=...", f"{type(exc).__name__}: {exc}")
            hint = ACCESS_HINT if cls is AccessDenied else f"check that {redact_url(self.endpoint)} is reachable"
            raise cls(f"{what} {self._where(key)}: {detail}", key=key, hint=hint) from exc

    def _error(self, resp: requests.Response, what: str, key: str | None) -> StorageError:
        """The error for an unexpected status (404 on an object goes through ``_missing``)."""
        try:
            detail = str(resp.json()["error"]["message"])[:300]
        except Exception:  # any body at all: the status is what matters
            detail = resp.reason or ""
        finally:
            resp.close()
        status = resp.status_code
        message = f"{what} {self._where(key)} failed: HTTP {status} {detail}".rstrip()
        if status in (401, 403):
            return AccessDenied(message, key=key, hint=ACCESS_HINT)
        if status in (408, 429) or status >= 500:
            return TransientError(message, key=key)
        return PermanentError(message, key=key)

    def _no_bucket(self, what: str, key: str | None) -> PermanentError:
        return PermanentError(
            f"bucket gs://{self.bucket} does not exist (trying to {what} {self._where(key)})",
            key=key,
            hint=f"create the bucket (gcloud storage buckets create gs://{self.bucket}) or fix the repository URL",
        )

    def _missing(self, resp: requests.Response, what: str, key: str) -> StorageError:
        """A 404 on an object: ``NotFound``, unless the bucket is what is missing."""
        resp.close()
        if not self._bucket_seen:  # GCS answers 404 to both; a one-item listing tells them apart
            probe = self._request("GET", self._objects_url, "list", None, params={"maxResults": "1"})
            if probe.status_code == 404:
                probe.close()
                return self._no_bucket(what, key)
            if probe.status_code not in (200, 403):  # 403: we may not list; the 404 was the object's
                return self._error(probe, f"{what} (checking the bucket of)", key)
            probe.close()
            self._bucket_seen = True
        return NotFound(f"object {key} not found in {self._where()}", key=key)

    def _info(self, key: str, meta: Mapping[str, Any]) -> ObjectInfo:
        updated = meta.get("updated")
        modified = datetime.fromisoformat(updated).timestamp() if updated else None
        return ObjectInfo(key, int(meta["size"]), str(meta["generation"]), modified)

    def _object_meta(self, key: str, what: str) -> dict[str, Any]:
        resp = self._request("GET", self._object_url(key), what, key)
        if resp.status_code == 404:
            raise self._missing(resp, what, key)
        if resp.status_code != 200:
            raise self._error(resp, what, key)
        self._bucket_seen = True
        meta: dict[str, Any] = resp.json()
        return meta

    def _download(self, key: str, offset: int, length: int | None, stream: bool) -> requests.Response | None:
        """GET the bytes; None when the range starts at or past the end of the (existing) object."""
        headers = {"Accept-Encoding": "identity"}  # the stored bytes, never a transcoded form
        if offset or length is not None:
            headers["Range"] = f"bytes={offset}-{'' if length is None else offset + length - 1}"
        params = {"alt": "media"}
        resp = self._request("GET", self._object_url(key), "read", key, params=params, headers=headers, stream=stream)
        if resp.status_code == 404:
            raise self._missing(resp, "read", key)
        if resp.status_code == 416:
            resp.close()
            return None
        if resp.status_code not in (200, 206) or (resp.status_code == 200 and "Range" in headers):
            raise self._error(resp, "read", key)  # a 200 to a ranged GET would hand out the wrong bytes
        self._bucket_seen = True
        return resp

    # -- the contract -------------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        return self._info(key, self._object_meta(key, "stat"))

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        if length == 0:
            self.stat(key)  # NotFound eagerly, even for an empty range
            return _GCSReader(key, None)
        return _GCSReader(key, self._download(key, offset, length, stream=True))

    def get_bytes_versioned(self, key: str) -> tuple[bytes, str]:
        """One GET: the bytes and the generation they belong to (``x-goog-generation``)."""
        resp = self._download(key, 0, None, stream=True)
        generation = resp.headers.get("x-goog-generation") if resp is not None else None
        if resp is None or not generation:
            if resp is not None:
                resp.close()
            return super().get_bytes_versioned(key)
        with _GCSReader(key, resp) as reader:
            return reader.read(), generation

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        if self.part_size % CHUNK_ALIGN:
            raise ValueError(f"GCS part size {self.part_size} is not a multiple of {CHUNK_ALIGN}")
        return _GCSWriter(self, key, mode)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        fields = "items(name,size,generation,updated),nextPageToken"
        params = {"prefix": root + prefix, "maxResults": str(self.capabilities.list_page_size), "fields": fields}
        last: str | None = None
        while True:
            resp = self._request("GET", self._objects_url, "list", None, params=params)
            if resp.status_code == 404:
                resp.close()
                raise self._no_bucket("list", prefix or None)
            if resp.status_code != 200:
                raise self._error(resp, "list", None)
            self._bucket_seen = True
            page = resp.json()
            for item in page.get("items", []):
                key = item["name"][len(root) :]
                if not key or key.endswith("/"):
                    continue  # a "folder" placeholder made by the console, not a key
                if last is not None and key <= last:  # the retry layer resumes listings by key order
                    raise PermanentError(f"listing of {self._where()} is not sorted at {key!r}")
                last = key
                yield self._info(key, item)
            if not page.get("nextPageToken"):
                return
            params["pageToken"] = page["nextPageToken"]

    def delete_many(self, keys: Iterable[str]) -> None:
        checked = [check_key(key) for key in keys]

        def delete(key: str) -> StorageError | None:
            resp = self._request("DELETE", self._object_url(key), "delete", key)
            if resp.status_code in (200, 204, 404):  # absent keys are fine
                resp.close()
                return None
            return self._error(resp, "delete", key)

        if not checked:
            return
        with ThreadPoolExecutor(max_workers=min(DELETE_THREADS, len(checked))) as pool:
            # each in a copy of the caller's context: the deletes see its deadline (cloudbk.storage.deadline)
            futures = [pool.submit(contextvars.copy_context().run, delete, key) for key in checked]
        failures = [e for e in (f.exception() or f.result() for f in futures) if e is not None]
        if failures:  # every delete was tried; a retry repeats them all, so raise the least retryable
            raise min(failures, key=lambda e: isinstance(e, TransientError))

    def close(self) -> None:
        self._session.close()


class _GCSReader(ObjectReader):
    """Streams one GET response; a dropped connection or an early end raises ``TransientError``."""

    def __init__(self, key: str, resp: requests.Response | None) -> None:
        super().__init__()
        self._key = key
        self._resp = resp
        # one socket read per readinto, each bounded by the current watch (cloudbk.storage.deadline)
        self._body = WatchedBody(resp.raw, GCSStorage.timeout[1]) if resp is not None else None
        length = resp.headers.get("Content-Length") if resp is not None else "0"
        self._remaining = int(length) if length is not None else None

    def readinto(self, buffer: Any) -> int:
        if self._body is None or self._remaining == 0:
            return 0
        view = memoryview(buffer).cast("B")[: self._remaining]
        try:
            n = self._body.readinto(view)
        except Exception as exc:
            if _transport_error_class(exc) is None:
                raise
            raise TransientError(f"read of {self._key} interrupted: {exc}", key=self._key) from exc
        if self._remaining is not None:
            if not n:
                raise TransientError(f"read of {self._key} ended {self._remaining} bytes early", key=self._key)
            self._remaining -= n
        return n

    def close(self) -> None:
        if not self.closed and self._resp is not None:
            self._resp.close()
        super().close()


class _GCSWriter(PartWriter):
    #: A resumable session takes its chunks in order, one at a time.
    parallel_parts = False

    def __init__(self, storage: GCSStorage, key: str, mode: WriteMode) -> None:
        super().__init__(key, mode, storage.part_size)
        self._s = storage
        self._name = storage._name(key)
        self._token = secrets.token_hex(16)
        self._session_url: str | None = None  # a capability: kept out of messages and logs
        self._persisted = 0  # bytes the session has confirmed
        self._crc = 0  # CRC32C of the bytes handed to parts so far ...
        self._crc_end = 0  # ... which end here
        self._unsure = False  # a request went unanswered (or 5xx): it may or may not have taken effect

    def _conditions(self) -> dict[str, str]:
        if isinstance(self.mode, IfVersion):
            if not self.mode.version.isdigit():
                raise PreconditionFailed(f"version {self.mode.version!r} of {self.key} is no GCS generation")
            return {"ifGenerationMatch": self.mode.version}
        return {"ifGenerationMatch": "0"} if isinstance(self.mode, CreateOnly) else {}

    def _metadata(self, crc: int | None = None) -> dict[str, Any]:
        meta = {"name": self._name, "contentType": CONTENT_TYPE, "metadata": {TOKEN_FIELD: self._token}}
        return meta if crc is None else {**meta, "crc32c": _b64(crc)}  # GCS rejects a body that differs

    def _http(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response:
        try:
            resp = self._s._request(method, url, what, self.key, **kwargs)
        except TransientError:
            self._unsure = True
            raise
        self._unsure = resp.status_code in (408, 429) or resp.status_code >= 500
        return resp

    def _mode_error(self) -> StorageError:
        if isinstance(self.mode, IfVersion):
            message = f"object {self.key} is no longer at version {self.mode.version} ({self._s._where(self.key)})"
            return PreconditionFailed(message, key=self.key)
        return AlreadyExists(f"object {self.key} already exists ({self._s._where(self.key)})", key=self.key)

    def _ours_or(self, resp: requests.Response, was_unsure: bool, error: StorageError) -> dict[str, Any]:
        """After a refusal (412, session gone): our own object if an unanswered attempt had in fact
        completed the write (the object carries our token), else raise ``error``."""
        resp.close()
        if was_unsure:
            try:
                meta = self._s._object_meta(self.key, "write")
            except NotFound:
                meta = {}
            if (meta.get("metadata") or {}).get(TOKEN_FIELD) == self._token:
                return meta
        raise error

    def _verify(self, meta: Mapping[str, Any], size: int, crc: int) -> ObjectInfo:
        """Check what GCS stored against what was sent; a bad object is deleted, never left published."""
        if int(meta["size"]) == size and meta.get("crc32c") in (None, _b64(crc)):
            return self._s._info(self.key, meta)
        try:
            params = {"ifGenerationMatch": meta["generation"]}
            self._s._request("DELETE", self._s._object_url(self.key), "delete", self.key, params=params).close()
        except StorageError:
            pass
        raise IntegrityError(
            f"{self._s._where(self.key)} was stored as {meta['size']} bytes (crc32c {meta.get('crc32c')}) but "
            f"{size} bytes (crc32c {_b64(crc)}) were sent; the stored object was deleted",
            key=self.key,
            hint="retry; if it happens again, the endpoint or a proxy on the way corrupts uploads",
        )

    def _track(self, offset: int, data: bytes) -> None:
        if offset == self._crc_end:  # the first attempt at this part (a retry comes with the same offset)
            self._crc, self._crc_end = _crc32c(data, self._crc), offset + len(data)

    # -- PartWriter primitives ----------------------------------------------------------------------------

    def _put_whole(self, data: bytes) -> ObjectInfo:
        crc = _crc32c(data)
        boundary = secrets.token_hex(16)  # random: cannot occur in the metadata, and in data only by chance
        head = f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps(self._metadata(crc))}"
        head += f"\r\n--{boundary}\r\nContent-Type: {CONTENT_TYPE}\r\n\r\n"
        body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
        params = {"uploadType": "multipart", **self._conditions()}
        headers = {"Content-Type": f"multipart/related; boundary={boundary}"}
        was_unsure = self._unsure
        resp = self._http("POST", self._s._upload_url, "write", params=params, data=body, headers=headers)
        if resp.status_code == 412:
            return self._verify(self._ours_or(resp, was_unsure, self._mode_error()), len(data), crc)
        if resp.status_code == 404:
            resp.close()
            raise self._s._no_bucket("write", self.key)
        if resp.status_code not in (200, 201):
            raise self._s._error(resp, "write", self.key)
        return self._verify(resp.json(), len(data), crc)

    def _begin(self) -> None:
        conditions = self._conditions()
        if conditions:
            # GCS checks the precondition only when the upload completes: check now too, so a doomed upload
            # fails before sending gigabytes (and because fake-gcs-server never checks it at completion).
            try:
                current: str | None = self._s.stat(self.key).version
            except NotFound:
                current = None
            if current != (self.mode.version if isinstance(self.mode, IfVersion) else None):
                raise self._mode_error()
        params = {"uploadType": "resumable", "name": self._name, **conditions}
        headers = {"X-Upload-Content-Type": CONTENT_TYPE}
        what = "start upload of"
        resp = self._http("POST", self._s._upload_url, what, params=params, json=self._metadata(), headers=headers)
        if resp.status_code == 404:
            resp.close()
            raise self._s._no_bucket("write", self.key)
        if resp.status_code not in (200, 201) or "Location" not in resp.headers:
            raise self._s._error(resp, what, self.key)
        resp.close()
        self._session_url = resp.headers["Location"]

    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        self._track(offset, data)
        self._put_chunks(offset, data, None)

    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        self._track(offset, data)
        total = offset + len(data)
        meta = None
        if self._unsure:  # the unanswered request may have completed the upload: ask first
            meta = self._put_chunks(self._persisted, b"", total, status_only=True)
        if meta is None:
            meta = self._put_chunks(offset, data, total)
        assert meta is not None
        return self._verify(meta, total, self._crc)

    def _put_chunks(
        self, offset: int, data: bytes, total: int | None, status_only: bool = False
    ) -> dict[str, Any] | None:
        """Bring the session to ``offset + len(data)`` bytes; with ``total``, complete it.

        Sends from the last confirmed offset (GCS ignores bytes it already holds); a 308 whose ``Range``
        stops short means "send the rest". Returns the object's metadata once complete, else None.
        """
        assert self._session_url is not None
        end = offset + len(data)
        size = "*" if total is None else str(total)
        while True:
            if total is None and self._persisted == end:
                return None  # never send "bytes */*": fake-gcs-server would complete the upload
            if not offset <= self._persisted <= end:
                raise PermanentError(
                    f"upload of {self.key}: the session holds {self._persisted} bytes, not {offset}..{end}",
                    key=self.key,
                    hint="run the operation again",
                )
            chunk = b"" if status_only else data[self._persisted - offset :]
            # "bytes */N" asks for the status, or completes an upload whose bytes are all there
            content_range = f"bytes {self._persisted}-{end - 1}/{size}" if chunk else f"bytes */{size}"
            was_unsure = self._unsure
            resp = self._http(
                "PUT", self._session_url, "upload to", data=chunk, headers={"Content-Range": content_range}
            )
            if resp.status_code == 412:
                return self._ours_or(resp, was_unsure, self._mode_error())
            if resp.status_code in (404, 410):  # fake-gcs-server forgets a session once it completes
                gone = PermanentError(
                    f"the upload session of {self._s._where(self.key)} expired or was cancelled",
                    key=self.key,
                    hint="run the operation again (a resumable upload session lives one week)",
                )
                return self._ours_or(resp, was_unsure, gone)
            if resp.status_code in (200, 201) and total is not None:
                meta: dict[str, Any] = resp.json()
                return meta
            if resp.status_code != 308:
                raise self._s._error(resp, "upload to", self.key)
            held = resp.headers.get("Range")  # "bytes=0-N": N+1 bytes persisted; no header: none
            resp.close()
            self._persisted = int(held.rsplit("-", 1)[1]) + 1 if held else 0
            if status_only:
                return None

    def _cancel(self) -> None:
        if self._session_url is not None:
            url, self._session_url = self._session_url, None
            self._s._request("DELETE", url, "cancel upload of", self.key).close()  # GCS answers 499
