"""--retry-deadline bounds what a sick server can make cloudbk wait, on every network backend.

A loopback proxy in front of the emulator hangs (accepts, never answers) or drips (one byte at a time, from
the first byte of the response or after its headers). WAL commands must end within their deadline plus a
couple of seconds with the contract's exit codes; a stream read must be found stalled, and resumed or failed
within its retry budget.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backends import Backend, selected, unique_prefix
from services.proxy import TcpProxy, loopback_ports, redirect_env

from cloudbk.errors import ExitCode, TransientError
from cloudbk.pg import walnames as wal
from cloudbk.storage.deadline import BACKSTOP_GRACE
from cloudbk.storage.retry import RetryingStorage
from cloudbk.wal.push import push_wal

BIN = Path(sys.executable).parent
DEADLINE = 4.0
# interpreter start-up and SDK import (about a second on a loaded machine), the backstop's grace, and a margin
SLACK = 1.5 + BACKSTOP_GRACE + 1.0
SEG = wal.segment_name(1, 1)
NEW_SEG = wal.segment_name(1, 2)
BACKENDS = ("s3-moto", "azure", "gcs")


@dataclasses.dataclass
class Proxied:
    direct: Backend
    make: Callable[[], tuple[TcpProxy, Backend]]  # a new proxy, and the backend as seen through it


@pytest.fixture(params=selected(BACKENDS))
def proxied(request: pytest.FixtureRequest) -> Iterator[Proxied]:
    service = request.getfixturevalue(f"{request.param.replace('-', '_')}_service")
    direct: Backend = service.make(unique_prefix("dl"))
    (port,) = loopback_ports(direct.env)
    proxies: list[TcpProxy] = []

    def make() -> tuple[TcpProxy, Backend]:
        proxy = TcpProxy(port)
        proxy.start()
        proxies.append(proxy)
        return proxy, dataclasses.replace(direct, env=redirect_env(direct.env, port, proxy.port))

    try:
        yield Proxied(direct, make)
    finally:
        for proxy in proxies:
            proxy.close()


def _segment(directory: Path, name: str) -> Path:
    """A segment with a PostgreSQL 15 long page header and 50 kB of noise: well over one response's headers."""
    timeline, segno = int(name[:8], 16), int(name[16:], 16)
    size = wal.DEFAULT_SEGMENT_SIZE
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, timeline, segno * size, 0, 7312345678901234567, size, 8192)
    body = header + os.urandom(50_000)
    path = directory / name
    path.write_bytes(body + bytes(size - len(body)))
    return path


def test_wal_commands_end_within_the_deadline_when_storage_hangs_or_drips(proxied: Proxied, tmp_path: Path) -> None:
    storage = proxied.direct.open()
    push_wal(storage, "main", str(_segment(tmp_path, SEG)), "zstd")
    storage.close()
    new_segment = _segment(tmp_path, NEW_SEG)
    recovering = tmp_path / "pgdata"
    recovering.mkdir()
    (recovering / "recovery.signal").touch()

    cases: dict[str, tuple[str, str, list[str], str, int]] = {
        # name: (proxy behaviour, command, arguments, working directory, expected exit code)
        "fetch, server hangs, archive recovery": ("hang", "fetch", [SEG], str(recovering), ExitCode.FETCH_FATAL),
        "fetch, headers drip": ("drip-all", "fetch", [SEG], "/", ExitCode.STORAGE),
        "fetch, body drips": ("drip-body", "fetch", [SEG], "/", ExitCode.STORAGE),
        "push, server hangs": ("hang", "push", [], "/", ExitCode.STORAGE),
        "push, response drips": ("drip-all", "push", [], "/", ExitCode.STORAGE),
    }
    running = {}
    for name, (behaviour, command, args, cwd, _) in cases.items():
        proxy, backend = proxied.make()
        if behaviour == "hang":
            proxy.hang()
        else:
            proxy.drip(after=0 if behaviour == "drip-all" else 2000, interval=2.0)
        env = {**os.environ, **backend.env, "CLOUDBK_REPO": backend.url}
        if command == "fetch":
            argv = [str(BIN / "cloudbk-wal-fetch"), "--retry-deadline", str(DEADLINE), *args, str(tmp_path / name)]
        else:
            argv = [str(BIN / "cloudbk-wal-push"), "--retry-deadline", str(DEADLINE), str(new_segment)]
        started = time.monotonic()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running[name] = (process, started)
    report = []
    try:
        for name, (process, started) in running.items():
            _, stderr = process.communicate(timeout=60)
            elapsed = time.monotonic() - started
            report.append((name, process.returncode, round(elapsed, 1), stderr.strip().splitlines()[-3:]))
    finally:
        for process, _ in running.values():
            if process.poll() is None:  # only the processes this test started
                process.kill()
                process.wait()
    print(proxied.direct.name, report)
    for (name, code, elapsed, stderr), expected in zip(report, cases.values(), strict=True):
        assert code == expected[4], (name, stderr)
        assert DEADLINE * 0.8 <= elapsed <= DEADLINE + SLACK, (name, elapsed, stderr)
        assert not (tmp_path / name).exists()


def _stall_storage(backend: Backend, deadline: float) -> RetryingStorage:
    storage = backend.open(retry_deadline=deadline)
    assert isinstance(storage, RetryingStorage)
    storage.policy.stall_window = 1.0  # 64 KiB in a second of waiting, or the stream is stalled
    return storage


def test_stalled_stream_is_resumed_at_its_offset_or_fails_within_its_budget(proxied: Proxied) -> None:
    data = os.urandom(1024 * 1024)
    proxied.direct.open_driver().put_bytes("stream/k", data)

    proxy, backend = proxied.make()
    proxy.drip(after=4096, interval=0.2, connections=1)  # the first connection trickles, later ones are fine
    storage = _stall_storage(backend, deadline=10.0)
    started = time.monotonic()
    assert storage.get_bytes("stream/k") == data
    resumed = time.monotonic() - started
    assert proxy.dripped == 1 and proxy.connections >= 2
    assert resumed < 1.0 + 3.0, resumed

    proxy, backend = proxied.make()
    proxy.drip(after=4096, interval=0.2)  # every connection trickles: the retry budget runs out
    storage = _stall_storage(backend, deadline=3.0)
    started = time.monotonic()
    with pytest.raises(TransientError):
        storage.get_bytes("stream/k")
    failed = time.monotonic() - started
    print(proxied.direct.name, "resumed after a stall in", round(resumed, 1), "s; gave up in", round(failed, 1), "s")
    assert 3.0 * 0.8 <= failed <= 3.0 + 1.0 + 2.0, failed


def test_trickling_headers_end_an_operation_within_its_deadline(proxied: Proxied) -> None:
    """Outside a whole call too: the retry layer's backstop bounds what no socket timeout can (main thread)."""
    proxied.direct.open_driver().put_bytes("headers/k", b"x" * 1000)
    proxy, backend = proxied.make()
    proxy.drip(after=0, interval=0.5)  # every response, from its status line on, one byte per half second
    storage = backend.open(retry_deadline=2.0)
    started = time.monotonic()
    with pytest.raises(TransientError):
        storage.get_bytes("headers/k")
    elapsed = time.monotonic() - started
    print(proxied.direct.name, "trickling headers: gave up in", round(elapsed, 1), "s")
    assert elapsed <= 2.0 + BACKSTOP_GRACE + 1.0, elapsed
