"""``cloudbk backup-push [--pgdata DIR]``: take a base backup of a running server and store it.

The last line on stdout is the new backup id (scripts capture it); everything else goes to stderr: a
progress bar on a terminal, a few log lines otherwise.
"""

from __future__ import annotations

import argparse
import logging

from cloudbk.backup.take import DEFAULT_WAL_WAIT, BackupOptions, take_backup
from cloudbk.backup.volumes import check_volume_size
from cloudbk.cli.common import LONG_RETRY_DEADLINE, open_repo, terminate_on_sigterm
from cloudbk.cli.output import ConsoleProgress, human_duration, human_size
from cloudbk.config import Settings
from cloudbk.errors import UsageError
from cloudbk.pg.walnames import format_lsn

HELP = "take a base backup of a running PostgreSQL server and store it (prints the backup id last)"

log = logging.getLogger("cloudbk")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wal-wait",
        type=float,
        default=DEFAULT_WAL_WAIT,
        metavar="SECONDS",
        help=f"how long to wait for the backup's last WAL segment to be archived (default {DEFAULT_WAL_WAIT:.0f})",
    )
    parser.add_argument(
        "--spread-checkpoint",
        action="store_true",
        help="let the starting checkpoint follow checkpoint_completion_target instead of running at full speed",
    )
    parser.add_argument(
        "--volume-size",
        metavar="SIZE",
        help="bytes of file content per stored volume, e.g. 128MiB (the default; env CLOUDBK_VOLUME_SIZE)",
    )
    parser.add_argument(
        "--compress-threads",
        type=int,
        default=None,
        metavar="N",
        help="extra zstd threads per volume (default 0: --jobs is the parallelism; each costs memory)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.pg.conn import PgConnection

    if args.wal_wait < 0:
        raise UsageError("--wal-wait must not be negative")
    with terminate_on_sigterm():
        storage = open_repo(settings, LONG_RETRY_DEADLINE)
        try:
            with PgConnection(settings.dbname, application_name="cloudbk backup-push") as conn:
                pgdata = settings.pgdata or conn.data_directory()
                options = BackupOptions(
                    pgdata=pgdata,
                    compression=settings.compression,
                    fast_checkpoint=not args.spread_checkpoint,
                    wal_wait=args.wal_wait,
                )
                if settings.jobs is not None:
                    options.jobs = settings.jobs
                if settings.volume_size is not None:
                    options.volume_size = check_volume_size(settings.volume_size)
                if args.compress_threads is not None:
                    options.compress_threads = max(0, args.compress_threads)
                manifest = take_backup(storage, settings.server, conn, options, ConsoleProgress())
        finally:
            storage.close()
    ratio = manifest.data_size / manifest.stored_size if manifest.stored_size else 0.0
    log.info(
        "backup %s complete: timeline %d, WAL %s .. %s (%s .. %s), %d files, %s stored as %s (%.1fx) in %s",
        manifest.id,
        manifest.timeline,
        format_lsn(manifest.begin_lsn),
        format_lsn(manifest.end_lsn),
        manifest.begin_wal,
        manifest.end_wal,
        manifest.file_count,
        human_size(manifest.data_size),
        human_size(manifest.stored_size),
        ratio,
        human_duration(_seconds(manifest.begin_time, manifest.end_time)),
    )
    print(manifest.id, flush=True)
    return 0


def _seconds(begin: str, end: str) -> float:
    from cloudbk.repo.manifest import parse_time

    return (parse_time(end) - parse_time(begin)).total_seconds()
