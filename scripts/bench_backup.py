#!/usr/bin/env python3
"""Benchmark ``backup-push`` and ``restore``: MB/s and peak RSS for pgbench databases of scale 50 and 200,
against the file backend and an S3 server (SeaweedFS's gateway on loopback, started and stopped here by PID),
next to the raw storage ceiling: a plain copy of the same bytes to and from the same storage.

Run as root on a machine prepared by ``scripts/install.sh`` (PostgreSQL runs as the ``postgres`` user):

    /opt/cloudbk-venv/bin/python scripts/bench_backup.py                  # scales 50 and 200, file and s3
    /opt/cloudbk-venv/bin/python scripts/bench_backup.py --scales 10 --backends file

MB/s is the database size (the bytes of the files in the backup, as the manifest records them) divided by the
wall time of the command. Peak RSS is the high-water resident set (VmHWM) of the cloudbk process.
The data is read from the page cache in every row alike (the machine has room for it): the numbers compare
cloudbk with a plain copy, they are not disk benchmarks. Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from pgcluster import BIN_DIR, PG_BIN, PgCluster, new_dir, pg_command, run_as_pg  # noqa: E402

MiB = 1024 * 1024


@dataclass
class Measure:
    seconds: float
    max_rss_kib: int
    stdout: str


@dataclass
class Row:
    scale: int
    backend: str
    what: str
    size: int
    seconds: float
    max_rss_kib: int | None
    note: str = ""

    @property
    def mbps(self) -> float:
        return self.size / MiB / self.seconds if self.seconds else 0.0


def say(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss:
    """The largest VmHWM among a process tree, sampled until it ends.

    Not ``wait4``'s ru_maxrss: a child's ru_maxrss starts from its parent's peak at fork/exec, so it would
    report this (large) benchmark process instead of cloudbk. VmHWM belongs to one address space, and being a
    high-water mark, any sample taken after the peak sees it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in _descendants(self.pid):
                self.peak = max(self.peak, _hwm_kib(pid))
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measured(argv: Sequence[str], env: dict[str, str]) -> Measure:
    """Run ``argv`` as the postgres user; wall time and the peak RSS of its largest process."""
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PATH"] = f"{BIN_DIR}:{PG_BIN}:{full_env.get('PATH', '/usr/bin:/bin')}"
    os.sync()  # start from a clean page cache: writeback left by the previous step must not slow this one
    start = time.monotonic()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(pg_command(argv), env=full_env, stdout=out, stderr=err, cwd="/")
        rss = PeakRss(proc.pid)
        proc.wait()
        seconds = time.monotonic() - start
        peak = rss.stop()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.read().decode()}")
        out.seek(0)
        return Measure(seconds, peak, out.read().decode())


def data_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


