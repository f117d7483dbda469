"""URL scheme -> storage driver, imported lazily so a ``file://`` command never loads a cloud SDK."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from cloudbk.errors import UsageError
from cloudbk.redact import redact_url
from cloudbk.storage.base import Storage, StorageOptions

__all__ = ["SCHEMES", "ParsedURL", "StorageOptions", "open_driver", "open_storage", "parse_url"]

SCHEMES = ("file", "s3", "gs", "azure", "memory")


@dataclass(frozen=True)
class ParsedURL:
    scheme: str
    container: str  # bucket / container; empty for file:// and memory://
    prefix: str  # key prefix inside the container (no leading or trailing '/'); the path for file://


def parse_url(url: str) -> ParsedURL:
    """Split and validate a repository URL; raise ``UsageError`` with a hint when it is malformed."""
    hint = "use s3://bucket/prefix, gs://bucket/prefix, azure://container/prefix or file:///absolute/path"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        raise UsageError(
            f"repository URL {redact_url(url)} must not hold a user name or password",
            hint="remove the 'user:password@' part; credentials come from each SDK's own chain (AWS_* variables, "
            "AZURE_STORAGE_*, application default credentials), never from the URL",
        )
    if scheme not in SCHEMES:
        raise UsageError(f"unsupported repository URL {url!r}: unknown scheme {parts.scheme!r}", hint=hint)
    if parts.query or parts.fragment:
        raise UsageError(f"repository URL {url!r} must not have a query or fragment", hint=hint)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"repository URL {url!r}: file:// URLs take an absolute path", hint=hint)
        path = parts.path
        if not path.startswith("/"):
            raise UsageError(f"repository URL {url!r}: file:// URLs take an absolute path", hint=hint)
        return ParsedURL("file", "", os.path.normpath(path))
    if scheme == "memory":
        return ParsedURL("memory", parts.netloc, parts.path.strip("/"))
    if not parts.netloc:
        raise UsageError(f"repository URL {url!r} names no bucket or container", hint=hint)
    prefix = parts.path.strip("/")
    if "//" in prefix:
        raise UsageError(f"repository URL {url!r} has an empty path segment", hint=hint)
    return ParsedURL(scheme, parts.netloc, prefix)


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """The storage for ``url``: its driver wrapped in the retry layer with ``options.retry_deadline``."""
    from cloudbk.storage.retry import RetryingStorage, RetryPolicy

    options = options or StorageOptions()
    return RetryingStorage(open_driver(url, options), RetryPolicy(deadline=options.retry_deadline))


def open_driver(url: str, options: StorageOptions | None = None) -> Storage:
    """Build the bare driver for ``url`` (no retries). Only this function names concrete backends."""
    options = options or StorageOptions()
    parsed = parse_url(url)
    if parsed.scheme == "file":
        from cloudbk.storage.local import LocalStorage

        return LocalStorage(url, parsed.prefix)
    if parsed.scheme == "memory":
        from cloudbk.storage.memory import MemoryStorage

        return MemoryStorage.named(url)
    if parsed.scheme == "s3":
        from cloudbk.storage.s3 import S3Storage

        return S3Storage(url, parsed.container, parsed.prefix, options)
    if parsed.scheme == "azure":
        from cloudbk.storage.azure import AzureStorage

        return AzureStorage(url, parsed.container, parsed.prefix, options)
    from cloudbk.storage.gcs import GCSStorage

    return GCSStorage(url, parsed.container, parsed.prefix, options)
