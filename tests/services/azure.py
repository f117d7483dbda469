"""Azurite (the Azure Blob emulator, ``azurite-blob`` from npm) as a session service for the tests.

One Azurite process per test session on a free loopback port, persisting to a directory so ``stop()`` then
``start()`` (same port, same directory) keeps the data; one container per session; one prefix per test.

Backends get the account the way an operator would configure a real one: ``AZURE_STORAGE_ACCOUNT`` and
``AZURE_STORAGE_KEY`` (Azurite's published development account and key) with ``CLOUDBK_ENDPOINT_URL`` set to the
path-style emulator URL ``http://127.0.0.1:PORT/devstoreaccount1``. ``AZURE_STORAGE_CONNECTION_STRING`` and
``AZURE_STORAGE_SAS_TOKEN`` are set empty so a developer's own Azure settings cannot take precedence.

The emulator is found through ``CLOUDBK_AZURITE`` (path to ``azurite-blob``), else the install location of
scripts/install.sh. ``CLOUDBK_AZURITE_DEBUG=1`` adds Azurite's debug log beside the service log.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import Backend

from cloudbk.storage.azure import DEFAULT_BLOCK_SIZE

from .proc import RestartableService, ServiceProcess, free_port

AZURITE_ENV = "CLOUDBK_AZURITE"
# where scripts/install.sh puts it: $CLOUDBK_TOOLS (default /opt/cloudbk-tools)/azurite
AZURITE_DEFAULT = os.path.join(
    os.environ.get("CLOUDBK_TOOLS", "/opt/cloudbk-tools"), "azurite/node_modules/.bin/azurite-blob"
)
# Azurite's well-known development account, published in its README and in Microsoft's Azurite docs
# ("Use the Azurite emulator for local Azure Storage development"). Not a secret.
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
READY_TIMEOUT = 60.0


def find_azurite() -> str:
    path = os.environ.get(AZURITE_ENV) or AZURITE_DEFAULT
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"azurite-blob not found at {path}; install it with scripts/install.sh or point {AZURITE_ENV} at it"
        )
    if shutil.which("node") is None:
        raise RuntimeError("node (Node.js 20) is not on PATH; Azurite needs it: install it with scripts/install.sh")
    return path


def _service_client(endpoint: str, **kwargs: Any) -> Any:
    from azure.storage.blob import BlobServiceClient

    credential = {"account_name": DEV_ACCOUNT, "account_key": DEV_KEY}
    return BlobServiceClient(endpoint, credential=credential, retry_total=0, connection_timeout=5, **kwargs)


class AzuriteService(RestartableService):
    """One Azurite blob service; ``make(prefix)`` gives a ``Backend`` for one test."""

    def __init__(self, workdir: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.container = f"cloudbk-{uuid.uuid4().hex[:12]}"
        self.endpoint = f"http://127.0.0.1:{self.port}/{DEV_ACCOUNT}"
        argv = [
            find_azurite(),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(self.data_dir),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ]
        if os.environ.get("CLOUDBK_AZURITE_DEBUG") == "1":
            argv += ["--debug", str(log_dir / "azurite-debug.log")]
        self.process = ServiceProcess(
            "azurite", argv, self.port, log_dir, cwd=str(workdir), ready_timeout=READY_TIMEOUT
        )
        self._container_created = False

    def _wait_ready(self) -> None:
        from azure.core.exceptions import AzureError, ResourceExistsError

        deadline = time.monotonic() + READY_TIMEOUT
        client = _service_client(self.endpoint)
        try:
            while True:
                try:
                    container = client.get_container_client(self.container)
                    if self._container_created:
                        container.get_container_properties()  # the data directory survived the restart
                    else:
                        try:
                            container.create_container()
                        except ResourceExistsError:
                            pass
                        self._container_created = True
                    return
                except AzureError as exc:
                    if time.monotonic() > deadline or not self.process.running():
                        raise RuntimeError(
                            f"Azurite on port {self.port} is not answering: {exc}\n{self.process.tail()}"
                        ) from exc
                    time.sleep(0.2)
        finally:
            client.close()

    def make(self, prefix: str) -> Backend:
        env = {
            "AZURE_STORAGE_ACCOUNT": DEV_ACCOUNT,
            "AZURE_STORAGE_KEY": DEV_KEY,
            "AZURE_STORAGE_CONNECTION_STRING": "",
            "AZURE_STORAGE_SAS_TOKEN": "",
            "CLOUDBK_ENDPOINT_URL": self.endpoint,
        }
        wrong_key = base64.b64encode(b"not-the-azurite-key-" * 3).decode()
        closed = f"http://127.0.0.1:{free_port()}/{DEV_ACCOUNT}"  # nothing listens there
        return Backend(
            name="azure",
            url=f"azure://{self.container}/{prefix}",
            env=env,
            service=self,
            bad_credentials_env={**env, "AZURE_STORAGE_KEY": wrong_key},
            unreachable_env={**env, "CLOUDBK_ENDPOINT_URL": closed},
            part_size=DEFAULT_BLOCK_SIZE,
        )


@pytest.fixture(scope="session")
def azure_service(tmp_path_factory: pytest.TempPathFactory, service_logs: Path) -> Iterator[AzuriteService]:
    service = AzuriteService(tmp_path_factory.mktemp("azurite"), service_logs)
    try:
        service.start()
        yield service
    finally:
        service.stop()
