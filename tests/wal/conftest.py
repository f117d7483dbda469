"""Fixtures for the WAL command tests: repositories a PostgreSQL server (running as ``postgres``) can use."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backends import NETWORK_BACKENDS, PROCESS_BACKENDS, Backend, process_backend, selected
from pgcluster import new_dir
from services.proxy import TcpProxy, loopback_ports, redirect_env
from walhelpers import Outage


def _process_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    return process_backend(request, name, lambda: new_dir("walrepo"), "wal")


@pytest.fixture(params=selected(PROCESS_BACKENDS))
def pg_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A fresh repository on each backend a separate process can reach (not ``memory``)."""
    backend = _process_backend(request, request.param)
    yield backend
    if backend.name == "file":
        shutil.rmtree(backend.url.removeprefix("file://"), ignore_errors=True)


@pytest.fixture
def pg_dirs() -> Iterator[Callable[[str], Path]]:
    """Make directories owned by the PostgreSQL user (``pg_dirs("tag")``), removed after the test."""
    made: list[Path] = []

    def make(tag: str) -> Path:
        path = new_dir(tag)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=selected(NETWORK_BACKENDS))
def outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    direct = _process_backend(request, request.param)  # a network backend: nothing on local disk
    ports = loopback_ports(direct.env)
    assert len(ports) == 1, f"expected one loopback endpoint in {direct.name}'s environment, found {ports}"
    (port,) = ports
    proxy = TcpProxy(port)
    proxy.start()
    proxied = dataclasses.replace(direct, env=redirect_env(direct.env, port, proxy.port))
    try:
        yield Outage(direct, proxied, proxy)
    finally:
        proxy.close()
