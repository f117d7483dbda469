"""Fixtures for the backup/restore tests: repositories a PostgreSQL server (running as ``postgres``) can use,
and clusters that are always torn down."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from backends import PROCESS_BACKENDS, Backend, process_backend, selected
from bkhelpers import Clusters, remove_scratch_dirs, scratch_dir

# the backend, besides the file system, where concurrency and multipart behaviour is exercised
NETWORK_CHECK_BACKEND = "s3-seaweedfs"


def make_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    return process_backend(request, name, lambda: scratch_dir("repo") / "repo", "bk")


@pytest.fixture(params=selected(PROCESS_BACKENDS))
def pg_backend(request: pytest.FixtureRequest) -> Backend:
    """A fresh repository on each backend a separate process can reach."""
    return make_backend(request, request.param)


@pytest.fixture(params=selected(("file", NETWORK_CHECK_BACKEND)))
def concurrency_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, request.param)


@pytest.fixture
def file_backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request, "file")


@pytest.fixture
def clusters() -> Iterator[Clusters]:
    registry = Clusters()
    yield registry
    registry.destroy_all()


@pytest.fixture(autouse=True)
def _scratch() -> Iterator[None]:
    yield
    remove_scratch_dirs()
