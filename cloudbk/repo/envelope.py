"""The self-describing object format: every data object cloudbk stores starts with a small header.

    MAGIC (8 bytes, b"CLOUDBK\\x01") | header length (4 bytes, big-endian) | header (UTF-8 JSON) | payload

The header names the format version, the compression of the payload and, where known before the upload
starts (WAL files), the SHA-256 and size of the uncompressed content; for streams whose digest is only known
at the end (base backup tars) the per-backup manifest holds it. An object copied between backends keeps
everything needed to check it. See docs/format.md.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from cloudbk.errors import IntegrityError, refuse_newer_format

MAGIC = b"CLOUDBK\x01"
#: the kinds of content an object holds (the header's ``kind``)
WAL = "wal"
TAR = "tar"
FORMAT_VERSION = 1
MAX_HEADER = 64 * 1024  # a header is a few hundred bytes; anything larger is garbage, not a header
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Header:
    kind: str  # "wal" | "tar"
    name: str  # the WAL file name, or the tar's name inside the backup
    compression: str
    sha256: str | None = None  # of the uncompressed content, when known before the upload
    size: int | None = None  # uncompressed size, when known before the upload
    format_version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + _LEN.pack(len(body)) + body


def _read_exact(reader: Any, n: int, key: str) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = reader.read(n - len(out))
        if not chunk:
            raise IntegrityError(f"object {key} is truncated: its header is incomplete", key=key)
        out += chunk
    return bytes(out)


def read_header(reader: Any, key: str) -> Header:
    """Consume and validate the header at the start of ``reader``; the payload follows."""
    magic = _read_exact(reader, len(MAGIC), key)
    if magic != MAGIC:
        raise IntegrityError(
            f"object {key} is not a cloudbk object (bad magic {magic!r})",
            key=key,
            hint="the object was written by another tool or is corrupt; do not use it for recovery",
        )
    (length,) = _LEN.unpack(_read_exact(reader, _LEN.size, key))
    if length > MAX_HEADER:
        raise IntegrityError(f"object {key} has an implausible header length {length}", key=key)
    try:
        data = json.loads(_read_exact(reader, length, key))
        header = Header(**data)
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"object {key} has an unreadable header: {exc}", key=key) from exc
    refuse_newer_format("object", key, header.format_version, FORMAT_VERSION)
    return header
