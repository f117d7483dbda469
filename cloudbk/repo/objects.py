"""The one object codec: how every data object (WAL files, backup tar streams) is written and opened.

    write:  plain bytes -> compressor -> [encryption, later] -> storage writer, after the envelope header
    open:   storage reader -> envelope header (kind, name checked) -> [decryption, later] -> decompressor
            -> plain bytes, counted and hashed; at the end checked against the expected size and SHA-256

Both directions stream: memory is bounded by the compressor's window and one chunk, never by the object
size. The expected size and SHA-256 come from the header when it records them (WAL), else from the caller
(a backup manifest's ``tars[].size`` / ``sha256``). The format is docs/format.md, "Object envelope".

The JSON documents (the index, manifests, keep marks, heartbeats) are not data objects: they carry no
envelope but their own ``format_version``, and are read and written whole (``get_bytes`` / ``put_bytes``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudbk.errors import IntegrityError
from cloudbk.repo.compression import READ_CHUNK, SELF_CHECKING, CompressingWriter, DecompressingReader
from cloudbk.repo.envelope import TAR, WAL, Header, read_header
from cloudbk.storage.base import CREATE_ONLY, ObjectInfo, ObjectReader, ObjectWriter, Storage, WriteMode

__all__ = ["TAR", "WAL", "ObjectSink", "ObjectSource", "StoredObject", "create_object", "open_object", "read_object"]

_WORDS = {WAL: "WAL file", TAR: "tar stream"}
_DAMAGED = "the stored copy is damaged or truncated; it is not used for recovery"


@dataclass(frozen=True)
class StoredObject:
    """What a write committed, or what a read to the end verified."""

    header: Header
    sha256: str  # of the plain content
    size: int  # plain bytes
    stored_size: int  # bytes in storage: envelope header + compressed payload


class ObjectSink:
    """A streaming write of one object: ``write`` plain bytes, then ``commit`` (or ``abort``).

    The header is written first; the payload goes through the compressor. When the header records a SHA-256
    and size, ``commit`` refuses (``IntegrityError``, nothing stored) content that does not match them, and
    it refuses a commit whose stored size the storage reports differently from the bytes sent.
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        header: Header,
        mode: WriteMode = CREATE_ONLY,
        threads: int = 0,
        source: str | None = None,
        parts_in_flight: int | None = None,
    ) -> None:
        self.key = key
        self.header = header
        self.source = source  # the local file the content comes from, named if it changes under us
        self._writer: ObjectWriter = storage.open_write(key, mode)
        try:
            if parts_in_flight is not None:
                self._writer.limit_parts(parts_in_flight)
            encoded = header.encode()
            self._writer.write(encoded)
            self._header_size = len(encoded)
            # the seam for encryption: a cipher would sit between the compressor and the writer
            self._compressor = CompressingWriter(header.compression, self._writer, threads=threads)
        except BaseException:
            self._writer.abort()
            raise

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._compressor.write(data)

    def commit(self) -> StoredObject:
        """End the payload and publish the object, honouring the write mode."""
        try:
            self._compressor.finish()
            c = self._compressor
            if (self.header.sha256 is not None and c.sha256 != self.header.sha256) or (
                self.header.size is not None and c.size != self.header.size
            ):
                what = self.source or f"the content written to {self.key}"
                raise IntegrityError(
                    f"{what} changed while it was being archived: {c.size} bytes with sha256 {c.sha256[:16]}…, "
                    f"its header records {self.header.size} bytes with sha256 {str(self.header.sha256)[:16]}…",
                    key=self.source or self.key,
                    hint="nothing was stored; a file must not change once it is handed over for archiving",
                )
            info: ObjectInfo = self._writer.commit()
        except BaseException:
            self.abort()
            raise
        sent = self._header_size + self._compressor.compressed_size
        if info.size != sent:
            raise IntegrityError(
                f"storage reports {info.size} bytes stored for {self.key}, {sent} were sent",
                key=self.key,
                hint="the stored object is not trusted; check the storage, then move the object aside so the write "
                "can be retried",
            )
        return StoredObject(self.header, self._compressor.sha256, self._compressor.size, info.size)

    def abort(self) -> None:
        """Discard everything written; never raises."""
        self._writer.abort()


class _Counting(io.RawIOBase):
    """Counts the stored bytes read, so the stored size is known without another request."""

    def __init__(self, inner: ObjectReader) -> None:
        super().__init__()
        self._inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer) or 0
        self.count += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


