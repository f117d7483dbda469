#!/usr/bin/env python3
"""Benchmark base backups and restores: cloudbk next to pgBackRest and barman-cloud, one S3 endpoint, one run.

The endpoint is SeaweedFS's S3 gateway over HTTPS on 127.0.0.1 (pgBackRest speaks S3 only over TLS), started
and stopped here by PID. For each dataset (pgbench scale 50, scale 200, and scale 50 plus 512 MiB of random
bytes, which do not compress) one PostgreSQL 15 cluster archives its WAL with all three tools, then each tool
takes a full backup and restores it into an empty directory:

- cloudbk ``backup-push`` / ``restore --target-immediate`` with ``--jobs 2``;
- pgBackRest ``backup --type=full`` / ``restore --type=immediate`` with ``process-max=2``, zstd at cloudbk's
  level (Debian package ``pgbackrest``);
- barman-cloud ``barman-cloud-backup -J 2 --lz4`` / ``barman-cloud-restore`` (``barman[cloud]`` in the
  virtualenv ``BENCH_BARMAN_VENV``, default /opt/barman-venv; its base backups have no zstd, lz4 is its
  fastest codec; the ``lz4`` module must be installed there).

Reported per command: MiB/s of PGDATA (the bytes of its files outside pg_wal, the same for every tool, per
wall-clock second of the whole command), the bytes stored, the CPU seconds of every process the command
started (detached workers included; PostgreSQL and the S3 server excluded) and the peak of the summed RSS of
its process tree. PGDATA is read once before each backup, so every tool finds it in the page cache. Run as
root on a machine prepared by ``scripts/install.sh``:

    /opt/cloudbk-venv/bin/python scripts/bench_backup.py                       # the three datasets
    /opt/cloudbk-venv/bin/python scripts/bench_backup.py --datasets 10 --json out.json

Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT / "scripts")]

from benchlib.basebackup import (  # noqa: E402
    JOBS,
    MiB,
    Tool,
    barman_tool,
    cloudbk_tool,
    empty_dest,
    measured,
    pgbackrest_tool,
    stored_bytes,
)
from benchlib.endpoint import Endpoint, start_endpoint  # noqa: E402
from benchlib.peers import Barman, barman_available, write_pgbackrest_config  # noqa: E402
from benchlib.proctree import become_subreaper  # noqa: E402
from benchlib.runner import chown_tree  # noqa: E402
from pgcluster import BIN_DIR, PG_BIN, PgCluster, new_dir, run_as_pg  # noqa: E402

PEER = "pgBackRest"


def say(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


def pgdata_bytes(datadir: Path) -> int:
    """The bytes of the data directory's files outside pg_wal: what every tool has to copy."""
    total = 0
    for root, dirs, files in os.walk(datadir):
        if Path(root) == datadir:
            dirs[:] = [d for d in dirs if d != "pg_wal"]
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def warm(datadir: Path) -> None:
    """Read every file once, so each tool reads PGDATA from the page cache alike (the first one would otherwise
    pay for reading from disk what the next ones find cached)."""
    for root, _dirs, files in os.walk(datadir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(4 * MiB):
                    pass


def parse_dataset(spec: str) -> tuple[int, int]:
    """``50`` -> (50, 0); ``50+rnd512`` -> (50, 512): pgbench scale, MiB of random bytes."""
    scale, _, extra = spec.partition("+rnd")
    return int(scale), int(extra or 0)


def load(pg: PgCluster, scale: int, random_mib: int) -> None:
    """pgbench data (and random bytes in PGDATA/bench_random), before archiving starts: none of it is in WAL."""
    say(f"pgbench -i -s {scale}" + (f" + {random_mib} MiB of random bytes" if random_mib else ""))
    run_as_pg([str(PG_BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres"], timeout=3600)  # fmt: skip
    if random_mib:
        target = pg.datadir / "bench_random"
        run_as_pg(["sh", "-ec", f"mkdir -p '{target}'; head -c {random_mib}M /dev/urandom > '{target}/random.bin'"])
    pg.sql("CHECKPOINT")


class Bench:
    def __init__(self, work: Path, endpoint: Endpoint, tools: list[str]) -> None:
        self.work = work
        self.endpoint = endpoint
        self.tools = tools
        self.results: list[dict[str, Any]] = []

    def cluster(self, tag: str, scale: int, random_mib: int) -> tuple[PgCluster, list[Tool]]:
        env = {**self.endpoint.env(), "CLOUDBK_REPO": f"s3://{self.endpoint.bucket}/cloudbk", "CLOUDBK_SERVER": tag}
        pg = PgCluster.init(f"bench-{tag}", env=env)
        pg.configure({"max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'", "shared_buffers": "'256MB'"})
        pg.start()
        load(pg, scale, random_mib)
        pgbackrest = write_pgbackrest_config(
            self.work / f"pgbackrest-{tag}", self.endpoint, tag, pg.datadir, pg.port, pg.socket_dir
        )
        spool = self.work / f"barman-spool-{tag}"
        spool.mkdir()
        chown_tree(spool)
        commands = {
            "cloudbk": f"{BIN_DIR / 'cloudbk-wal-push'} %p",
            "pgBackRest": pgbackrest.archive_command(),
            "barman-cloud": " ".join(Barman(self.endpoint, spool, tag).archive("%p")),
        }
        pg.enable_archiving(" && ".join(commands[t] for t in self.tools))
        pg.stop()
        pg.start()
        pgbackrest.create_stanza()
        makers = {
            "cloudbk": lambda: cloudbk_tool(self.endpoint, tag),
            "pgBackRest": lambda: pgbackrest_tool(self.endpoint, pgbackrest),
            "barman-cloud": lambda: barman_tool(self.endpoint, tag),
        }
        return pg, [makers[t]() for t in self.tools]

    def services(self, pg: PgCluster) -> list[int]:
        try:
            postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            postmaster = 0
        return [*self.endpoint.pids(), *([postmaster] if postmaster else [])]

    def dataset(self, spec: str) -> None:
        scale, random_mib = parse_dataset(spec)
        tag = f"s{scale}" + (f"r{random_mib}" if random_mib else "")
        pg, tools = self.cluster(tag, scale, random_mib)
        try:
            size = pgdata_bytes(pg.datadir)
            for tool in tools:
                self.results.append({"dataset": spec, "tool": tool.name, "pgdata_bytes": size, **self.run(pg, tool)})
        finally:
            pg.destroy()

    def run(self, pg: PgCluster, tool: Tool) -> dict[str, Any]:
        warm(pg.datadir)
        say(f"{tool.name}: backup")
        backup = measured(tool.backup(pg), tool.env, lambda: self.services(pg))
        backup_id = tool.backup_id(backup.stdout)
        stored = stored_bytes(self.endpoint, tool.prefix(backup_id))
        dest = empty_dest(f"bench-restore-{tool.name}")
        say(f"{tool.name}: restore of {backup_id}")
        restored = measured(tool.restore(backup_id, dest), tool.env, lambda: self.services(pg))
        restored_size = pgdata_bytes(dest)
        shutil.rmtree(dest.parent, ignore_errors=True)
        return {
            "backup_s": backup.seconds, "backup_cpu_s": backup.cpu_seconds, "backup_rss_kib": backup.peak_rss_kib,
            "restore_s": restored.seconds, "restore_cpu_s": restored.cpu_seconds,
            "restore_rss_kib": restored.peak_rss_kib, "stored_bytes": stored, "restored_bytes": restored_size,
        }  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    def ratio(value: float, peer: float | None) -> str:
        return f"{value / peer:.2f}x" if peer else "-"

    vs = f"x {PEER}"
    header = ["dataset", "tool", "PGDATA MiB", "backup MiB/s", vs, "restore MiB/s", vs, "stored MiB", vs,
              "backup CPU s", "restore CPU s", "backup peak RSS", "restore peak RSS"]  # fmt: skip
    rows = []
    for r in results:
        peer = next((p for p in results if p["dataset"] == r["dataset"] and p["tool"] == PEER), None)
        mib = r["pgdata_bytes"] / MiB
        up, down, stored = mib / r["backup_s"], mib / r["restore_s"], r["stored_bytes"] / MiB
        peer_up = peer["pgdata_bytes"] / MiB / peer["backup_s"] if peer else None
        peer_down = peer["pgdata_bytes"] / MiB / peer["restore_s"] if peer else None
        peer_stored = peer["stored_bytes"] / MiB if peer else None
        rows.append([r["dataset"], r["tool"], f"{mib:.0f}", f"{up:.0f}", ratio(up, peer_up), f"{down:.0f}",
                     ratio(down, peer_down), f"{stored:.1f}", ratio(stored, peer_stored), f"{r['backup_cpu_s']:.1f}",
                     f"{r['restore_cpu_s']:.1f}", f"{r['backup_rss_kib'] / 1024:.0f} MiB",
                     f"{r['restore_rss_kib'] / 1024:.0f} MiB"])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="50,200,50+rnd512", help="pgbench scales, SCALE+rndMIB adds random bytes")
    parser.add_argument("--tools", default="cloudbk,pgBackRest,barman-cloud", help="which tools, comma separated")
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: PostgreSQL runs as the postgres user")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if "barman-cloud" in tools and not barman_available():
        raise SystemExit("barman-cloud not found: a virtualenv at /opt/barman-venv with barman[cloud] and lz4")
    if PEER not in tools:
        raise SystemExit(f"{PEER} is the reference every ratio is against: keep it in --tools")
    become_subreaper()  # detached workers (pgBackRest's) are counted too
    work = new_dir("bench-backup")
    home = work / "endpoint"
    home.mkdir(mode=0o755)  # the CA certificate in it is read by the tools, as the PostgreSQL user
    endpoint = start_endpoint(home)
    bench = Bench(work, endpoint, tools)
    say(f"SeaweedFS over HTTPS at {endpoint.url}; {JOBS} jobs for every tool")
    try:
        for spec in args.datasets.split(","):
            bench.dataset(spec.strip())
    finally:
        endpoint.stop()  # by the PID we started
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.results, indent=1))
    print(table(bench.results))


if __name__ == "__main__":
    main()
