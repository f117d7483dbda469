from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backends import ALL_BACKENDS, Backend, selected, unique_prefix

pytest_plugins = [
    "services.s3",
    "services.azure",
    "services.gcs",
]


@pytest.fixture(scope="session")
def service_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


def _make_backend(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> Backend:
    prefix = unique_prefix()
    if name == "file":
        root = tmp_path / "repo"
        return Backend(name, f"file://{root}")
    if name == "memory":
        return Backend(name, f"memory://{prefix}")
    service = request.getfixturevalue(f"{name.replace('-', '_')}_service")
    backend: Backend = service.make(prefix)
    return backend


@pytest.fixture(params=selected(ALL_BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield _make_backend(request, request.param, tmp_path)