class ObjectSource(io.RawIOBase):
    """An opened object: ``read`` gives the plain content; reading to the end verifies it.

    Reading past the expected size, or an end whose size or SHA-256 differs from the expected ones, raises
    ``IntegrityError`` naming the key. ``finish`` reads what is left and returns what was verified. A reader
    that stops early (the first bytes of a segment) has verified nothing; it just closes.
    """

    def __init__(
        self, key: str, raw: _Counting, header: Header, size: int | None, sha256: str | None, origin: str, hint: str,
        hashing: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.key = key
        self.header = header
        self._raw = raw
        self._size = size
        self._sha256 = sha256
        self._origin = "its header" if header.sha256 is not None else origin
        self._hint = hint
        # the seam for decryption: a decipher would sit between the stored bytes and the decompressor
        self._plain = DecompressingReader(header.compression, raw, hashing)
        self._hashing = hashing
        self._verified: StoredObject | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            n = self._plain.readinto(buffer)
        except IntegrityError as exc:
            if exc.key is None:  # raised by the decompressor, which does not know the key
                message = f"object {self.key} is corrupt: {exc.message}"
                raise IntegrityError(message, key=self.key, hint=self._hint) from exc
            raise
        if self._size is not None and self._plain.size > self._size:
            raise IntegrityError(
                f"object {self.key} is corrupt: it decompresses to more than the {self._size} bytes {self._origin} "
                "records",
                key=self.key,
                hint=self._hint,
            )
        if n == 0 and len(memoryview(buffer)) > 0:
            self._verify()
        return n

    def _verify(self) -> StoredObject:
        if self._verified is None:
            size, sha256 = self._plain.size, self._plain.sha256
            wrong_hash = self._hashing and self._sha256 is not None and sha256 != self._sha256
            if (self._size is not None and size != self._size) or wrong_hash:
                raise IntegrityError(
                    f"object {self.key} is corrupt: {size} bytes with sha256 {sha256[:16]}…, {self._origin} records "
                    f"{self._size} bytes with sha256 {str(self._sha256)[:16]}…",
                    key=self.key,
                    hint=self._hint,
                )
            self._verified = StoredObject(self.header, sha256, size, self._raw.count)
        return self._verified

    def finish(self) -> StoredObject:
        """Read the rest of the content (discarding it) and return what was verified."""
        while self.read(READ_CHUNK):
            pass
        return self._verify()

    def close(self) -> None:
        if not self.closed:
            try:
                self._plain.close()
            finally:
                self._raw.close()
        super().close()


def open_object(
    storage: Storage,
    key: str,
    kind: str,
    name: str,
    size: int | None = None,
    sha256: str | None = None,
    require_checksum: bool = False,
    origin: str = "the reader",
    hint: str = _DAMAGED,
    trust_codec: bool = False,
) -> ObjectSource:
    """Open the object ``key``, which must hold ``kind`` content named ``name``.

    With ``trust_codec``, a payload whose codec checks its own content (``SELF_CHECKING``) is not hashed
    again, only counted: for a caller that verifies everything it takes from the content itself (restore
    checks every file's SHA-256 against the manifest), so the same bytes are not hashed twice.

    ``NotFound`` if it is absent (eagerly); ``IntegrityError`` if its header is not a cloudbk header, names
    another kind or name, or (``require_checksum``) records no SHA-256 and size. The content is checked
    against the header's SHA-256 and size when it records them, else against ``size`` and ``sha256``
    (which ``origin`` names in messages, e.g. "its manifest"); ``hint`` says what to do about a damaged one.
    """
    obj = storage.open_read(key)
    try:
        raw = _Counting(obj)
        header = read_header(raw, key)
        if header.kind != kind or header.name != name:
            raise IntegrityError(
                f"object {key} holds {_WORDS.get(header.kind, header.kind)} {header.name!r}, "
                f"not {_WORDS.get(kind, kind)} {name}",
                key=key,
                hint="the object was copied or renamed inside the repository; it is not used for recovery",
            )
        if require_checksum and (header.sha256 is None or header.size is None):
            raise IntegrityError(f"object {key} has no checksum in its header", key=key)
        if header.sha256 is not None:
            size, sha256 = header.size, header.sha256
        hashing = not (trust_codec and header.compression in SELF_CHECKING)
        return ObjectSource(key, raw, header, size, sha256, origin, hint, hashing)
    except BaseException:
        obj.close()
        raise


def create_object(
    storage: Storage,
    key: str,
    kind: str,
    name: str,
    compression: str,
    sha256: str | None = None,
    size: int | None = None,
    mode: WriteMode = CREATE_ONLY,
    threads: int = 0,
    source: str | None = None,
    parts_in_flight: int | None = None,
) -> ObjectSink:
    """Start writing ``kind`` content named ``name`` to ``key`` (create-only unless ``mode`` says otherwise).

    ``sha256`` and ``size`` of the plain content go into the header when they are known before the write;
    ``parts_in_flight`` bounds the parts a multipart upload sends at once (memory, when many objects are
    written at a time).
    """
    header = Header(kind=kind, name=name, compression=compression, sha256=sha256, size=size)
    return ObjectSink(storage, key, header, mode, threads, source, parts_in_flight)


def read_object(
    storage: Storage,
    key: str,
    kind: str,
    name: str,
    sink: Callable[[bytes], object] | None = None,
    require_checksum: bool = True,
) -> StoredObject:
    """Stream the whole object ``key`` into ``sink`` and verify it (see :func:`open_object`).

    The sink may have received bytes before an ``IntegrityError``; callers discard them.
    """
    with open_object(storage, key, kind, name, require_checksum=require_checksum) as source:
        while chunk := source.read(READ_CHUNK):
            if sink is not None:
                sink(chunk)
        return source.finish()
