"""``cloudbk wal-verify [--deep] [--json]``: gaps, foreign segments and timeline history consistency.

Exit 0 when the archive is complete and consistent, 4 (integrity failure, SPEC §1) when anything is wrong:
a gap, a segment of another database system, a corrupt object, an inconsistent timeline history.
"""

from __future__ import annotations

import argparse
import json

from cloudbk.cli.common import open_repo
from cloudbk.config import Settings
from cloudbk.errors import ExitCode

HELP = "verify the WAL archive from the oldest backup to the newest segment (--deep: read every object)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--deep",
        action="store_true",
        help="also read every WAL object: its checksum, and the system identifier in its page header",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.pg.walnames import segment_name
    from cloudbk.repo.catalog import load_catalog
    from cloudbk.wal.verify import FOREIGN, GAP, verify_deep, verify_index

    with open_repo(settings) as storage:
        catalog = load_catalog(storage, settings.server)
        report = verify_index(catalog.index, catalog.backups)
        if args.deep:
            verify_deep(storage, catalog.index, report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0 if report.ok else ExitCode.OTHER
    size = report.segment_size
    print(f"server {report.server}, system identifier {report.system_identifier or '(none yet)'}")
    for tr in report.timelines:
        if tr.required:
            first, last = tr.required[0][0], tr.required[-1][1]
            span = f"{segment_name(tr.timeline, first, size)} .. {segment_name(tr.timeline, last, size)}"
            status = "OK" if not tr.missing else f"GAPS ({sum(b - a + 1 for a, b in tr.missing)} segment(s) missing)"
            print(f"timeline {tr.timeline}: {span} ({tr.required_count} segments required): {status}")
        else:
            archived = sum(b - a + 1 for a, b in tr.archived)
            print(f"timeline {tr.timeline}: {archived} segments archived, none required by a backup")
    for problem in report.problems:
        print(f"{problem.kind.upper()}: {problem.message}")
    for note in report.notes:
        print(f"note: {note}")
    if args.deep:
        print(f"{report.objects_checked} objects read and checked")
    if report.ok:
        print("wal-verify: OK")
        return 0
    counts = ", ".join(
        f"{n} {label}" for n, label in ((report.count(GAP), "gap(s)"), (report.count(FOREIGN), "foreign")) if n
    )
    others = len(report.problems) - report.count(GAP) - report.count(FOREIGN)
    if others:
        counts = ", ".join(c for c in (counts, f"{others} other problem(s)") if c)
    print(f"wal-verify: FAILED ({counts})")
    return ExitCode.OTHER
