"""Streaming tar: a writer that copies live files into a tar stream, and a safe extractor.

Writing: headers are POSIX pax (long names and large files need no special casing). A file is copied up to
the size it had when its header was written; a file that shrinks or is truncated while we read it is padded
with zeros and one that grows is cut at that size, as PostgreSQL allows during a base backup (WAL replay
rewrites every block changed after the backup started). Each file's SHA-256 is of the bytes in the tar.

Extracting: members are checked before anything is written (SPEC §3 rule 5): absolute names, ``..``,
symbolic or hard links resolving outside the destination, devices and FIFOs are refused, and nothing is
ever written through a symbolic link. Regular files are checked against the expected size and SHA-256 as
they are written. Memory is one chunk, whatever the stream size.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from cloudbk.errors import IntegrityError
from cloudbk.manifest import FileEntry

BLOCK = 512
CHUNK = 1024 * 1024
_ZEROS = bytes(CHUNK)


class Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


class UnsafeMember(IntegrityError):
    """A tar member would escape the destination or is of a type a backup never holds."""


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

    def add_file(self, name: str, fd: int, size: int, mode: int, mtime: float) -> tuple[FileEntry, int]:
        """Copy ``size`` bytes from the open file ``fd``. Returns the entry and how many bytes were short
        (read as zeros because the file shrank while we copied it)."""
        info = self._info(name, mode, mtime)
        info.size = size
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
        return FileEntry(name, size, digest.hexdigest()), short

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


# -- extracting --------------------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    files: dict[str, FileEntry]  # regular files written, by relative path
    members: int


class _Counting:
    """Count (and optionally hash) the bytes tarfile pulls from the (decompressed) stream."""

    def __init__(self, source: Any, hashing: bool) -> None:
        self._source = source
        self.hash = hashlib.sha256() if hashing else None
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._source.read(n if n is not None and n >= 0 else CHUNK)
        if self.hash is not None:
            self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


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


class _OutFile:
    """One file being written by the writer thread: hashed as written, checked against the manifest at close."""

    def __init__(self, extractor: SafeExtractor, rel: str, path: str, fd: int, member: tarfile.TarInfo,
                 expected: FileEntry | None) -> None:  # fmt: skip
        self.extractor = extractor
        self.rel, self.path, self.fd, self.member, self.expected = rel, path, fd, member, expected
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        view = memoryview(chunk)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(chunk)
        self.extractor._on_bytes(len(chunk))

    def close(self) -> None:
        os.close(self.fd)
        self.fd = -1
        what, rel = self.extractor.what, self.rel
        if self.size != self.member.size:
            raise IntegrityError(f"{what}: file {rel!r} is truncated ({self.size} of {self.member.size} bytes)")
        entry = FileEntry(rel, self.size, self.digest.hexdigest())
        if self.expected is not None and entry.sha256 != self.expected.sha256:
            raise IntegrityError(
                f"{what}: file {rel!r} does not match its checksum (SHA-256 {entry.sha256}, "
                f"manifest {self.expected.sha256})",
                hint="the stored backup is corrupt; restore another backup",
            )
        os.utime(self.path, (self.member.mtime, self.member.mtime), follow_symlinks=False)
        self.extractor._chown(self.path)
        self.extractor._written[rel] = entry

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _FileWriter:
    """The thread writing file contents while the caller's thread decompresses and parses the tar."""

    def __init__(self, depth: int = 8) -> None:
        self._queue: queue.Queue[tuple[_OutFile, bytes | None] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._abandoned: list[_OutFile] = []
        self._thread = threading.Thread(target=self._run, name="cloudbk-extract", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            out, chunk = item
            if self._error is not None:
                out.discard()
                continue
            try:
                if chunk is None:
                    out.close()
                else:
                    out.write(chunk)
            except BaseException as exc:  # handed to the caller's thread
                out.discard()
                self._error = exc

    def put(self, out: _OutFile, chunk: bytes | None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((out, chunk))

    def abandon(self, out: _OutFile) -> None:
        """``out`` gets no more chunks (the stream failed): its descriptor is closed by ``finish``."""
        self._abandoned.append(out)

    def finish(self, raise_error: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        for out in self._abandoned:
            out.discard()
        if raise_error and self._error is not None:
            raise self._error


class SafeExtractor:
    """Extract one tar stream into ``dest`` (an existing directory), checking every member.

    ``expected`` maps relative paths to the size and SHA-256 each regular file must have; a file not in it,
    or with other content, is an ``IntegrityError``. ``rename`` maps member paths to the paths they are
    written to (used to hold ``global/pg_control`` back until everything else is verified). Files are
    written and hashed by a second thread while this one decompresses and parses.
    """

    def __init__(
        self,
        dest: str,
        expected: Mapping[str, FileEntry] | None = None,
        rename: Mapping[str, str] | None = None,
        on_bytes: Callable[[int], None] | None = None,
        what: str = "tar stream",
        owner: tuple[int, int] | None = None,
        hash_stream: bool = True,
    ) -> None:
        self.dest = os.path.realpath(dest)
        self.owner = owner
        self.expected = expected
        self.rename = dict(rename or {})
        self._on_bytes = on_bytes or (lambda n: None)
        self.what = what
        self.hash_stream = hash_stream
        self._written: dict[str, FileEntry] = {}

    def extract(self, stream: BinaryIO | Any) -> tuple[ExtractResult, str, int]:
        """Extract everything; return the result and the SHA-256 ('' unless ``hash_stream``) and size of the
        whole tar stream."""
        counting = _Counting(stream, self.hash_stream)
        members = 0
        writer = _FileWriter()
        try:
            try:
                tar = tarfile.open(fileobj=counting, mode="r|", bufsize=CHUNK)  # type: ignore[call-overload]  # noqa: SIM115
            except tarfile.TarError as exc:
                raise IntegrityError(f"{self.what} is not a readable tar stream: {exc}") from exc
            with tar:
                while True:
                    try:
                        member = tar.next()
                    except tarfile.TarError as exc:
                        raise IntegrityError(f"{self.what} is corrupt after {members} members: {exc}") from exc
                    if member is None:
                        break
                    members += 1
                    self._extract_member(tar, member, writer)
                    tar.members.clear()  # stream mode remembers every member; we need none of them
            counting.drain()  # the end-of-archive padding belongs to the stream's checksum too
        except BaseException:
            writer.finish(raise_error=False)
            raise
        writer.finish()
        digest = counting.hash.hexdigest() if counting.hash is not None else ""
        return ExtractResult(dict(self._written), members), digest, counting.size

    def _chown(self, path: str) -> None:
        if self.owner is not None:
            os.lchown(path, *self.owner)

    def _target(self, rel: str) -> str:
        """The absolute path for ``rel``, after checking no existing parent is a symlink leading outside."""
        rel = self.rename.get(rel, rel)
        path = os.path.join(self.dest, rel)
        parent = os.path.dirname(path)
        real_parent = os.path.realpath(parent)
        if real_parent != self.dest and not real_parent.startswith(self.dest + os.sep):
            raise UnsafeMember(f"{self.what}: member {rel!r} would be written outside the destination")
        if real_parent != os.path.normpath(parent):
            raise UnsafeMember(f"{self.what}: member {rel!r} would be written through a symbolic link")
        return path

    def _ensure_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        missing = []
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            os.mkdir(directory, 0o700)
            self._chown(directory)

    def _extract_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, writer: _FileWriter) -> None:
        rel = check_member(member)
        if rel == "":
            return  # the root directory itself
        if member.isdir():
            path = self._target(rel)
            self._ensure_parent(path)
            if os.path.lexists(path) and not os.path.isdir(path):
                raise UnsafeMember(f"{self.what}: directory {rel!r} collides with an existing non-directory")
            os.makedirs(path, mode=0o700, exist_ok=True)
            # owner needs rwx to fill it; PostgreSQL directories are 0700 or 0750 anyway
            os.chmod(path, (member.mode & 0o777) | 0o700, follow_symlinks=False)
            self._chown(path)
            return
        path = self._target(rel)
        self._ensure_parent(path)
        self._target(rel)  # the parents now exist: check again that none resolves outside
        if member.issym():
            os.symlink(member.linkname, path)
            self._chown(path)
            return
        if member.islnk():
            if self.expected is not None:  # cloudbk never writes hard links: this tar is not ours
                raise IntegrityError(f"{self.what}: hard link {rel!r} is not in the backup's manifest")
            source = self._target(safe_relpath(member.linkname, "hard link target"))
            if not os.path.isfile(source) or os.path.islink(source):
                raise UnsafeMember(
                    f"{self.what}: hard link {rel!r} points at {member.linkname!r}, not an extracted file"
                )
            os.link(source, path, follow_symlinks=False)
            return
        self._extract_file(tar, member, rel, path, writer)

    def _extract_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, path: str, writer: _FileWriter
    ) -> None:
        expected = None
        if self.expected is not None:
            expected = self.expected.get(rel)
            if expected is None:
                raise IntegrityError(f"{self.what}: file {rel!r} is not in the backup's manifest")
            if expected.size != member.size:
                raise IntegrityError(
                    f"{self.what}: file {rel!r} has {member.size} bytes in the tar, the manifest says {expected.size}"
                )
        source = tar.extractfile(member)
        if source is None:  # pragma: no cover - regular members always have a file object
            raise IntegrityError(f"{self.what}: cannot read file {rel!r}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = _OutFile(self, rel, path, os.open(path, flags, (member.mode & 0o777) | 0o600), member, expected)
        try:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except tarfile.TarError as exc:
                    raise IntegrityError(f"{self.what}: file {rel!r} is truncated: {exc}") from exc
                if not chunk:
                    break
                writer.put(out, chunk)
        except BaseException:
            writer.abandon(out)
            raise
        writer.put(out, None)
