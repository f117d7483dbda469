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
import tarfile
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
    """Hash and count the bytes tarfile pulls from the (decompressed) stream."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._source.read(n if n is not None and n >= 0 else CHUNK)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class SafeExtractor:
    """Extract one tar stream into ``dest`` (an existing directory), checking every member.

    ``expected`` maps relative paths to the size and SHA-256 each regular file must have; a file not in it,
    or with other content, is an ``IntegrityError``. ``rename`` maps member paths to the paths they are
    written to (used to hold ``global/pg_control`` back until everything else is verified).
    """

    def __init__(
        self,
        dest: str,
        expected: Mapping[str, FileEntry] | None = None,
        rename: Mapping[str, str] | None = None,
        on_bytes: Callable[[int], None] | None = None,
        what: str = "tar stream",
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.dest = os.path.realpath(dest)
        self.owner = owner
        self.expected = expected
        self.rename = dict(rename or {})
        self._on_bytes = on_bytes or (lambda n: None)
        self.what = what

    def extract(self, stream: BinaryIO | Any) -> tuple[ExtractResult, str, int]:
        """Extract everything; return the result and the SHA-256 and size of the whole tar stream."""
        counting = _Counting(stream)
        written: dict[str, FileEntry] = {}
        members = 0
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
                self._extract_member(tar, member, written)
                tar.members.clear()  # stream mode remembers every member; we need none of them
        counting.drain()  # the end-of-archive padding belongs to the stream's checksum too
        return ExtractResult(written, members), counting.hash.hexdigest(), counting.size

    def _target(self, rel: str) -> str:
        """The absolute path for ``rel``, after checking no existing parent is a symlink leading outside."""
        rel = self.rename.get(rel, rel)
        path = os.path.join(self.dest, rel)
        parent = os.path.dirname(path)
        real_parent = os.path.realpath(parent)
        if real_parent != self.dest and not real_parent.startswith(self.dest + os.sep):
            raise UnsafeMember(f"{self.what}: member {rel!r} would be written outside the destination")
        if os.path.realpath(parent) != os.path.normpath(parent):
            raise UnsafeMember(f"{self.what}: member {rel!r} would be written through a symbolic link")
        return path

    def _chown(self, path: str) -> None:
        if self.owner is not None:
            os.lchown(path, *self.owner)

    def _ensure_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        missing = []
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            os.mkdir(directory, 0o700)
            self._chown(directory)

    def _extract_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, written: dict[str, FileEntry]) -> None:
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
        self._extract_file(tar, member, rel, path, written)

    def _extract_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, path: str, written: dict[str, FileEntry]
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
        fd = os.open(path, flags, (member.mode & 0o777) | 0o600)
        digest = hashlib.sha256()
        size = 0
        try:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except tarfile.TarError as exc:
                    raise IntegrityError(f"{self.what}: file {rel!r} is truncated: {exc}") from exc
                if not chunk:
                    break
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(chunk)
                self._on_bytes(len(chunk))
        finally:
            os.close(fd)
        if size != member.size:
            raise IntegrityError(f"{self.what}: file {rel!r} is truncated ({size} of {member.size} bytes)")
        entry = FileEntry(rel, size, digest.hexdigest())
        if expected is not None and entry.sha256 != expected.sha256:
            raise IntegrityError(
                f"{self.what}: file {rel!r} does not match its checksum (SHA-256 {entry.sha256}, "
                f"manifest {expected.sha256})",
                hint="the stored backup is corrupt; restore another backup",
            )
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        self._chown(path)
        written[rel] = entry
