"""Writes of the ``gs://`` backend: one multipart request for an object that fits in a part, a resumable
upload of google-resumable-media for a larger one, both under the write mode's ``ifGenerationMatch``.

A resumable upload (``google.resumable_media.requests.ResumableUpload``) reads its chunks from a
:class:`_Feed`: the parts :class:`~cloudbk.storage.parts.PartWriter` hands over, kept until the session has
confirmed them. A chunk is sent only once a whole chunk is in hand (GCS takes non-final chunks in multiples of
256 KiB only), so a session that persisted part of a chunk gets the rest with the next part's bytes; the last
part ends the stream, and the chunk short of ``chunk_size`` (or the empty one after it) completes the upload.
Memory: the part in flight, handed to the request as it is, and after a partly persisted chunk the rest of
the previous part: at most ``2 * part_size`` (16 MiB), usually one part.

After a request went unanswered, the next attempt first asks the session how far it got (``recover()``), and
continues from there; a session that turns out complete is checked rather than resumed. Each upload tags the
object with a random token, so a write whose success answer was lost is recognised as ours when its retry is
refused (412, or a session gone). Stored size and CRC32C are checked against what was sent; an object that
differs is deleted, never left published. GCS checks the precondition when the upload completes; it is
also checked when the session opens, so a doomed upload fails before sending gigabytes (and because
fake-gcs-server 1.54 ignores it at completion).
"""

from __future__ import annotations

import base64
import importlib
import io
import secrets
from typing import Any
from urllib.parse import quote

from cloudbk.errors import (
    AlreadyExists,
    IntegrityError,
    PermanentError,
    PreconditionFailed,
    StorageError,
    TransientError,
)
from cloudbk.storage.base import CreateOnly, IfVersion, ObjectInfo, WriteMode
from cloudbk.storage.gcs import CONTENT_TYPE, GCSStorage, status_of
from cloudbk.storage.parts import PartWriter

TOKEN_FIELD = "cloudbk-writer"  # custom metadata naming the upload that wrote the object


def _crc32c(data: bytes, crc: int = 0) -> int:
    import google_crc32c

    return int(google_crc32c.extend(crc, data))


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


