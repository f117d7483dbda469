"""Start one backend's service outside pytest (the benchmark scripts use this; the tests use the fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends import unique_prefix


def start_backend(name: str, work: Path) -> tuple[Any, str, dict[str, str]]:
    """(service or None, repository URL, environment) for backend ``name``, with its files under ``work``.

    The caller stops the service (``service.stop()``, by PID) when done.
    """
    if name == "file":
        return None, f"file://{work / 'repo'}", {}
    service: Any
    if name == "s3-moto":
        from services.s3 import start_moto

        service = start_moto(work)
    elif name == "s3-seaweedfs":
        from services.s3 import start_seaweedfs

        home = work / "seaweedfs"
        home.mkdir()
        service = start_seaweedfs(home, work)
    elif name == "azure":
        from services.azure import AzuriteService

        service = AzuriteService(work / "azurite", work)
        service.start()
    elif name == "gcs":
        from services.gcs import FakeGCSService

        service = FakeGCSService(work / "gcs", work)
        service.start()
    else:
        raise SystemExit(f"unknown backend {name!r}")
    backend = service.make(unique_prefix("bench"))
    return service, backend.url, backend.env
