"""``cloudbk retention (--redundancy N | --recovery-window DAYS) [--minimum-redundancy N] [--dry-run]``.

Expires the backups the policy no longer needs and the WAL older than the oldest retained backup (see
:mod:`cloudbk.lifecycle.retention` for the exact rules). Without a policy flag the policy comes from
``CLOUDBK_RETENTION_*`` or the ``[retention]`` table of the config file, so ``cloudbk retention`` alone works
from cron. ``--dry-run`` lists every backup with its fate and every object that would be deleted.
It also aborts the incomplete uploads (S3 multipart) that a killed backup-push or wal-push left under the
server's prefix, once older than ``--stale-upload-age`` (default one day) and claimed by no running backup's
heartbeat (:mod:`cloudbk.repo.inflight`).
"""

from __future__ import annotations

import argparse
import json

from cloudbk.cli.common import open_repo
from cloudbk.config import Settings

HELP = "expire backups and WAL under a retention policy (REDUNDANCY N or RECOVERY WINDOW OF N DAYS)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--redundancy", type=int, metavar="N", help="keep the N newest backups")
    policy.add_argument(
        "--recovery-window",
        metavar="DAYS",
        help="keep what recovery to any point in the last DAYS days needs (a number of days, or 36h, 2w)",
    )
    parser.add_argument(
        "--minimum-redundancy", type=int, metavar="N", help="never leave fewer than N backups (default 1)"
    )
    parser.add_argument(
        "--stale-upload-age",
        metavar="AGE",
        help="abort incomplete uploads older than AGE that no running backup claims (default 1 day; 6h, 90s)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    parser.add_argument("--json", action="store_true", help="print the plan and its outcome as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.config import retention_policy, stale_upload_age
    from cloudbk.lifecycle.actions import apply_retention, describe_plan
    from cloudbk.pg.walnames import segment_name

    policy = retention_policy(settings, args.redundancy, args.recovery_window, args.minimum_redundancy)
    with open_repo(settings) as storage:
        max_age = stale_upload_age(settings, args.stale_upload_age)
        result = apply_retention(storage, settings.server, policy, dry_run=args.dry_run, stale_upload_age=max_age)
    if args.json:
        print(json.dumps(describe_plan(result), indent=1))
        return 0
    plan = result.plan
    verb = "would be deleted" if args.dry_run else "deleted"
    print(f"retention policy: {policy.describe()}" + (" (dry run: nothing is deleted)" if args.dry_run else ""))
    if not plan.decisions:
        print("no backups: nothing to do")
    for d in plan.decisions:
        b = d.backup
        fate = "RETAINED" if d.retain else "EXPIRED"
        end_lsn = b.to_dict()["end_lsn"]
        print(f"  {b.id}  timeline {b.timeline}  end {end_lsn}  {b.end_time}  {fate}: {d.reason}")
    for backup_id in result.catalog.vanished:
        print(f"  {backup_id}  listed by the index but its manifest is gone: its leftovers {verb}")
    for backup_id, problem in sorted(result.catalog.damaged.items()):
        print(f"  {backup_id}  DAMAGED ({problem}): not counted, left alone; see `cloudbk check`")
    for backup_id in result.catalog.orphans:
        print(f"  {backup_id}  objects without a manifest (unfinished backup-push?): left alone")
    if plan.wal_keep_from is not None and plan.retained:
        oldest = min(plan.retained, key=lambda b: b.begin_lsn)
        first = segment_name(oldest.timeline, plan.wal_keep_from, plan.segment_size)
        print(f"WAL: segments before {first} go, on every timeline (the oldest retained backup begins there)")
    print(
        f"{len(plan.expired)} backup(s) and {len(result.wal_keys)} WAL file(s) {verb}"
        + (f"; {len(plan.retained)} backup(s) retained" if plan.decisions else "")
    )
    if result.stale_uploads:
        verb_upload = "would be aborted" if args.dry_run else "aborted"
        print(f"{len(result.stale_uploads)} incomplete upload(s) no running backup claims {verb_upload}:")
        for upload in result.stale_uploads:
            print(f"  {upload.key}  (upload {upload.upload_id})")
    if args.dry_run or settings.verbose:
        for backup_id, keys in result.backup_keys.items():
            for key in keys:
                print(f"  {verb}: {key}  (backup {backup_id})")
        for key in result.wal_keys:
            print(f"  {verb}: {key}")
    return 0