class _Feed(io.RawIOBase):
    """The stream a resumable upload reads: the parts handed over and not yet confirmed by the session.

    Parts are kept as they came, and a chunk that is exactly one part is handed out as that very object, so
    the bytes in flight are the part's own (no copy).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[tuple[int, bytes]] = []  # (offset, data), contiguous, in order
        self.base = 0  # offset of the first byte not yet confirmed
        self.end = 0  # offset after the last byte handed over
        self.position = 0

    def add(self, offset: int, data: bytes, key: str) -> None:
        if offset == self.end:
            if data:
                self.pieces.append((offset, data))
                self.end += len(data)
        elif offset < self.base or offset + len(data) > self.end:  # else a retried part, in hand already
            raise PermanentError(f"upload of {key}: part at {offset} does not follow {self.end}", key=key)

    def confirmed(self, upto: int) -> None:
        """The session holds the bytes before ``upto``: drop them."""
        upto = min(upto, self.end)
        while self.pieces and self.pieces[0][0] + len(self.pieces[0][1]) <= upto:
            self.pieces.pop(0)
        if self.pieces and self.pieces[0][0] < upto:  # the session persisted part of a chunk
            offset, data = self.pieces[0]
            self.pieces[0] = (upto, data[upto - offset :])
        self.base = max(self.base, upto)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or not self.base <= position <= self.end:
            raise ValueError(f"the upload asks for offset {position}, outside {self.base}..{self.end} in hand")
        self.position = position
        return position

    def read(self, size: int = -1) -> bytes:
        stop = self.end if size < 0 else min(self.end, self.position + size)
        out = []
        for offset, data in self.pieces:
            low, high = max(offset, self.position), min(offset + len(data), stop)
            if low < high:
                whole = low == offset and high == offset + len(data)
                out.append(data if whole else data[low - offset : high - offset])
        chunk = out[0] if len(out) == 1 else b"".join(out)
        self.position += len(chunk)
        return chunk


class GCSWriter(PartWriter):
    #: A resumable session takes its chunks in order, one at a time.
    parallel_parts = False

    def __init__(self, storage: GCSStorage, key: str, mode: WriteMode) -> None:
        super().__init__(key, mode, storage.part_size)
        self._s = storage
        self._token = secrets.token_hex(16)
        self._upload: Any = None  # google.resumable_media.requests.ResumableUpload, once begun
        self._feed = _Feed()
        self._crc = 0  # CRC32C of the bytes handed to parts so far
        self._unsure = False  # a request went unanswered (or 5xx): it may or may not have taken effect

    # -- helpers ------------------------------------------------------------------------------------------

    def _generation_match(self) -> int | None:
        if isinstance(self.mode, IfVersion):
            if not self.mode.version.isdigit():
                raise PreconditionFailed(f"version {self.mode.version!r} of {self.key} is no GCS generation")
            return int(self.mode.version)
        return 0 if isinstance(self.mode, CreateOnly) else None

    def _mode_error(self) -> StorageError:
        where = self._s.where(self.key)
        if isinstance(self.mode, IfVersion):
            message = f"object {self.key} is no longer at version {self.mode.version} ({where})"
            return PreconditionFailed(message, key=self.key)
        return AlreadyExists(f"object {self.key} already exists ({where})", key=self.key)

    def _refused(self, exc: BaseException, what: str) -> StorageError:
        """The error for a failed upload request; marks the attempt unsure when it may have taken effect."""
        status = status_of(exc)
        if status == 412:
            return self._mode_error()
        if status == 404 and self._upload is None:
            return self._s.no_bucket("write", self.key)
        if status in (404, 410):  # fake-gcs-server forgets a session once it completes
            return PermanentError(
                f"the upload session of {self._s.where(self.key)} expired or was cancelled",
                key=self.key,
                hint="run the operation again (a resumable upload session lives one week)",
            )
        error = self._s.error(exc, what, self.key)
        if error is None:
            raise exc
        if isinstance(error, TransientError):
            self._unsure = True
        return error if isinstance(error, StorageError) else TransientError(error.message, key=self.key)

    def _ours_or(self, error: StorageError, was_unsure: bool) -> ObjectInfo:
        """After a refusal: our own object if an unanswered attempt had in fact completed the write (the
        object carries our token), else raise ``error``."""
        if was_unsure and not isinstance(error, TransientError):
            found = self._s.metadata(self.key)
            if found is not None and found[1].get(TOKEN_FIELD) == self._token:
                return found[0]
        raise error

    def _verify(self, info: ObjectInfo, crc32c: str | None, size: int, crc: int) -> ObjectInfo:
        """Check what GCS stored against what was sent; a bad object is deleted, never left published."""
        if info.size == size and crc32c in (None, _b64(crc)):
            return info
        try:
            blob = self._s.blob(self.key)
            blob.delete(if_generation_match=int(info.version), retry=None, timeout=self._s.timeout())
        except Exception:  # best effort: the error below is what matters
            pass
        raise IntegrityError(
            f"{self._s.where(self.key)} was stored as {info.size} bytes (crc32c {crc32c}) but {size} bytes "
            f"(crc32c {_b64(crc)}) were sent; the stored object was deleted",
            key=self.key,
            hint="retry; if it happens again, the endpoint or a proxy on the way corrupts uploads",
        )

    # -- PartWriter primitives ----------------------------------------------------------------------------

    def _put_whole(self, data: bytes) -> ObjectInfo:
        crc = _crc32c(data)
        blob = self._s.blob(self.key)
        blob.metadata = {TOKEN_FIELD: self._token}
        was_unsure, self._unsure = self._unsure, False
        try:
            blob.upload_from_file(
                io.BytesIO(data),
                size=len(data),
                content_type=CONTENT_TYPE,
                if_generation_match=self._generation_match(),
                checksum="crc32c",  # declared in the request: GCS rejects a body that differs
                retry=None,
                timeout=self._s.timeout(),
            )
        except Exception as exc:
            error = self._refused(exc, "write")
            if error is exc:
                raise
            try:
                return self._verify(self._ours_or(error, was_unsure), None, len(data), crc)
            except StorageError as final:
                raise final from exc
        return self._verify(self._s.info(self.key, blob), blob.crc32c, len(data), crc)

    def _begin(self) -> None:
        media: Any = importlib.import_module("google.resumable_media.requests")  # Any: not annotated
        common: Any = importlib.import_module("google.resumable_media.common")

        match = self._generation_match()
        if match is not None:
            # GCS checks the precondition only when the upload completes: check now too.
            found = self._s.metadata(self.key)
            if (found[0].version if found else "0") != str(match):
                raise self._mode_error()
        bucket = quote(self._s.bucket_name, safe="")
        url = f"{self._s.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=resumable"
        if match is not None:
            url += f"&ifGenerationMatch={match}"
        upload = media.ResumableUpload(url, self.part_size)
        upload._retry_strategy = common.RetryStrategy(max_retries=0)  # as documented: the retry layer retries
        metadata = {"name": self._s.name(self.key), "contentType": CONTENT_TYPE, "metadata": {TOKEN_FIELD: self._token}}
        try:
            upload.initiate(
                self._s.http, self._feed, metadata, CONTENT_TYPE, stream_final=False, timeout=self._s.timeout()
            )
        except Exception as exc:
            error = self._refused(exc, "start upload of")
            if error is exc:
                raise
            raise error from exc
        self._upload = upload

    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        if offset == self._feed.end:  # the first attempt at this part (a retry comes with the same offset)
            self._crc = _crc32c(data, self._crc)
        self._feed.add(offset, data, self.key)
        self._pump(final=False)

    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        if offset == self._feed.end:
            self._crc = _crc32c(data, self._crc)
        self._feed.add(offset, data, self.key)
        total = self._feed.end
        done = self._pump(final=True)
        assert done is not None
        info, crc32c = done
        return self._verify(info, crc32c, total, self._crc)

    def _pump(self, final: bool) -> tuple[ObjectInfo, str | None] | None:
        """Send whole chunks (with ``final``, everything, completing the upload); the object once complete."""
        upload = self._upload
        was_unsure = self._unsure
        try:
            if self._unsure:
                done = self._recover(final)
                if done is not None:
                    return done
            while True:
                self._feed.confirmed(upload.bytes_uploaded)
                if not final and self._feed.end - upload.bytes_uploaded < upload.chunk_size:
                    return None
                self._feed.seek(upload.bytes_uploaded)
                was_unsure, self._unsure = self._unsure, True
                response = upload.transmit_next_chunk(self._s.http, timeout=self._s.timeout())
                self._unsure = False
                if upload.finished:
                    return self._completed(response.json())
        except StorageError:
            raise
        except Exception as exc:
            error = self._refused(exc, "upload to")
            if error is exc:
                raise
            try:
                info = self._ours_or(error, was_unsure)
            except StorageError as final_error:
                raise final_error from exc
            return info, None

    def _recover(self, final: bool) -> tuple[ObjectInfo, str | None] | None:
        """Ask the session how far it got; a complete session gives the object (only welcome at the end)."""
        try:
            self._upload.recover(self._s.http)
        except Exception as exc:
            status = status_of(exc)
            if status not in (200, 201):
                raise
            done = self._completed(exc.response.json())  # type: ignore[attr-defined]
            if final:
                return done
            self._verify(done[0], None, -1, 0)  # complete before its end: delete it, and say so
        self._unsure = False
        return None

    def _completed(self, meta: dict[str, Any]) -> tuple[ObjectInfo, str | None]:
        blob = self._s.blob(self.key)
        blob._set_properties(meta)
        return self._s.info(self.key, blob), meta.get("crc32c")

    def _cancel(self) -> None:
        upload, self._upload = self._upload, None
        if upload is not None and upload.resumable_url and not upload.finished:
            try:  # GCS answers 499; resumable-media has no cancel of its own
                self._s.http.request("DELETE", upload.resumable_url, timeout=self._s.timeout()).close()
            except Exception:
                pass
