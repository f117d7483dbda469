"""An in-memory backend for fast unit tests, with fault injection.

It passes the same contract suite as the real drivers. Faults are injected per operation name
(``stat``, ``open_read``, ``read``, ``open_write``, ``write``, ``commit``, ``list``, ``delete_many``): skip
``after`` matching calls, then fail the next ``times`` ones with ``error`` (a transient error by default),
or, for ``read`` with ``truncate=True``, end the stream early as a dropped connection would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cloudbk.errors import AlreadyExists, NotFound, PreconditionFailed, TransientError
from cloudbk.storage.backoff import NO_RETRY, RetryPolicy
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


def _transient(key: str) -> Exception:
    return TransientError("injected transient fault", key=key)


@dataclass
class Fault:
    op: str
    after: int = 0
    times: int = 1
    error: Callable[[str], Exception] = _transient
    truncate: bool = False
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)


@dataclass
class _Object:
    data: bytes
    version: int
    modified: float


class MemoryStorage(Storage):
    scheme = "memory"
    _named: ClassVar[dict[str, MemoryStorage]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str = "memory://test") -> None:
        super().__init__(url)
        self._objects: dict[str, _Object] = {}
        self._lock = threading.Lock()
        self._next_version = 1
        self.faults: list[Fault] = []
        self.calls: dict[str, int] = {}

    @classmethod
    def named(cls, url: str) -> MemoryStorage:
        """One shared instance per URL within a process, so CLI calls in tests see the same objects."""
        with cls._named_lock:
            if url not in cls._named:
                cls._named[url] = cls(url)
            return cls._named[url]

    # -- fault injection ----------------------------------------------------------------------------------

    def inject(self, op: str, **kwargs: Any) -> Fault:
        fault = Fault(op, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _check(self, op: str, key: str) -> Fault | None:
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
            for fault in self.faults:
                if fault.op != op or fault.fired >= fault.times:
                    continue
                fault.seen += 1
                if fault.seen > fault.after:
                    fault.fired += 1
                    if fault.truncate:
                        return fault
                    raise fault.error(key)
        return None

    # -- the contract -------------------------------------------------------------------------------------

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        self._check("stat", key)
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                raise NotFound(f"object {key} not found", key=key)
            return ObjectInfo(key, len(obj.data), str(obj.version), obj.modified)

    def open_read(self, key: str, offset: int = 0, length: int | None = None) -> ObjectReader:
        check_key(key)
        self._check("open_read", key)
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                raise NotFound(f"object {key} not found", key=key)
            end = len(obj.data) if length is None else min(len(obj.data), offset + length)
            return _MemoryReader(self, key, obj.data[offset:end])

    def open_write(self, key: str, mode: WriteMode = OVERWRITE) -> ObjectWriter:
        check_key(key)
        self._check("open_write", key)
        return _MemoryWriter(self, key, mode)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        last = ""
        while True:
            self._check("list", prefix)
            with self._lock:
                keys = sorted(k for k in self._objects if k.startswith(prefix) and k > last)[
                    : self.capabilities.list_page_size
                ]
                page = [
                    ObjectInfo(k, len(self._objects[k].data), str(self._objects[k].version), self._objects[k].modified)
                    for k in keys
                ]
            yield from page
            if len(page) < self.capabilities.list_page_size:
                return
            last = page[-1].key

    def delete_many(self, keys: Iterable[str]) -> None:
        batch = [check_key(k) for k in keys]
        for start in range(0, len(batch), self.capabilities.delete_batch_size):
            chunk = batch[start : start + self.capabilities.delete_batch_size]
            self._check("delete_many", chunk[0])
            with self._lock:
                for key in chunk:
                    self._objects.pop(key, None)

    # -- used by the writer -------------------------------------------------------------------------------

    def _publish(self, key: str, data: bytes, mode: WriteMode) -> ObjectInfo:
        self._check("commit", key)
        with self._lock:
            current = self._objects.get(key)
            if isinstance(mode, CreateOnly) and current is not None:
                raise AlreadyExists(f"object {key} already exists", key=key)
            if isinstance(mode, IfVersion) and (current is None or str(current.version) != mode.version):
                raise PreconditionFailed(f"object {key} changed since version {mode.version}", key=key)
            version = self._next_version
            self._next_version += 1
            self._objects[key] = _Object(data, version, time.time())
            return ObjectInfo(key, len(data), str(version), self._objects[key].modified)


class _MemoryReader(ObjectReader):
    def __init__(self, storage: MemoryStorage, key: str, data: bytes) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._data = memoryview(data)
        self._pos = 0
        self.size = len(data)

    def readinto(self, buffer: Any) -> int:
        fault = self._storage._check("read", self._key)
        if fault is not None:  # truncated: the stream ends early, as a dropped connection would
            self._pos = len(self._data)
            return 0
        n = min(len(buffer), len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class _MemoryWriter(ObjectWriter):
    def __init__(self, storage: MemoryStorage, key: str, mode: WriteMode) -> None:
        self.key = key
        self._storage = storage
        self._mode = mode
        self._chunks: list[bytes] = []
        self._done = False
        self._policy = NO_RETRY

    def use_retry(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ValueError(f"write to {self.key} after commit or abort")
        self._storage._check("write", self.key)
        self._chunks.append(bytes(data))
        return len(data)

    def commit(self) -> ObjectInfo:
        if self._done:
            raise ValueError(f"commit of {self.key} after commit or abort")
        data = b"".join(self._chunks)
        try:
            info = self._policy.call(lambda: self._storage._publish(self.key, data, self._mode), f"write {self.key}")
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._chunks = []
        return info

    def abort(self) -> None:
        self._done = True
        self._chunks = []
