"""``cloudbk wal-fetch WAL_NAME DEST`` / ``cloudbk-wal-fetch WAL_NAME DEST``: the restore_command.

Exit codes (SPEC §1 and §3.3). PostgreSQL reads exit 1 as "no such file: the archive ends here", and in
archive recovery that can end recovery early and promote the server at the wrong point. So:

====================================  ==================  ==============  ======================
outcome                               archive recovery    standby mode    otherwise
====================================  ==================  ==============  ======================
file restored and verified            0                   0               0
archive answered: file absent         1                   1               1
storage failing after retries         126                 2               2
corrupt object (checksum, zstd)       126                 4               4
any other error (config, local disk)  126                 its code (3/4)  its code (3/4)
====================================  ==================  ==============  ======================

"Archive recovery" means ``recovery.signal`` and no ``standby.signal`` in the data directory, which is the
working directory PostgreSQL runs restore_command in. 126 is above 125, so PostgreSQL raises FATAL and stops
instead of promoting (xlogarchive.c, RestoreArchivedFile); it is not 143, which reads as SIGTERM. A standby
treats any other nonzero exit as "not available yet" and retries after ``wal_retrieve_retry_interval``.

In recovery a call first looks in the prefetch spool (docs/wal.md, "Prefetch"): the exact name, verified, of
this recovery's generation, is 0; anything about the spool — a miss, an error, a dead prefetcher — only means
the fetch below runs, and its outcome is the exit code.
"""

from __future__ import annotations

import argparse
import logging
import os

from cloudbk.cli.common import open_repo, terminate_on_sigterm, unexpected_errors
from cloudbk.cli.output import human_size
from cloudbk.config import Settings
from cloudbk.errors import CloudbkError, ExitCode, NotFound, StorageError
from cloudbk.pg.datadir import ARCHIVE_RECOVERY, STANDBY, recovery_mode

HELP = "restore one WAL file from the archive (restore_command = 'cloudbk-wal-fetch %f %p')"

log = logging.getLogger("cloudbk")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="WAL_NAME", help="the WAL file name to restore (%%f in restore_command)")
    parser.add_argument("dest", metavar="DEST_PATH", help="where to write it (%%p in restore_command)")
    parser.add_argument(
        "--prefetch",
        metavar="N",
        help="segments a background prefetcher downloads ahead of PostgreSQL's calls during recovery; 0 turns it "
        "off (default 8, env CLOUDBK_PREFETCH)",
    )


def exit_code_for(exc: CloudbkError, args: argparse.Namespace | None) -> int:
    """Map an error to wal-fetch's exit code for the server's current mode (see the module docstring)."""
    if isinstance(exc, NotFound):
        return ExitCode.FAILED
    pgdata = getattr(args, "pgdata", None) or os.environ.get("PGDATA")
    mode = recovery_mode(pgdata)
    if mode == ARCHIVE_RECOVERY:
        log.error(
            "exiting with %d: the archive could not be read during archive recovery, so PostgreSQL stops instead "
            "of ending recovery early and promoting",
            ExitCode.FETCH_FATAL,
        )
        log.error("HINT: fix the cause above, then start the server again; recovery resumes where it stopped")
        return ExitCode.FETCH_FATAL
    code = ExitCode.STORAGE if isinstance(exc, StorageError) else exc.exit_code
    if code == ExitCode.FAILED:
        code = ExitCode.OTHER  # exit 1 is reserved for "the archive answered: absent"
    if mode == STANDBY:
        log.error("exiting with %d: standby mode, PostgreSQL will retry this file", code)
    return code


def _from_spool(args: argparse.Namespace, settings: Settings) -> bool:
    """Whether the prefetch spool served the file; also (re)starts the prefetcher, or removes a stale spool.
    Never raises: a prefetch failure only means this call fetches the file itself (SPEC §3.3)."""
    from cloudbk.wal.prefetch import before_fetch

    try:
        sha256 = before_fetch(args.name, args.dest, vars(args), settings)
    except Exception as exc:
        log.warning("prefetch spool not used: %s", exc)
        return False
    if sha256 is None:
        return False
    log.info("%s served from the prefetch spool (sha256 %s…)", args.name, sha256[:16])
    return True


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.wal.fetch import fetch_wal

    if _from_spool(args, settings):
        return 0
    with terminate_on_sigterm():
        storage = open_repo(settings)
        try:
            # --retry-deadline bounds the whole command (cloudbk.storage.deadline)
            with storage.whole_call(), unexpected_errors("fetching", args.name):
                result = fetch_wal(storage, settings.server, args.name, args.dest)
        except NotFound:
            # PostgreSQL asks for files that do not exist as a matter of course (the next timeline's history,
            # the segment after the end of the archive): not an error.
            log.info("%s is not in the archive", args.name)
            return ExitCode.FAILED
        finally:
            storage.close()
    log.info(
        "fetched %s (%s %s -> %s) in %.2fs",
        result.name,
        human_size(result.stored_size),
        result.compression,
        human_size(result.size),
        result.seconds,
    )
    return 0