class Concatenation:
    """The bytes of every file under a directory as one stream (for the S3 ceiling)."""

    def __init__(self, root: Path) -> None:
        self._files = data_files(root)
        self._current: object = None
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, fewer only at the end (readers take a short read for the end of the stream)."""
        want = n if n and n > 0 else MiB
        out = bytearray()
        while len(out) < want:
            if self._current is None:
                path = next(self._files, None)
                if path is None:
                    break
                self._current = open(path, "rb")  # noqa: SIM115 - closed below when exhausted
            data: bytes = self._current.read(want - len(out))  # type: ignore[attr-defined]
            if not data:
                self._current.close()  # type: ignore[attr-defined]
                self._current = None
                continue
            out += data
        self.size += len(out)
        return bytes(out)


class Bench:
    def __init__(self, scales: list[int], backends: list[str], keep: bool) -> None:
        self.scales = scales
        self.backends = backends
        self.keep = keep
        self.rows: list[Row] = []
        self.work = new_dir("bench")
        self.s3: object | None = None
        self.repos: dict[str, tuple[str, dict[str, str]]] = {}

    # -- services ---------------------------------------------------------------------------------------------

    def start_services(self) -> None:
        self.repos["file"] = (f"file://{self.work}/repo-file", {})
        if "s3" in self.backends:
            from services.s3 import start_seaweedfs

            home = Path(tempfile.mkdtemp(prefix="bench-weed-", dir=self.work))
            say("starting SeaweedFS (weed mini) on loopback")
            service = start_seaweedfs(home, home)
            self.s3 = service
            backend = service.make("bench")
            self.repos["s3"] = (backend.url, dict(backend.env))

    def stop_services(self) -> None:
        if self.s3 is not None:
            self.s3.stop()  # type: ignore[attr-defined]  # by the PID we started

    # -- one scale --------------------------------------------------------------------------------------------

    def run_scale(self, scale: int) -> None:
        env: dict[str, str] = {}
        pushes = []
        for name in self.backends:
            url, repo_env = self.repos[name]
            env.update(repo_env)
            pushes.append(f"{BIN_DIR / 'cloudbk-wal-push'} --repo {url} --server s{scale} %p")
        pg = PgCluster.init(f"bench-s{scale}", env=env)
        try:
            pg.enable_archiving(" && ".join(pushes))
            pg.configure({"max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'", "shared_buffers": "'256MB'"})
            pg.start()
            say(f"pgbench -i -s {scale}")
            run_as_pg([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
                       "-U", "postgres", "postgres"], env=env, timeout=3600)  # fmt: skip
            pg.sql("CHECKPOINT")
            pg.sql("SELECT pg_switch_wal()")
            pg.wait_archived(timeout=1800)
            for name in self.backends:
                self.bench_backend(scale, name, pg)
        finally:
            pg.destroy()

    def bench_backend(self, scale: int, name: str, pg: PgCluster) -> None:
        url, repo_env = self.repos[name]
        env = {**repo_env, "CLOUDBK_REPO": url, "CLOUDBK_SERVER": f"s{scale}"}
        cloudbk = str(BIN_DIR / "cloudbk")
        say(f"scale {scale}, {name}: backup-push")
        backup = measured([cloudbk, "backup-push", "--dbname", pg.conninfo, "--pgdata", str(pg.datadir)], env)
        backup_id = backup.stdout.strip().splitlines()[-1]
        shown = json.loads(measured([cloudbk, "backup-show", backup_id, "--json"], env).stdout)
        size, stored = int(shown["data_size"]), int(shown["stored_size"])
        note = f"stored {stored / MiB:.0f} MiB ({size / stored:.1f}x)"
        self.rows.append(Row(scale, name, "backup-push", size, backup.seconds, backup.max_rss_kib, note))

        dest = new_dir(f"bench-restore-{name}") / "data"
        say(f"scale {scale}, {name}: restore")
        restored = measured([cloudbk, "restore", str(dest), "--backup", backup_id, "--target-immediate"], env)
        self.rows.append(Row(scale, name, "restore", size, restored.seconds, restored.max_rss_kib))
        shutil.rmtree(dest.parent, ignore_errors=True)

        say(f"scale {scale}, {name}: raw copy of the same bytes")
        up, down = self.ceiling(name, pg.datadir, url, repo_env)
        self.rows.append(Row(scale, name, "raw write (ceiling)", size, up, None, "uncompressed"))
        self.rows.append(Row(scale, name, "raw read (ceiling)", size, down, None, "uncompressed"))

    def ceiling(self, name: str, pgdata: Path, url: str, repo_env: dict[str, str]) -> tuple[float, float]:
        """Seconds to copy PGDATA's bytes to the storage and back, with no cloudbk in between."""
        os.sync()
        if name == "file":
            target = self.work / "raw-copy"
            start = time.monotonic()
            shutil.copytree(pgdata, target, symlinks=True, ignore=shutil.ignore_patterns("postmaster.pid"))
            subprocess.run(["sync", "-f", str(target)], check=True)  # cloudbk fsyncs what it stores; so does this
            up = time.monotonic() - start
            os.sync()
            start = time.monotonic()
            shutil.copytree(target, self.work / "raw-back", symlinks=True)
            down = time.monotonic() - start
            shutil.rmtree(target)
            shutil.rmtree(self.work / "raw-back")
            return up, down
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        bucket, _, prefix = url[len("s3://") :].partition("/")
        client = boto3.client(
            "s3",
            endpoint_url=repo_env["CLOUDBK_ENDPOINT_URL"],
            aws_access_key_id=repo_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=repo_env["AWS_SECRET_ACCESS_KEY"],
            region_name=repo_env.get("AWS_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}),
        )
        config = TransferConfig(multipart_chunksize=8 * MiB, max_concurrency=4)  # what cloudbk's writer uses
        key = f"{prefix}/raw-ceiling"
        source = Concatenation(pgdata)
        start = time.monotonic()
        client.upload_fileobj(source, bucket, key, Config=config)
        up = time.monotonic() - start
        stored = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if not source.size or stored != source.size:
            raise SystemExit(f"raw upload stored {stored} bytes of {source.size}")
        local = self.work / "raw-download"
        os.sync()
        start = time.monotonic()
        with open(local, "wb") as f:
            client.download_fileobj(bucket, key, f, Config=config)
        down = time.monotonic() - start
        client.delete_object(Bucket=bucket, Key=key)
        local.unlink()
        return up, down

    # -- report -----------------------------------------------------------------------------------------------

    def table(self) -> str:
        header = ["scale", "backend", "operation", "DB MiB", "seconds", "MB/s", "peak RSS", "note"]
        rows = [
            [str(r.scale), r.backend, r.what, f"{r.size / MiB:.0f}", f"{r.seconds:.1f}", f"{r.mbps:.0f}",
             f"{r.max_rss_kib / 1024:.0f} MiB" if r.max_rss_kib else "-", r.note]
            for r in self.rows
        ]  # fmt: skip
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) + " |" for x in [header, *rows]]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def run(self) -> None:
        self.start_services()
        try:
            for scale in self.scales:
                self.run_scale(scale)
        finally:
            self.stop_services()
            if not self.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        print(self.table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="50,200", help="pgbench scales, comma separated (default 50,200)")
    parser.add_argument("--backends", default="file,s3", help="file and/or s3 (default both)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: PostgreSQL runs as the postgres user, switched to with runuser")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"file", "s3"}
    if unknown:
        raise SystemExit(f"unknown backends: {', '.join(sorted(unknown))}")
    Bench([int(s) for s in args.scales.split(",")], backends, args.keep).run()


if __name__ == "__main__":
    main()
