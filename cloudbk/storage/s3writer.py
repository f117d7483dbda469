"""The writer of an ``s3://`` object: one PutObject, or a multipart upload once the data outgrows one part.

The part size grows with the part count (:func:`part_size_for`), so a stream of unknown length never runs out
of parts, while the parts held in memory stay few (``IN_FLIGHT_BYTES``). ``CreateOnly`` and ``IfVersion``
are sent as ``If-None-Match: *`` / ``If-Match`` on PutObject and CompleteMultipartUpload alike.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from typing import TYPE_CHECKING

from cloudbk.errors import PermanentError, UsageError
from cloudbk.storage.base import CreateOnly, IfVersion, ObjectInfo, WriteMode
from cloudbk.storage.parts import PartWriter

if TYPE_CHECKING:
    from cloudbk.storage.s3 import S3Storage

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

# Amazon S3 multipart upload limits, https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html
MIN_PART_SIZE = 5 * MiB  # every part but the last
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000  # part numbers 1 .. 10,000
MAX_OBJECT_SIZE = 5 * TiB

DEFAULT_PART_SIZE = 8 * MiB
# Part ``n`` is ``base + PART_GROWTH * (n // PARTS_PER_STEP)`` bytes: the first 128 parts (1 GiB with the
# default base) keep the base size, then parts grow linearly, so 10,000 parts hold more than MAX_OBJECT_SIZE
# from a 5 MiB base while the part in memory grows only like sqrt(object size): ~56 MiB at 10 GiB,
# ~160 MiB at 100 GiB, ~0.5 GiB at 1 TiB. tests/storage/test_s3_specific.py checks the sums.
PART_GROWTH = 16 * MiB
PARTS_PER_STEP = 128
# PartWriter uploads several parts at once; as parts grow, fewer of them go in flight so their memory stays
# within this budget (but two at least, so big parts still overlap): 4 x 8 MiB or 16 MiB, 2 x 160 MiB at 100 GiB.
IN_FLIGHT_BYTES = 32 * MiB


def part_size_for(number: int, base: int = DEFAULT_PART_SIZE) -> int:
    """Size of part ``number`` (0-based) of a stream of unknown length; see ``PART_GROWTH``."""
    return min(MAX_PART_SIZE, base + PART_GROWTH * (number // PARTS_PER_STEP))


def etag_version(etag: str) -> str:
    """The ETag in its quoted form, whichever form the server used (the CAS token must compare equal)."""
    return '"' + etag.strip('"') + '"'


class S3Writer(PartWriter):
    """A PutObject, or a multipart upload once the data outgrows one part."""

    def __init__(self, storage: S3Storage, key: str, mode: WriteMode) -> None:
        self._storage = storage
        self._full_key = storage._full(key)
        self._conditions: dict[str, str] = {}
        if isinstance(mode, CreateOnly):
            self._conditions = {"IfNoneMatch": "*"}
        elif isinstance(mode, IfVersion):
            self._conditions = {"IfMatch": etag_version(mode.version)}
        self._upload_id: str | None = None
        self._etags: dict[int, str] = {}  # part number (1-based) -> ETag
        self._lock = threading.Lock()  # parts are uploaded from several threads
        self._max_in_flight = PartWriter.parts_in_flight
        super().__init__(key, mode, storage.part_size)

    # PartWriter cuts the buffer into ``part_size`` pieces; growing it with the part count keeps a stream of
    # any length within MAX_PARTS. ``_parts`` counts the parts already cut.
    @property
    def part_size(self) -> int:
        return part_size_for(self._parts, self._base_part_size)

    @part_size.setter
    def part_size(self, value: int) -> None:
        if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
            raise UsageError(f"S3 part size {value} is outside {MIN_PART_SIZE}..{MAX_PART_SIZE} bytes")
        self._base_part_size = value

    @property
    def parts_in_flight(self) -> int:
        if self._max_in_flight <= 1:
            return self._max_in_flight
        return min(self._max_in_flight, max(2, IN_FLIGHT_BYTES // self.part_size))

    @parts_in_flight.setter
    def parts_in_flight(self, value: int) -> None:
        self._max_in_flight = value

    def _put_whole(self, data: bytes) -> ObjectInfo:
        s = self._storage
        with s._errors("write", self.key, self.mode):
            response = s._client.put_object(
                Bucket=s.bucket,
                Key=self._full_key,
                Body=data,
                ContentType="application/octet-stream",
                **self._conditions,
            )
        return ObjectInfo(self.key, len(data), etag_version(response["ETag"]))

    def _begin(self) -> None:
        s = self._storage
        with s._errors("start upload of", self.key):
            response = s._client.create_multipart_upload(
                Bucket=s.bucket, Key=self._full_key, ContentType="application/octet-stream"
            )
        self._upload_id = str(response["UploadId"])

    def _upload_part(self, number: int, offset: int, data: bytes) -> None:
        s = self._storage
        part_number = number + 1
        if part_number > MAX_PARTS:
            raise PermanentError(
                f"write {s._where(self.key)}: more than {MAX_PARTS} parts ({offset} bytes written)",
                key=self.key,
                hint=f"S3 objects are limited to {MAX_OBJECT_SIZE // TiB} TiB",
            )
        with s._errors(f"upload part {part_number} of", self.key):
            response = s._client.upload_part(
                Bucket=s.bucket, Key=self._full_key, UploadId=self._upload_id, PartNumber=part_number, Body=data
            )
        with self._lock:
            self._etags[part_number] = str(response["ETag"])

    def _finish(self, number: int, offset: int, data: bytes) -> ObjectInfo:
        s = self._storage
        if data or not self._etags:
            self._upload_part(number, offset, data)
        with self._lock:
            parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(self._etags.items())]
        with s._errors("complete upload of", self.key, self.mode):
            response = s._client.complete_multipart_upload(
                Bucket=s.bucket,
                Key=self._full_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
                **self._conditions,
            )
        return ObjectInfo(self.key, offset + len(data), etag_version(response["ETag"]))

    def _cancel(self) -> None:
        if self._upload_id is None:
            return
        s = self._storage
        with suppress(Exception):  # best effort by contract; a lifecycle rule removes what is left
            s._client.abort_multipart_upload(Bucket=s.bucket, Key=self._full_key, UploadId=self._upload_id)
