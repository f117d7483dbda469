"""``cloudbk wal-push WAL_PATH`` / ``cloudbk-wal-push WAL_PATH``: the archive_command.

Exit 0 only when the file is durably stored (or the identical file already was). Exit codes otherwise follow
SPEC §1: 2 when the storage fails after retries, 3 for usage errors, 4 for a conflict or an integrity problem,
1 when the local file cannot be read. PostgreSQL retries any nonzero exit.
"""

from __future__ import annotations

import argparse
import logging

from cloudbk.cli.common import open_repo, terminate_on_sigterm, unexpected_errors
from cloudbk.cli.output import human_size
from cloudbk.config import Settings

HELP = "archive one WAL file (archive_command = 'cloudbk-wal-push %p')"

log = logging.getLogger("cloudbk")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="WAL_PATH", help="the WAL file to archive (%%p in archive_command)")
    parser.add_argument(
        "--push-ahead",
        metavar="N",
        help="files a background worker archives ahead of PostgreSQL's calls, at once; 0 turns it off "
        "(default 8, env CLOUDBK_PUSH_AHEAD)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.wal.ahead import ensure_worker
    from cloudbk.wal.fastpush import wait_for_marker
    from cloudbk.wal.push import push_wal

    flags = vars(args)
    if settings.push_ahead > 0:
        if wait_for_marker(args.path, flags, settings.environ):
            return 0  # the worker stored and indexed it
        # a worker just started takes this file first: waiting for it costs less than a second upload
        if ensure_worker(args.path, flags, settings) and wait_for_marker(
            args.path, flags, settings.environ, starting=True
        ):
            return 0
    with terminate_on_sigterm():
        storage = open_repo(settings)
        try:
            # --retry-deadline bounds the whole command (cloudbk.storage.deadline)
            with storage.whole_call(), unexpected_errors("archiving", args.path):
                result = push_wal(storage, settings.server, args.path, settings.compression)
        finally:
            storage.close()
    if result.already_archived:
        log.info(
            "%s already archived with identical content (sha256 %s…), nothing written, in %.2fs",
            result.name,
            result.sha256[:16],
            result.seconds,
        )
    else:
        log.info(
            "pushed %s (%s -> %s %s) in %.2fs",
            result.name,
            human_size(result.size),
            human_size(result.stored_size),
            result.compression,
            result.seconds,
        )
    return 0
