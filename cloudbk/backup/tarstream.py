"""Streaming tar: a writer that copies live files into a tar stream, and the checks on a member's header.

Writing: headers are POSIX pax (long names and large files need no special casing). A file is copied up to
the size it had when its header was written; a file that shrinks or is truncated while we read it is padded
with zeros and one that grows is cut at that size, as PostgreSQL allows during a base backup (WAL replay
rewrites every block changed after the backup started). Each file's SHA-256 is of the bytes in the tar.

Checking: ``check_member`` refuses, from its header alone, a member a backup never holds (absolute names,
``..``, links whose text points outside, devices, FIFOs); :mod:`cloudbk.backup.tarextract` extracts with it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import queue
import tarfile
import threading
import time
from collections.abc import Callable
from typing import Protocol

from cloudbk.errors import UnsafeMember
from cloudbk.repo.manifest import FileEntry

BLOCK = 512
CHUNK = 1024 * 1024
#: pax record of a piece of a file split across volumes: where the piece starts in the file (docs/format.md)
PIECE_OFFSET = "CLOUDBK.offset"
_ZEROS = bytes(CHUNK)


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


# -- writing -------------------------------------------------------------------------------------------------


class TarWriter:
    """Writes tar members to ``sink``; ``close`` writes the end-of-archive marker (the sink stays open)."""

    def __init__(self, sink: Sink, on_bytes: Callable[[int], None] | None = None) -> None:
        self._sink = sink
        self._on_bytes = on_bytes or (lambda n: None)
        self._buf = bytearray(CHUNK)

    def _header(self, info: tarfile.TarInfo) -> None:
        self._sink.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    @staticmethod
    def _info(name: str, mode: int, mtime: float, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode & 0o7777
        info.mtime = int(mtime)
        return info

    def add_dir(self, name: str, mode: int = 0o700, mtime: float | None = None) -> None:
        self._header(self._info(name.rstrip("/"), mode, time.time() if mtime is None else mtime, tarfile.DIRTYPE))

    def add_symlink(self, name: str, target: str, mode: int = 0o777, mtime: float | None = None) -> None:
        info = self._info(name, mode, time.time() if mtime is None else mtime, tarfile.SYMTYPE)
        info.linkname = target
        self._header(info)

    def add_bytes(self, name: str, data: bytes, mode: int = 0o600, mtime: float | None = None) -> FileEntry:
        info = self._info(name, mode, time.time() if mtime is None else mtime)
        info.size = len(data)
        self._header(info)
        self._sink.write(data)
        self._pad(len(data))
        self._on_bytes(len(data))
        return FileEntry(name, len(data), hashlib.sha256(data).hexdigest())

    def add_file(
        self, name: str, fd: int, size: int, mode: int, mtime: float, offset: int | None = None
    ) -> tuple[FileEntry, int]:
        """Copy ``size`` bytes from the open file ``fd`` (from ``offset`` for a piece of a split file, marked as
        such in its header). Returns the entry and how many bytes were short (read as zeros because the file
        shrank while we copied it)."""
        info = self._info(name, mode, mtime)
        info.size = size
        if offset is not None:
            info.pax_headers = {PIECE_OFFSET: str(offset)}
            os.lseek(fd, offset, os.SEEK_SET)
        self._header(info)
        digest = hashlib.sha256()
        view = memoryview(self._buf)
        done = 0
        while done < size:
            want = min(CHUNK, size - done)
            n = os.readv(fd, [view[:want]])
            if n <= 0:
                break
            digest.update(view[:n])
            self._sink.write(view[:n])
            done += n
            self._on_bytes(n)
        short = size - done
        while done < size:  # the file shrank under us: pad, as the header promised ``size`` bytes
            n = min(CHUNK, size - done)
            digest.update(_ZEROS[:n])
            self._sink.write(_ZEROS[:n])
            done += n
        self._pad(size)
        return FileEntry(name, size, digest.hexdigest(), offset), short

    def _pad(self, size: int) -> None:
        rest = size % BLOCK
        if rest:
            self._sink.write(bytes(BLOCK - rest))

    def close(self) -> None:
        # Two zero blocks end the archive; tar tools also expect the stream padded to a 10 KiB record.
        self._sink.write(bytes(2 * BLOCK))


# -- checking members --------------------------------------------------------------------------------------


def safe_relpath(name: str, what: str = "member") -> str:
    """The normalised relative path of a member name; ``UnsafeMember`` for absolute or escaping names."""
    if not name or "\x00" in name:
        raise UnsafeMember(f"tar {what} with an empty or NUL-containing name {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMember(f"tar {what} {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeMember(f"tar {what} {name!r} contains '..'")
    return "/".join(parts)


def check_member(member: tarfile.TarInfo) -> str:
    """Validate one member before extraction; return its normalised relative path ('' for the root)."""
    rel = safe_relpath(member.name)
    if member.isreg() or member.isdir():
        return rel
    if member.issym():
        target = member.linkname
        if not target or target.startswith("/"):
            raise UnsafeMember(f"tar member {member.name!r} is a symbolic link to an absolute path {target!r}")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
            raise UnsafeMember(f"tar member {member.name!r} is a symbolic link pointing outside: {target!r}")
        return rel
    if member.islnk():
        safe_relpath(member.linkname, "hard link target")
        return rel
    raise UnsafeMember(f"tar member {member.name!r} has a type a backup never holds ({member.type!r})")


# -- piping ---------------------------------------------------------------------------------------------


class PipeSink:
    """``write`` hands chunks to a thread that writes them to ``sink``, so producing (reading files, hashing
    them) and consuming (hashing the stream, compressing, uploading) use two cores. At most ``depth`` chunks
    wait in between: memory stays bounded and a slow consumer slows the producer down."""

    def __init__(self, sink: Sink, depth: int = 8) -> None:
        self._sink = sink
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cloudbk-pipe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if self._error is None:  # after a failure keep draining, so the producer never blocks forever
                try:
                    self._sink.write(chunk)
                except BaseException as exc:  # handed to the producer's thread
                    self._error = exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._error is not None:
            raise self._error
        self._queue.put(bytes(data))  # a copy: producers reuse their buffers
        return len(data)

    def close(self) -> None:
        """Wait until everything is written; raise the consumer's error, if any."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the consumer (after what is queued); never raises."""
        if self._thread.is_alive():
            self._error = self._error or _Aborted()
            self._queue.put(None)
            self._thread.join()


class _Aborted(Exception):
    pass
