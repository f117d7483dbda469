"""Pieces of ``scripts/bench_backup.py``: base backups and restores by cloudbk, pgBackRest and barman-cloud on
one S3 endpoint, each measured for wall time, CPU seconds of every process it starts, the peak RSS of its
process tree and the bytes it stored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgcluster import BIN_DIR, PG_USER, PgCluster, new_dir

from .endpoint import Endpoint, _boto3_client
from .peers import BARMAN_VENV, PgBackRest
from .proctree import CpuMeter, all_processes, subtree
from .runner import base_env, pg_identity

MiB = 1024 * 1024
JOBS = 2  # cloudbk --jobs, pgBackRest process-max, barman-cloud -J


@dataclass(frozen=True)
class Measure:
    seconds: float
    cpu_seconds: float
    peak_rss_kib: int  # the largest sum of the RSS of the command's process tree, sampled every 50 ms
    stdout: str


class TreeRss:
    """Samples the summed RSS of a process tree (its workers included) until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss_kib(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = subtree(all_processes(), [self.pid])
            self.peak = max(self.peak, sum(self._rss_kib(p) for p in pids))
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measured(argv: Sequence[str], env: dict[str, str], services: Callable[[], list[int]]) -> Measure:
    """Run ``argv`` as the PostgreSQL user: wall time, CPU of everything it starts, peak RSS of its tree."""
    os.sync()  # writeback left by the previous step must not slow this one
    meter = CpuMeter(services, settle=30.0)
    meter.start()
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), env=base_env(env), stdout=out, stderr=err, cwd="/", **_as_pg())
        rss = TreeRss(proc.pid)
        proc.wait()
        seconds = time.monotonic() - start
        peak = rss.stop()
        meter.stop()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.read().decode()[-4000:]}")
        out.seek(0)
        return Measure(seconds, meter.seconds, peak, out.read().decode())


def _as_pg() -> dict[str, object]:
    """Popen arguments that switch to the PostgreSQL user when we are root."""
    ident = pg_identity()
    return {} if ident is None else {"user": ident[0], "group": ident[1], "extra_groups": []}


def output_of(argv: Sequence[str], env: dict[str, str]) -> str:
    """The stdout of ``argv`` run as the PostgreSQL user (it must succeed)."""
    proc = subprocess.run(list(argv), env=base_env(env), capture_output=True, text=True, cwd="/", **_as_pg())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def stored_bytes(endpoint: Endpoint, prefix: str) -> int:
    """Bytes of every object under ``prefix`` in the endpoint's bucket."""
    client = _boto3_client(endpoint, 2)
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=endpoint.bucket, Prefix=prefix):
        total += sum(int(o["Size"]) for o in page.get("Contents", []))
    client.close()
    return total


def empty_dest(tag: str) -> Path:
    dest = new_dir(tag) / "data"
    dest.mkdir(mode=0o700)
    shutil.chown(dest, PG_USER, PG_USER)
    return dest


@dataclass(frozen=True)
class Tool:
    """One tool's backup and restore of ``cluster`` against the endpoint."""

    name: str
    backup: Callable[[PgCluster], list[str]]
    restore: Callable[[str, Path], list[str]]  # (backup id, DEST)
    backup_id: Callable[[str], str]  # from the backup's stdout (may ask the repository)
    prefix: Callable[[str], str]  # the key prefix holding that backup
    env: dict[str, str]


def cloudbk_tool(endpoint: Endpoint, server: str) -> Tool:
    cloudbk = str(BIN_DIR / "cloudbk")
    env = {**endpoint.env(), "CLOUDBK_REPO": f"s3://{endpoint.bucket}/cloudbk", "CLOUDBK_SERVER": server,
           "CLOUDBK_JOBS": str(JOBS)}  # fmt: skip
    return Tool(
        "cloudbk",
        lambda pg: [cloudbk, "backup-push", "--dbname", pg.conninfo, "--pgdata", str(pg.datadir)],
        lambda bid, dest: [cloudbk, "restore", str(dest), "--backup", bid, "--target-immediate"],
        lambda out: out.strip().splitlines()[-1],
        lambda bid: f"cloudbk/{server}/backups/{bid}/",
        env,
    )


def pgbackrest_tool(endpoint: Endpoint, pgbackrest: PgBackRest) -> Tool:
    def backup_id(_: str) -> str:
        info = json.loads(output_of(pgbackrest.argv("--output=json", "info"), {}))
        return str(info[0]["backup"][-1]["label"])

    return Tool(
        "pgBackRest",
        lambda pg: pgbackrest.argv("--type=full", "--start-fast", "backup"),
        lambda bid, dest: pgbackrest.argv(f"--set={bid}", f"--pg1-path={dest}", "--type=immediate", "restore"),
        backup_id,
        lambda bid: f"pgbackrest-{pgbackrest.stanza}/backup/{pgbackrest.stanza}/{bid}/",
        {},
    )


def barman_tool(endpoint: Endpoint, server: str) -> Tool:
    url = f"s3://{endpoint.bucket}/barman"
    common = ["--endpoint-url", endpoint.url, "--addressing-style", "path"]

    def tool(name: str) -> str:
        return str(BARMAN_VENV / "bin" / name)

    def backup_id(_: str) -> str:
        argv = [tool("barman-cloud-backup-list"), *common, "--format", "json", url, server]
        return str(json.loads(output_of(argv, endpoint.env()))["backups_list"][-1]["backup_id"])

    backup = [tool("barman-cloud-backup"), *common, "--lz4", "-J", str(JOBS), "--immediate-checkpoint"]
    return Tool(
        "barman-cloud",
        lambda pg: [*backup, "-d", pg.conninfo, url, server],
        lambda bid, dest: [tool("barman-cloud-restore"), *common, url, server, bid, str(dest)],
        backup_id,
        lambda bid: f"barman/{server}/base/{bid}/",
        endpoint.env(),
    )
