"""``cloudbk drill``: restore a backup into a scratch directory, recover it, start it, check it, clean up.

Exit 0 only when the restore, the recovery and every check passed; a refusal (missing WAL, not enough space)
exits as ``restore`` would, a failed recovery or check 1. The report (``--json`` for cron and monitoring) gives
the backup, the target reached, the wall seconds of each phase and the RTO, the bytes fetched and each check's
result; a proof of the outcome is stored in the repository (docs/format.md, "Proofs"). See docs/drill.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from cloudbk.cli.common import LONG_RETRY_DEADLINE, open_repo, terminate_on_sigterm
from cloudbk.cli.output import ConsoleProgress, human_duration, human_size
from cloudbk.cli.restore import add_targets, check_backup_arg, parse_target, restore_command
from cloudbk.config import Settings
from cloudbk.errors import CloudbkError

log = logging.getLogger("cloudbk")

HELP = "prove a backup restores: recover it into a scratch directory, start it, run checks, clean up"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backup", metavar="ID|latest", help="the backup (default: the newest reaching the target)")
    add_targets(parser)
    parser.add_argument(
        "--check-sql", action="append", default=[], metavar="SQL",
        help="a query that must succeed on the recovered server (repeatable; after connect, the database list and "
        "amcheck on the system catalogs)",
    )  # fmt: skip
    parser.add_argument("--check-dbname", default="postgres", metavar="NAME", help="database of --check-sql")
    parser.add_argument("--check-user", metavar="NAME", help="role the checks connect as (default: --os-user's name)")
    parser.add_argument("--workdir", metavar="DIR", help="where the scratch directory is made (default: TMPDIR)")
    parser.add_argument("--pg-bin", metavar="DIR", help="PostgreSQL's bin directory (default: pg_config, PATH)")
    parser.add_argument("--os-user", metavar="NAME", help="OS user the server runs as (default postgres when root)")
    parser.add_argument(
        "--keep-preload", action="store_true", help="keep the backup's shared_preload_libraries (default: emptied)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (the server is stopped)")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="how long recovery may take before the drill fails (default 3600)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.drill.run import DrillOptions, run_drill
    from cloudbk.repo.proofs import DRILL, record_proof

    check_backup_arg(args.backup)
    options = DrillOptions(
        restore_command=restore_command(settings, settings.require_repo()),
        target=parse_target(args), backup_id=args.backup, check_sql=list(args.check_sql),
        check_dbname=args.check_dbname, check_user=args.check_user, workdir=args.workdir, pg_bin=args.pg_bin,
        os_user=args.os_user, keep_preload=args.keep_preload, keep=args.keep, timeout=args.timeout,
        environ=settings.environ, **({} if settings.jobs is None else {"jobs": settings.jobs}),
    )  # fmt: skip
    with terminate_on_sigterm(), open_repo(settings, LONG_RETRY_DEADLINE) as storage:
        report = run_drill(storage, settings.server, options, None if args.json else ConsoleProgress())
        if report.backup_id is not None:
            try:
                report.proof = record_proof(storage, settings.server, DRILL, report.backup_id, report.ok,
                                            report.to_dict())  # fmt: skip
            except CloudbkError as exc:
                log.warning("the result of the drill could not be recorded: %s", exc)
    if report.error:
        log.error("%s", report.error)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report.to_dict()))
    return report.exit_code


def format_report(doc: dict[str, Any]) -> str:
    lines = [f"drill of backup {doc['backup_id'] or '(none chosen)'}, target {doc['target']}: "
             + ("PASSED" if doc["ok"] else "FAILED")]  # fmt: skip
    for p in doc["phases"]:
        overlap = f"  (overlaps {', '.join(p['overlaps'])})" if p.get("overlaps") else ""
        lines.append(f"  phase  {p['name']:<26} {human_duration(p['seconds']):>8}   "
                     f"{p['start']:8.1f} s .. {p['end']:8.1f} s{overlap}")  # fmt: skip
    if doc["rto_seconds"] is not None:
        lines.append(f"  RTO    {human_duration(doc['rto_seconds'])} until the server accepted connections at the "
                     f"target; {human_duration(doc['total_seconds'])} in all")  # fmt: skip
    if doc["reached_lsn"] is not None:
        lines.append(f"  reached  LSN {doc['reached_lsn']}, last transaction {doc['reached_time'] or '(none replayed)'}"
                     f", now on timeline {doc['timeline']}")  # fmt: skip
    lines.append(f"  fetched  {human_size(doc['backup_bytes'])} of backup, {doc['wal_segments_fetched']} WAL segments "
                 f"({human_size(doc['wal_bytes_fetched'])})")  # fmt: skip
    for c in doc["checks"]:
        status = "OK" if c["ok"] else "FAILED"
        detail = c.get("error") if not c["ok"] else c.get("result")
        lines.append(f"  check  {c['name']}: {status}" + (f" ({detail})" if detail not in (None, "") else ""))
    if doc["error"]:
        lines.append(f"  error  {doc['error'].splitlines()[0]}")
    if doc["scratch"]:
        lines.append(f"  scratch  {'kept at ' if doc['kept'] else 'removed: '}{doc['scratch']}")
    return "\n".join(lines)
