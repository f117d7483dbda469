"""The safe tar extractor used by restore (SPEC §3 rule 5).

Members are checked before anything is written: absolute names, ``..``, devices and FIFOs are refused, a
name appearing twice is refused, and nothing is ever written through a symbolic link: symbolic link members
are created only after every other member is written, and only when they resolve, through each other, to a
place inside the destination (the link policy is :mod:`cloudbk.backup.links`). Regular files are checked against
the expected size and SHA-256 as they are written. Memory is one chunk, whatever the stream size.
"""

from __future__ import annotations

import hashlib
import os
import queue
import tarfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cloudbk.backup.links import check_links
from cloudbk.backup.tarstream import CHUNK, PIECE_OFFSET, check_member, safe_relpath
from cloudbk.errors import IntegrityError, LinkEscapes, UnsafeMember
from cloudbk.repo.manifest import FileEntry


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
    written to (used to hold ``global/pg_control`` back until everything else is verified). ``links`` are
    the links asked for (relative path -> absolute target): what the tar holds at or below such a path is
    written below the target, and the link is created last. ``symlinks`` says whether symbolic link members
    may appear at all (backups that record their links hold none); ``trust_symlinks`` creates them as they
    are, wherever they point (``--link-all`` on such an older backup). ``reserved`` paths must be of the
    kind given ("file" or "dir") if the tar holds them. Files are written and hashed by a second thread
    while this one decompresses and parses.
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
        links: Mapping[str, str] | None = None,
        symlinks: bool = True,
        trust_symlinks: bool = False,
        reserved: Mapping[str, str] | None = None,
        make_requested: bool = True,
    ) -> None:
        self.dest = os.path.realpath(dest)
        self.owner = owner
        self.expected = expected
        self.rename = dict(rename or {})
        self._on_bytes = on_bytes or (lambda n: None)
        self.what = what
        self.hash_stream = hash_stream
        self.links = dict(links or {})
        self.symlinks = symlinks
        self.trust_symlinks = trust_symlinks
        self.reserved = dict(reserved or {})
        self.make_requested = make_requested  # False: the caller calls make_requested_links at the end
        self._written: dict[str, FileEntry] = {}
        self._names: set[str] = set()  # every member name so far: a second member of the same name is refused
        self._files: set[str] = set()  # regular files extracted: the only things a hard link may name
        self._pending: dict[str, str] = {}  # symbolic link members, created at the end

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
        self._make_links()
        digest = counting.hash.hexdigest() if counting.hash is not None else ""
        return ExtractResult(dict(self._written), members), digest, counting.size

    def _chown(self, path: str) -> None:
        if self.owner is not None:
            os.lchown(path, *self.owner)

    def _root(self, rel: str) -> tuple[str, str]:
        """The directory ``rel`` must stay in (DEST, or a requested link's target) and its path there."""
        for name, target in self.links.items():
            if rel == name:
                return os.path.dirname(os.path.realpath(target)), os.path.realpath(target)
            if rel.startswith(name + "/"):
                root = os.path.realpath(target)
                return root, os.path.join(root, rel[len(name) + 1 :])
        return self.dest, os.path.join(self.dest, rel)

    def _target(self, rel: str) -> str:
        """The absolute path for ``rel``, after checking no existing parent is a symlink leading outside."""
        rel = self.rename.get(rel, rel)
        root, path = self._root(rel)
        parent = os.path.dirname(path)
        real_parent = os.path.realpath(parent)
        if real_parent != root and not real_parent.startswith(root + os.sep):
            raise UnsafeMember(f"{self.what}: member {rel!r} would be written outside the destination")
        if real_parent != os.path.normpath(parent):
            raise UnsafeMember(f"{self.what}: member {rel!r} would be written through a symbolic link")
        return path

    def _ensure_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        missing = []
        while not os.path.isdir(parent):
            if os.path.lexists(parent):
                raise UnsafeMember(f"{self.what}: {path!r} needs a directory where the tar put a file: {parent!r}")
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:  # made meanwhile by a worker extracting another volume of the stream
                if os.path.islink(directory) or not os.path.isdir(directory):
                    raise UnsafeMember(
                        f"{self.what}: {path!r} needs a directory where there is none: {directory!r}"
                    ) from None
                continue
            self._chown(directory)

    def _check_name(self, member: tarfile.TarInfo) -> str:
        """The member's relative path, refused when it collides with an earlier member or a link, or puts
        something other than a regular file where restore writes its own files."""
        rel = safe_relpath(member.name)
        if (member.issym() or member.islnk()) and (not member.linkname or "\x00" in member.linkname):
            raise UnsafeMember(f"{self.what}: link {rel!r} has an empty or NUL-containing target")
        if not (member.issym() and (self.trust_symlinks or rel in self.links)):
            check_member(member)  # a link asked for may point anywhere; everything else is checked as text
        if rel == "":
            return rel
        if rel in self._names and not member.isdir():
            raise UnsafeMember(f"{self.what}: member {rel!r} appears twice in the tar (a second one would replace "
                               "the first)")  # fmt: skip
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            above = "/".join(parts[:i])
            if above in self._pending:
                how = "replaces" if i == len(parts) else "would be written through"
                raise UnsafeMember(f"{self.what}: member {rel!r} {how} a symbolic link ({above!r})")
            kind = self.reserved.get(above)
            if kind is None or (i < len(parts) and kind == "dir"):
                continue
            if i < len(parts) or not (member.isreg() if kind == "file" else member.isdir()):
                needed = "a regular file" if kind == "file" else "a directory"
                raise UnsafeMember(
                    f"{self.what}: {above!r} is not {needed} in the tar (a {_kind(member)} member {rel!r}); restore "
                    f"writes {'this file' if kind == 'file' else 'into this directory'} itself",
                    hint="this tar was not written by cloudbk backup-push, or is damaged; restore another backup",
                )
        self._names.add(rel)
        return rel

    def _extract_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, writer: _FileWriter) -> None:
        rel = self._check_name(member)
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
        if os.path.lexists(path) and not (self._is_piece(member, rel) and os.path.isfile(path)):
            raise UnsafeMember(f"{self.what}: member {rel!r} collides with a directory of the same name")
        if member.issym():
            if not self.symlinks:
                raise IntegrityError(
                    f"{self.what}: symbolic link {rel!r} is not in the backup's manifest (cloudbk records links "
                    "there and stores none in the tar)",
                    hint="the stored backup is damaged or was not written by cloudbk; restore another backup",
                )
            if rel not in self.links:  # a link asked for is made anyway, pointing where it was asked to
                self._pending[rel] = member.linkname
            return
        if member.islnk():
            self._hard_link(member, rel, path)
            return
        self._files.add(rel)
        self._extract_file(tar, member, rel, path, writer)

    def _is_piece(self, member: tarfile.TarInfo, rel: str) -> bool:
        """Whether ``member`` is a piece of a file split across volumes (its other pieces are written by others)."""
        expected = self.expected.get(rel) if self.expected is not None else None
        return member.isreg() and expected is not None and expected.offset is not None

    def _hard_link(self, member: tarfile.TarInfo, rel: str, path: str) -> None:
        if self.expected is not None:  # cloudbk never writes hard links: this tar is not ours
            raise IntegrityError(f"{self.what}: hard link {rel!r} is not in the backup's manifest")
        source_rel = safe_relpath(member.linkname, "hard link target")
        if source_rel not in self._files:
            raise UnsafeMember(
                f"{self.what}: hard link {rel!r} points at {member.linkname!r}, not a file extracted before it"
            )
        os.link(self._target(source_rel), path, follow_symlinks=False)

    def _make_links(self) -> None:
        """Create the symbolic link members (each checked against the tree they form together, before any is
        made), then the links asked for."""
        if not self.trust_symlinks:
            try:
                check_links(self._pending, frozenset(self.links))
            except LinkEscapes as exc:
                raise UnsafeMember(
                    f"{self.what}: {exc.reason}", hint="nothing was written outside the destination"
                ) from None
        made = [(rel, self._root(rel)[1], target) for rel, target in self._pending.items()]  # maybe below a link
        if self.make_requested:
            made += self._requested()
        self._symlinks(made)

    def _requested(self) -> list[tuple[str, str, str]]:
        return [(rel, os.path.join(self.dest, rel), target) for rel, target in self.links.items()]

    def make_requested_links(self) -> None:
        """Create the links asked for (``links``): for a stream extracted in several volumes, once they are all in."""
        self._symlinks(self._requested())

    def _symlinks(self, made: list[tuple[str, str, str]]) -> None:
        for rel, path, target in made:
            self._ensure_parent(path)
            if os.path.realpath(os.path.dirname(path)) != os.path.dirname(path):
                raise UnsafeMember(f"{self.what}: link {rel!r} would be created through a symbolic link")
            os.symlink(target, path)
            self._chown(path)

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
            offset = member.pax_headers.get(PIECE_OFFSET)
            if (offset is None) != (expected.offset is None) or (offset is not None and int(offset) != expected.offset):
                raise IntegrityError(
                    f"{self.what}: file {rel!r} starts at offset {offset or 0} in the tar, the manifest says "
                    f"{expected.offset or 0}"
                )
        source = tar.extractfile(member)
        if source is None:  # pragma: no cover - regular members always have a file object
            raise IntegrityError(f"{self.what}: cannot read file {rel!r}")
        piece = expected is not None and expected.offset is not None
        # a piece's file may have been created by another volume's piece: the manifest says the pieces never
        # overlap, and DEST was empty
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if piece else os.O_EXCL)
        fd = os.open(path, flags, (member.mode & 0o777) | 0o600)
        if piece and expected is not None and expected.offset:
            os.lseek(fd, expected.offset, os.SEEK_SET)
        out = _OutFile(self, rel, path, fd, member, expected)
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


def _kind(member: tarfile.TarInfo) -> str:
    names = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory"}
    return names.get(member.type, "regular file" if member.isreg() else f"type {member.type!r}")
