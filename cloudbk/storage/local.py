"""``file://`` backend: a directory tree, the embedded default. Imports no cloud SDK.

Atomicity and durability: a writer streams into a hidden temporary file in the target's directory, fsyncs it,
then publishes it with ``os.link`` (create-only: fails if the name exists, atomically) or ``os.replace``
(overwrite / compare-and-swap, under an ``flock`` on the repository's lock file), and fsyncs the directory.
A process killed midway leaves at most a hidden temporary file, never a partial object.
"""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from cloudbk.errors import AccessDenied, AlreadyExists, NotFound, PermanentError, PreconditionFailed, StorageError
from cloudbk.localfs import fsync_dir
from cloudbk.storage.base import (
    OVERWRITE,
    CreateOnly,
    IfVersion,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Storage,
    WriteMode,
    check_key,
    check_prefix,
)

TMP_MARK = ".cloudbk-tmp-"
LOCK_NAME = ".cloudbk-lock"


def _version(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _translate(exc: OSError, key: str) -> StorageError:
    if exc.errno == errno.ENOENT:
        return NotFound(f"object {key} not found", key=key)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AccessDenied(
            f"permission denied on {exc.filename or key}: {exc.strerror}",
            key=key,
            hint="the repository directory must be writable by the user running cloudbk (e.g. postgres)",
        )
    if exc.errno == errno.ENOSPC:
        return PermanentError(
            f"no space left on the device holding {key}", key=key, hint="free space or expire backups"
        )
    return PermanentError(f"I/O error on {exc.filename or key}: {exc.strerror}", key=key)


class LocalStorage(Storage):
    scheme = "file"

    def __init__(self, url: str, root: str) -> None:
        super().__init__(url)
        self.root = root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def _makedirs(self, directory: str) -> None:
        """Create ``directory`` and its parents, fsyncing each parent so the new entries are durable."""
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            fsync_dir(os.path.dirname(d))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._makedirs(self.root)
        fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except OSError as exc:
            raise _translate(exc, key) from exc
        return ObjectInfo(key, st.st_size, _version(st), st.st_mtime)

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - owned by the reader
        except OSError as exc:
            raise _translate(exc, key) from exc
        if offset:
            f.seek(offset)
        return _LocalReader(f, key, length)

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        return _LocalWriter(self, key, self._path(key), mode)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        base = os.path.join(self.root, os.path.dirname(prefix)) if "/" in prefix else self.root
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            # prune directories that cannot hold matching keys
            dirnames[:] = [
                d for d in dirnames if (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/")
            ]
            for name in filenames:
                key = rel + name
                if key.startswith(prefix) and not name.startswith(TMP_MARK) and name != LOCK_NAME:
                    keys.append(key)
        keys.sort()
        for key in keys:
            try:
                yield self.stat(key)
            except NotFound:
                continue  # deleted while we listed

    def delete_many(self, keys: Iterable[str]) -> None:
        dirs: set[str] = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
                dirs.add(os.path.dirname(path))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _translate(exc, key) from exc
        for d in dirs:
            fsync_dir(d)

    def _publish(self, key: str, tmp: str, path: str, mode: WriteMode) -> ObjectInfo:
        directory = os.path.dirname(path)
        try:
            if isinstance(mode, CreateOnly):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExists(f"object {key} already exists", key=key) from None
                os.unlink(tmp)
            else:
                with self._locked():
                    if isinstance(mode, IfVersion):
                        try:
                            current = _version(os.stat(path))
                        except FileNotFoundError:
                            current = None
                        if current != mode.version:
                            raise PreconditionFailed(f"object {key} changed since version {mode.version}", key=key)
                    os.replace(tmp, path)
            fsync_dir(directory)
            st = os.stat(path)
        except OSError as exc:
            raise _translate(exc, key) from exc
        return ObjectInfo(key, st.st_size, _version(st), st.st_mtime)


class _LocalReader(ObjectReader):
    def __init__(self, f: Any, key: str, length: int | None) -> None:
        super().__init__()
        self._f = f
        self._key = key
        self._remaining = length
        available = max(0, os.fstat(f.fileno()).st_size - f.tell())
        self.size = available if length is None else min(length, available)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        if self._remaining is not None:
            view = view[: self._remaining]
        try:
            n = int(self._f.readinto(view))
        except OSError as exc:
            raise _translate(exc, self._key) from exc
        if self._remaining is not None:
            self._remaining -= n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class _LocalWriter(ObjectWriter):
    def __init__(self, storage: LocalStorage, key: str, path: str, mode: WriteMode) -> None:
        self.key = key
        self._storage = storage
        self._path = path
        self._mode = mode
        directory = os.path.dirname(path)
        self._tmp = os.path.join(directory, f"{TMP_MARK}{os.path.basename(path)}.{uuid.uuid4().hex}")
        try:
            storage._makedirs(directory)
            self._f: Any = open(self._tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            raise _translate(exc, key) from exc
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ValueError(f"write to {self.key} after commit or abort")
        try:
            self._f.write(data)
        except OSError as exc:
            self.abort()
            raise _translate(exc, self.key) from exc
        return len(data)

    def commit(self) -> ObjectInfo:
        if self._done:
            raise ValueError(f"commit of {self.key} after commit or abort")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            info = self._storage._publish(self.key, self._tmp, self._path, self._mode)
        except OSError as exc:
            self.abort()
            raise _translate(exc, self.key) from exc
        except BaseException:
            self.abort()
            raise
        self._done = True
        return info

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except OSError:
            pass
