"""``cloudbk verify [ID|latest|--all] [--json]``: re-read a backup's objects and check them all.

One line per problem, naming the object (``PROBLEM <key>: <what>``); exit 0 only when everything verified, 4
(integrity failure, SPEC §1) when anything is wrong. Each backup verified gets a proof object in the
repository (docs/format.md, "Proofs"), which ``backup-list``, ``backup-show`` and ``check`` report.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from cloudbk.cli.common import LONG_RETRY_DEADLINE, open_repo, terminate_on_sigterm
from cloudbk.cli.output import human_duration, human_size
from cloudbk.config import Settings
from cloudbk.errors import CloudbkError, ExitCode, UsageError

log = logging.getLogger("cloudbk")

HELP = "re-read every object of a backup (or --all backups and the WAL between them) and verify each checksum"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backup_id", nargs="?", metavar="ID|latest", help="the backup to verify (default latest)")
    parser.add_argument("--all", action="store_true", help="every backup, and all archived WAL (wal-verify --deep)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _chosen(catalog: Any, args: argparse.Namespace) -> list[str]:
    from cloudbk.repo.catalog import find_backup, resolve_backup

    if args.all:
        if args.backup_id is not None:
            raise UsageError("give a backup id or --all, not both")
        return [b.id for b in catalog.backups] + sorted(catalog.damaged)
    wanted = args.backup_id or "latest"
    if wanted in catalog.damaged:
        return [wanted]  # damaged is what verify is for: it reports each problem
    if wanted == "latest":
        return [resolve_backup(catalog, wanted).id]
    return [find_backup(catalog.backups, wanted, catalog.index.server).id]


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.backup.verify import verify_backup
    from cloudbk.repo.catalog import load_catalog
    from cloudbk.repo.proofs import VERIFY, record_proof
    from cloudbk.wal.verify import verify_deep, verify_index

    jobs = settings.jobs or 4
    with terminate_on_sigterm(), open_repo(settings, LONG_RETRY_DEADLINE) as storage:
        catalog = load_catalog(storage, settings.server)
        results = [verify_backup(storage, settings.server, catalog.index, b, jobs) for b in _chosen(catalog, args)]
        wal = None
        if args.all:
            wal = verify_deep(storage, catalog.index, verify_index(catalog.index, catalog.backups), jobs)
        for r in results:
            try:
                record_proof(storage, settings.server, VERIFY, r.backup_id, r.ok, r.to_dict())
            except CloudbkError as exc:
                log.warning("the result of verifying backup %s could not be recorded: %s", r.backup_id, exc)
    ok = all(r.ok for r in results) and (wal is None or wal.ok)
    if args.json:
        doc = {"server": settings.server, "ok": ok, "backups": [r.to_dict() for r in results],
               "wal": None if wal is None else wal.to_dict()}  # fmt: skip
        print(json.dumps(doc, indent=1))
        return 0 if ok else ExitCode.OTHER
    for r in results:
        for p in r.problems:
            print(f"PROBLEM {p.key}: {p.message}")
        what = (f"{r.volumes} volumes, {human_size(r.bytes)} of files and {r.wal_segments} WAL segments checked "
                f"in {human_duration(r.seconds)}")  # fmt: skip
        print(f"backup {r.backup_id}: " + ("OK" if r.ok else f"FAILED ({len(r.problems)} problems)") + f" ({what})")
    if wal is not None:
        for problem in wal.problems:
            where = problem.key or f"WAL of timeline {problem.timeline}"
            print(f"PROBLEM {where}: {problem.message}")
        print(f"WAL archive: {'OK' if wal.ok else 'FAILED'} ({wal.objects_checked} objects read and checked)")
    print("verify: OK" if ok else "verify: FAILED")
    return 0 if ok else ExitCode.OTHER
