"""Incomplete multipart uploads of an ``s3://`` repository: listed and aborted for ``cloudbk retention``.

A writer that dies mid-upload (SIGKILL, a crash, a lost machine) cannot abort its multipart upload: the parts
stay stored, and billed, invisible to LIST, until AbortMultipartUpload or a bucket lifecycle rule
(AbortIncompleteMultipartUpload, see docs/lifecycle.md) removes them. Which uploads are stale is decided in
:mod:`cloudbk.repo.inflight`; this module only talks to S3.

ListMultipartUploads pages by (key, upload id) markers, up to 1,000 uploads a page
(https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListMultipartUploads.html). Not every store pages in key
order (SeaweedFS does not, and leaves ``NextKeyMarker`` out of a truncated page), so the markers are taken
from the last upload of a page when the answer has none, uploads already seen are skipped, and a page that
brings nothing new ends the listing. An upload a store's odd paging hides stays for the next retention run,
which sees it once the ones before it are aborted: being stale is never urgent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cloudbk.storage.base import UploadInfo, check_prefix

if TYPE_CHECKING:
    from cloudbk.storage.s3 import S3Storage

# ListMultipartUploads returns at most 1,000 uploads per page (MaxUploads), as ListObjectsV2 does keys.
MAX_UPLOADS_PER_PAGE = 1000


def list_uploads(storage: S3Storage, prefix: str) -> Iterator[UploadInfo]:
    """Every incomplete multipart upload whose key starts with ``prefix`` (relative to the repository root)."""
    check_prefix(prefix)
    root = storage._root
    params: dict[str, Any] = {"Bucket": storage.bucket, "Prefix": root + prefix, "MaxUploads": MAX_UPLOADS_PER_PAGE}
    seen: set[str] = set()
    while True:
        with storage._errors("list incomplete uploads under", prefix):
            page: dict[str, Any] = storage._client.list_multipart_uploads(**params)
        uploads = page.get("Uploads", ())
        new = [u for u in uploads if str(u["UploadId"]) not in seen]
        for upload in new:
            seen.add(str(upload["UploadId"]))
            initiated = upload.get("Initiated")
            yield UploadInfo(
                str(upload["Key"])[len(root) :],
                str(upload["UploadId"]),
                initiated.timestamp() if initiated is not None else None,
            )
        if not page.get("IsTruncated") or not new:
            return
        params["KeyMarker"] = page.get("NextKeyMarker") or uploads[-1]["Key"]
        params["UploadIdMarker"] = page.get("NextUploadIdMarker") or uploads[-1]["UploadId"]


def abort_upload(storage: S3Storage, upload: UploadInfo) -> None:
    """Abort one upload and free its parts; an upload that is gone already (aborted, completed) is fine."""
    from botocore.exceptions import ClientError

    with storage._errors("abort the incomplete upload of", upload.key):
        try:
            storage._client.abort_multipart_upload(
                Bucket=storage.bucket, Key=storage._full(upload.key), UploadId=upload.upload_id
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
