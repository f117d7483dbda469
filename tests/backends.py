"""The backend registry of the test suite: one ``Backend`` per storage service, same shape for all.

Each service module in ``tests/services/`` provides a session fixture named ``<name>_service`` returning an
object with ``make(prefix) -> Backend``. A backend whose service fails to start raises, so its tests error:
in CI that is a failure, never a skip.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudbk.errors import AlreadyExists
from cloudbk.storage.base import CREATE_ONLY, Storage
from cloudbk.storage.registry import StorageOptions, open_driver, open_storage

# name -> fixture that provides it; conftest parametrizes over these
ALL_BACKENDS = ("file", "memory", "s3-moto", "s3-seaweedfs", "azure", "gcs")
# backends whose service rejects bad credentials (moto and fake-gcs-server accept any)
CREDENTIAL_CHECKING = ("s3-seaweedfs", "azure")
# backends behind a network endpoint
NETWORK_BACKENDS = ("s3-moto", "s3-seaweedfs", "azure", "gcs")
# backends reachable by a separate process (the memory backend lives in this process only)
PROCESS_BACKENDS = ("file", "s3-moto", "s3-seaweedfs", "azure", "gcs")


def selected(names: tuple[str, ...]) -> list[str]:
    """Backends to run: all of ``names`` unless CLOUDBK_TEST_BACKENDS narrows them (for local iteration)."""
    wanted = os.environ.get("CLOUDBK_TEST_BACKENDS")
    if not wanted:
        return list(names)
    keep = {w.strip() for w in wanted.split(",") if w.strip()}
    return [n for n in names if n in keep]


def unique_prefix(tag: str = "t") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def process_backend(request: Any, name: str, file_root: Callable[[], Path], tag: str) -> Backend:
    """A fresh repository on backend ``name`` that a separate process (PostgreSQL's commands) can reach:
    ``file://`` in a directory ``file_root()`` makes (readable by the PostgreSQL user; pytest's tmp_path is
    private to root), else under a unique prefix on the ``<name>_service`` fixture's service."""
    if name == "file":
        return Backend(name, f"file://{file_root()}")
    service = request.getfixturevalue(f"{name.replace('-', '_')}_service")
    backend: Backend = service.make(unique_prefix(tag))
    return backend


@dataclass
class Backend:
    """A repository on one storage service, unique to one test."""

    name: str
    url: str
    #: environment a cloudbk subprocess needs for this backend (credentials, endpoints), also used in-process
    env: dict[str, str] = field(default_factory=dict)
    #: for network backends: the service, so tests can stop and start it
    service: object | None = None
    #: env with credentials the service rejects, or None when the emulator does not check credentials
    bad_credentials_env: dict[str, str] | None = None
    #: env pointing the same URL at a closed port
    unreachable_env: dict[str, str] | None = None
    #: the driver's part size, where it has one (tests write more than this to exercise multipart)
    part_size: int = 0
    configure: Callable[[Storage], None] | None = None

    def options(self, env: dict[str, str] | None = None, retry_deadline: float = 30.0) -> StorageOptions:
        environ = dict(os.environ)
        environ.update(self.env if env is None else env)
        return StorageOptions(
            endpoint_url=environ.get("CLOUDBK_ENDPOINT_URL"), environ=environ, retry_deadline=retry_deadline
        )

    def open(self, env: dict[str, str] | None = None, retry_deadline: float = 30.0) -> Storage:
        storage = open_storage(self.url, self.options(env, retry_deadline))
        if self.configure:
            self.configure(storage)
        return storage

    def open_driver(self, env: dict[str, str] | None = None) -> Storage:
        storage = open_driver(self.url, self.options(env))
        if self.configure:
            self.configure(storage)
        return storage


def race_create_only(
    storage: Storage, key: str, content: Callable[[int], bytes], writers: int = 8
) -> tuple[list[int], int]:
    """``writers`` threads create ``key`` at the same moment, writer ``i`` storing ``content(i)`` create-only.

    Returns (the numbers of the writers that won, how many lost with ``AlreadyExists``), once all finished; a
    writer that failed otherwise counts in neither, so callers check the total too.
    """
    won: list[int] = []
    lost: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(writers)

    def write(i: int) -> None:
        barrier.wait()
        try:
            storage.put_bytes(key, content(i), CREATE_ONLY)
            outcome = won
        except AlreadyExists:
            outcome = lost
        with lock:
            outcome.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, len(lost)
