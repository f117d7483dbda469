"""``cloudbk check [--json] [--max-backup-age HOURS] [--max-wal-lag SEGMENTS] [--minimum-redundancy N]
[--max-drill-age HOURS] [--max-verify-age HOURS]``.

One line per check, ``name: OK`` or ``name: FAILED (detail)``, as ``barman check`` prints them; exit 1 (SPEC
§1: the operation failed) when any check failed, 0 when all passed. Monitoring can run it as is, or read
``--json``. Storage errors are retried for 10 seconds unless ``--retry-deadline`` says otherwise, so an
unreachable repository is reported promptly.
"""

from __future__ import annotations

import argparse
import json

from cloudbk.cli.common import open_repo
from cloudbk.config import Settings
from cloudbk.errors import CloudbkError, ExitCode, UsageError
from cloudbk.redact import redact_text
from cloudbk.storage.base import Storage

HELP = "check the archiving setup, the repository and the backups; nonzero exit if anything fails"
CHECK_RETRY_DEADLINE = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--max-backup-age", type=float, metavar="HOURS", help="fail when the newest backup is older (default 36)"
    )
    parser.add_argument(
        "--max-wal-lag",
        type=int,
        metavar="SEGMENTS",
        help="fail when more segments than this wait to be archived (default 16)",
    )
    parser.add_argument("--minimum-redundancy", type=int, metavar="N", help="fail with fewer backups (default 1)")
    parser.add_argument(
        "--max-drill-age",
        type=float,
        metavar="HOURS",
        help="fail when the last successful drill is older (default: no limit)",
    )
    parser.add_argument(
        "--max-verify-age", type=float, metavar="HOURS",
        help="fail when the last successful verify is older (default: no limit)",
    )  # fmt: skip


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.config import check_limits, proof_ages
    from cloudbk.lifecycle.checks import DEFAULT_MAX_BACKUP_AGE, DEFAULT_MAX_WAL_LAG, CheckOptions, run_checks

    age, lag, minimum = check_limits(settings, args.max_backup_age, args.max_wal_lag, args.minimum_redundancy)
    drill_age, verify_age = proof_ages(settings, args.max_drill_age, args.max_verify_age)
    options = CheckOptions(
        repo=settings.require_repo(),
        server=settings.server,
        conninfo=settings.dbname,
        max_backup_age=age or DEFAULT_MAX_BACKUP_AGE,
        max_wal_lag=DEFAULT_MAX_WAL_LAG if lag is None else lag,
        minimum_redundancy=minimum,
        max_drill_age=drill_age,
        max_verify_age=verify_age,
    )
    try:
        storage: Storage | None = open_repo(settings, CHECK_RETRY_DEADLINE)
    except UsageError:
        raise
    except CloudbkError:
        storage = None
    try:
        report = run_checks(storage, options)
    finally:
        if storage is not None:
            storage.close()
    if settings.pgdata:
        from cloudbk.wal import spool

        if not spool.in_recovery(settings.pgdata):
            spool.clean(settings.pgdata)  # a prefetch spool outlives recovery only until the next call or check
    # the report quotes server settings such as archive_command: never a URL's password
    if args.json:
        print(redact_text(json.dumps(report.to_dict(), indent=1)))
    else:
        print(f"Server {report.server}:")
        for r in report.results:
            status = "OK" if r.ok else "FAILED"
            print(redact_text(f"\t{r.name}: {status}" + (f" ({r.detail})" if r.detail else "")))
            if not r.ok and r.hint:
                print(redact_text(f"\t\tHINT: {r.hint}"))
    return ExitCode.OK if report.ok else ExitCode.FAILED
