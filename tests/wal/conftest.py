"""Fixtures for the WAL command tests: repositories a PostgreSQL server (running as ``postgres``) can use."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from backends import NETWORK_BACKENDS, PROCESS_BACKENDS, Backend, selected, unique_prefix
from pgcluster import new_dir
from services.proxy import TcpProxy, loopback_ports, redirect_env


def _process_backend(request: pytest.FixtureRequest, name: str) -> Backend:
    if name == "file":
        # pytest's tmp_path is private to root; archive_command runs as postgres
        return Backend(name, f"file://{new_dir('repo')}")
    service = request.getfixturevalue(f"{name.replace('-', '_')}_service")
    backend: Backend = service.make(unique_prefix("wal"))
    return backend


@pytest.fixture(params=selected(PROCESS_BACKENDS))
def pg_backend(request: pytest.FixtureRequest) -> Backend:
    """A fresh repository on each backend a separate process can reach (not ``memory``)."""
    return _process_backend(request, request.param)


@dataclasses.dataclass
class Outage:
    """A network backend reached two ways: ``direct``, and ``proxied`` through a proxy a test can cut."""

    direct: Backend
    proxied: Backend
    proxy: TcpProxy


@pytest.fixture(params=selected(NETWORK_BACKENDS))
def outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    direct = _process_backend(request, request.param)
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
