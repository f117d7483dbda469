"""Helpers for the WAL tests: synthetic WAL files (a valid long page header, then content) and cloudbk's
environment for a backend."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from backends import Backend
from pgcluster import new_dir
from services.proxy import TcpProxy

from cloudbk.pg import walnames as wal

SEGMENT_SIZE = wal.DEFAULT_SEGMENT_SIZE
SYSID = 7312345678901234567
PG15_PAGE_MAGIC = 0xD110
XLP_LONG_HEADER = 0x0002


def segment_bytes(
    timeline: int,
    segno: int,
    sysid: int = SYSID,
    seed: str = "",
    segment_size: int = SEGMENT_SIZE,
    payload: int = 200_000,
) -> bytes:
    """A segment whose first page carries a long header like PostgreSQL writes, then ``payload`` pseudo-random
    bytes (different per ``seed``) and zeros, as a segment ended by pg_switch_wal looks."""
    header = struct.pack(
        "<HHIQI4xQII", PG15_PAGE_MAGIC, XLP_LONG_HEADER, timeline, segno * segment_size, 0, sysid, segment_size, 8192
    )
    body = hashlib.shake_256(f"{timeline}/{segno}/{seed}".encode()).digest(payload)
    return header + body + bytes(segment_size - len(header) - len(body))


def write_segment(directory: Path, timeline: int, segno: int, **kwargs: object) -> Path:
    name = wal.segment_name(timeline, segno)
    path = directory / name
    path.write_bytes(segment_bytes(timeline, segno, **kwargs))  # type: ignore[arg-type]
    return path


def write_file(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


_MADE: list[Path] = []


def scratch(tag: str) -> Path:
    """A directory owned by the PostgreSQL user, removed by :func:`remove_scratch` (segments are 16 MiB each)."""
    path = new_dir(tag)
    _MADE.append(path)
    return path


def remove_scratch() -> None:
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)


#: modules a hit path (run with ``python -I -S``) must never load
HEAVY_MODULES = ("site", "typing", "argparse", "json", "tomllib", "hashlib", "logging", "botocore", "zstandard")


def probe_hit_path(call: str, arg: str, cwd: Path, env: Mapping[str, str]) -> tuple[bool, set[str]]:
    """Run ``call`` (Python code whose value is the hit path's answer; ``sys.argv[2]`` is ``arg``) in an
    interpreter started like the launcher's (``-I -S``, the checkout on ``sys.path``): (its answer, the modules
    it loaded)."""
    probe = (
        f"import os, sys; sys.path.append(sys.argv[1]); ok = {call}; print(ok); print(' '.join(sorted(sys.modules)))"
    )
    repo_root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, repo_root, arg],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    verdict, modules = proc.stdout.splitlines()
    assert verdict in ("True", "False"), proc.stderr
    return verdict == "True", set(modules.split())


#: Short enough to keep the outage tests fast, long enough to ride out a slow emulator request.
TEST_RETRY_DEADLINE = "3"


def cloudbk_env(backend: Backend, **extra: str) -> dict[str, str]:
    """The environment a cloudbk process (or a PostgreSQL server running one) needs for ``backend``."""
    env = dict(backend.env)
    env["CLOUDBK_REPO"] = backend.url
    env["CLOUDBK_RETRY_DEADLINE"] = TEST_RETRY_DEADLINE
    env.update(extra)
    return env


@dataclasses.dataclass
class Outage:
    """A network backend reached two ways: ``direct``, and ``proxied`` through a proxy a test can cut."""

    direct: Backend
    proxied: Backend
    proxy: TcpProxy
