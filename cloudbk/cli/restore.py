"""``cloudbk restore DEST``: restore a base backup and configure point-in-time recovery.

The recovery plan (backup, WAL per timeline, bytes to fetch) is printed before anything is written; a plan
with missing WAL is refused unless ``--force``. After the restore, ``pg_ctl -D DEST start`` recovers: the
``restore_command`` written to postgresql.auto.conf runs ``cloudbk-wal-fetch`` with this repository's
``--repo``/``--server``/``--endpoint-url`` (never credentials: the server's environment provides those).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cloudbk.cli.common import LONG_RETRY_DEADLINE, open_repo, terminate_on_sigterm
from cloudbk.cli.output import ConsoleProgress, human_duration, human_size
from cloudbk.config import Settings
from cloudbk.errors import CloudbkError, UsageError
from cloudbk.redact import strip_userinfo

if TYPE_CHECKING:
    from cloudbk.backup.restore import RestoreOptions
    from cloudbk.repo.manifest import Manifest
    from cloudbk.repo.pitr import RecoveryPlan, Target
    from cloudbk.storage.base import Storage

log = logging.getLogger("cloudbk")

HELP = "restore a backup into an empty directory and configure point-in-time recovery"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", metavar="DEST", help="the new data directory (must be empty or absent)")
    parser.add_argument(
        "--backup", metavar="ID|latest", help="the backup to restore (default: the newest that reaches the target)"
    )
    targets = add_targets(parser)
    targets.add_argument(
        "--target-action", choices=("promote", "pause", "shutdown"), default="promote",
        help="what the server does at the target (default promote)",
    )  # fmt: skip
    targets.add_argument(
        "--target-timeline", metavar="latest|N", default="latest", help="timeline to recover along (default latest)"
    )
    parser.add_argument(
        "--tablespace-mapping", action="append", default=[], metavar="OLD=NEW",
        help="restore the tablespace at directory OLD into NEW (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--link-all", action="store_true",
        help="recreate every symbolic link the backup recorded, its content at the link's target (default: "
        "links come back as plain directories and files inside DEST)",
    )  # fmt: skip
    parser.add_argument(
        "--link-map", action="append", default=[], metavar="NAME=PATH",
        help="recreate the link NAME (relative to DEST, e.g. pg_wal or log) pointing at PATH (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--force",
        action="store_true",
        help="restore even if the plan lacks WAL segments, the target time is beyond the archived WAL, or the free "
        "space looks too small",
    )
    parser.add_argument(
        "--prefetch", metavar="N",
        help="WAL segments prefetched while the backup extracts and during recovery (default 8, env "
        "CLOUDBK_PREFETCH); given, it is written into restore_command too; 0 turns prefetch off",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true",
        help="make every check restore makes before writing (plan, missing WAL, volumes, destinations, free space), "
        "print the result and write nothing; exit nonzero exactly when restore would refuse",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan and checks as JSON")


def add_targets(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The recovery target flags ``restore`` and ``drill`` share (parsed by ``repo.pitr.Target.parse``)."""
    targets = parser.add_argument_group("recovery target (default: replay all archived WAL)")
    targets.add_argument(
        "--target-time", metavar="TIMESTAMP", help="e.g. '2026-11-21 09:30:00+00' (no offset: local time)"
    )
    targets.add_argument("--target-lsn", metavar="LSN", help="e.g. 0/3000060")
    targets.add_argument("--target-xid", metavar="XID", help="stop after this transaction commits")
    targets.add_argument("--target-name", metavar="NAME", help="a restore point made by pg_create_restore_point()")
    targets.add_argument("--target-immediate", action="store_true", help="stop as soon as the backup is consistent")
    return targets


def parse_target(args: argparse.Namespace) -> Target:
    from cloudbk.repo.pitr import Target

    return Target.parse(args.target_time, args.target_lsn, args.target_xid, args.target_name, args.target_immediate)


def check_backup_arg(backup: str | None) -> None:
    if backup is not None and backup != "latest":
        from cloudbk.repo.layout import check_backup_id

        check_backup_id(backup)


def _mapping(values: list[str], flag: str = "--tablespace-mapping", form: str = "OLD=NEW") -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            raise UsageError(f"{flag} {value!r} is not {form}")
        mapping[old] = new
    return mapping


def restore_command(settings: Settings, repo: str, prefetch: str | None = None) -> str:
    """``cloudbk-wal-fetch`` with the repository settings, by absolute path (the server's PATH may lack it)."""
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    candidates = [
        os.path.join(here, "cloudbk-wal-fetch"),
        os.path.join(os.path.dirname(sys.executable), "cloudbk-wal-fetch"),
    ]
    fetch = next((c for c in candidates if os.access(c, os.X_OK)), "cloudbk-wal-fetch")
    argv = [fetch, "--repo", repo, "--server", settings.server]
    if settings.endpoint_url:
        argv += ["--endpoint-url", strip_userinfo(settings.endpoint_url)]  # never user:password@
    if prefetch is not None:
        argv += ["--prefetch", str(settings.prefetch)]
    return " ".join(shlex.quote(a) for a in argv) + " %f %p"


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.backup.restore import RestoreOptions, check_destinations, prepare, restore
    from cloudbk.repo.pitr import check_complete

    repo = settings.require_repo()
    target = parse_target(args)
    timeline = None
    if args.target_timeline != "latest":
        if not args.target_timeline.isdigit() or int(args.target_timeline) < 1:
            raise UsageError(f"--target-timeline {args.target_timeline!r} is not 'latest' or a timeline number")
        timeline = int(args.target_timeline)
    check_backup_arg(args.backup)
    options = RestoreOptions(
        dest=args.dest,
        restore_command=restore_command(settings, repo, args.prefetch),
        target=target,
        backup_id=args.backup,
        target_action=args.target_action,
        target_timeline=timeline,
        tablespace_mapping=_mapping(args.tablespace_mapping),
        link_all=args.link_all,
        link_map=_mapping(args.link_map, "--link-map", "NAME=PATH"),
        force=args.force,
    )
    if settings.jobs is not None:
        options.jobs = settings.jobs
    check_destinations(os.path.abspath(args.dest), {})  # fail before any storage work
    with terminate_on_sigterm():
        storage = open_repo(settings, LONG_RETRY_DEADLINE)
        try:
            _index, plan, manifest = prepare(storage, settings.server, options)
            if args.dry_run:
                return _dry_run(storage, settings.server, plan, manifest, options, args.json)
            print(format_plan(plan, manifest.stored_size, options), flush=True)
            if options.force:
                _warn_beyond_reach(plan)
            else:
                check_complete(plan)  # after the plan is printed, so the refusal has its context
            options.on_extract = _prefetch_hook(settings, repo, plan, manifest, options)
            result = restore(storage, settings.server, plan, manifest, options, ConsoleProgress())
        finally:
            storage.close()
    print(f"restored backup {manifest.id} into {result.dest}: {result.files} files, {human_size(result.bytes)} "
          f"verified in {human_duration(result.seconds)}")  # fmt: skip
    for oid, path in sorted(result.tablespaces.items()):
        print(f"  tablespace {oid} -> {path}")
    for name, path in sorted(result.links.items()):
        print(f"  link {name} -> {path}")
    print("recovery settings appended to postgresql.auto.conf (and recovery.signal created):")
    for name, value in result.settings.items():
        print(f"  {name} = '{value}'")
    if os.geteuid() == 0 and os.stat(result.dest).st_uid == 0:
        log.warning("the restored files belong to root; PostgreSQL will not start on them: chown -R postgres: %s "
                    "(or run restore as the server's OS user)", result.dest)  # fmt: skip
    print(f"next: pg_ctl -D {result.dest} start   (as the server's OS user; the recovery runs on start)")
    return 0


def _prefetch_hook(
    settings: Settings, repo: str, plan: object, manifest: object, options: object
) -> Callable[[str, tuple[int, int] | None], None]:
    """What restore does once DEST exists: record this restore's id in it (the prefetch spool's generation,
    docs/wal.md) and start filling the spool with the plan's first segments while the base backup extracts."""
    from cloudbk.backup.restore import RestoreOptions
    from cloudbk.pg.walnames import segment_name
    from cloudbk.repo.manifest import Manifest
    from cloudbk.repo.pitr import RecoveryPlan

    assert isinstance(plan, RecoveryPlan) and isinstance(manifest, Manifest) and isinstance(options, RestoreOptions)

    def start(dest: str, owner: tuple[int, int] | None) -> None:
        import uuid

        from cloudbk.wal import prefetch, spool

        path = os.path.join(dest, spool.RESTORE_ID_FILE)
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(f"{uuid.uuid4().hex} {manifest.id}\n")
            if owner is not None:
                os.chown(path, *owner)
        except OSError as exc:
            log.warning("cannot write %s (%s): a prefetch spool is then tied to the data directory alone", path, exc)
        base = next((t for t in manifest.tars if t.tablespace_oid is None), None)
        if not plan.stretches or base is None or base.links is None or options.link_all or options.link_map:
            return  # pg_wal may come as a link (an older backup's tar member, or asked for): made by the tar
        first = plan.stretches[0]
        flags = {"repo": repo, "server": settings.server, "endpoint_url": None}
        if settings.endpoint_url:
            flags["endpoint_url"] = strip_userinfo(settings.endpoint_url)
        try:
            pid = prefetch.start_for_restore(
                dest, owner, flags, settings, segment_name(first.timeline, first.first, plan.segment_size),
                plan.target_timeline, manifest.system_identifier, plan.segment_size,
            )  # fmt: skip
        except OSError as exc:
            log.warning("WAL prefetch not started (%s); the server fetches each segment when it asks", exc)
            return
        if pid is not None:
            log.info("prefetching the first WAL segments into %s/pg_wal while the backup is extracted", dest)

    return start


def _dry_run(storage: Storage, server: str, plan: RecoveryPlan, manifest: Manifest, options: RestoreOptions,
             as_json: bool) -> int:  # fmt: skip
    """``restore --dry-run``: the checks of :func:`cloudbk.backup.restore.preflight`, printed; the refusal
    (if any) is raised after the report, so the exit code is the one ``restore`` would give."""
    from cloudbk.backup.restore import preflight

    refused: CloudbkError | None = None
    space: list[dict[str, Any]] = []
    try:
        checked = preflight(storage, server, plan, manifest, options)
        space = [need.to_dict() for need in checked.space]
    except CloudbkError as exc:
        refused = exc
    if as_json:
        print(json.dumps(plan_doc(plan, manifest, options, space, refused), indent=1))
    else:
        print(format_plan(plan, manifest.stored_size, options))
        for need in space:
            print(f"  space       {', '.join(need['paths'])}: needs about {human_size(need['needed'])}, "
                  f"{human_size(need['free'])} free")  # fmt: skip
        print("dry run: restore would refuse (below); nothing was written" if refused else
              f"dry run: restore would write backup {manifest.id} into {os.path.abspath(options.dest)}; "
              "nothing was written")  # fmt: skip
    if refused is not None:
        raise refused
    if options.force:
        _warn_beyond_reach(plan)
    return 0


def plan_doc(plan: RecoveryPlan, manifest: Manifest, options: RestoreOptions, space: list[dict[str, Any]],
             refused: CloudbkError | None) -> dict[str, Any]:  # fmt: skip
    """The recovery plan and the checks as JSON (``restore --dry-run --json``, and ``drill``'s report)."""
    from cloudbk.pg.walnames import format_lsn, segment_name

    b = plan.backup
    return {
        "backup": b.id,
        "backup_begin_lsn": format_lsn(b.begin_lsn),
        "backup_end_lsn": format_lsn(b.end_lsn),
        "backup_end_time": b.end_time,
        "target": plan.target.describe(),
        "target_action": options.target_action if plan.target.kind != "end" else None,
        "timelines": [s.timeline for s in plan.path],
        "wal": [
            {
                "timeline": s.timeline,
                "first": segment_name(s.timeline, s.first, plan.segment_size),
                "last": segment_name(s.timeline, s.last, plan.segment_size),
                "segments": s.count,
            }
            for s in plan.stretches
        ],
        "backup_bytes": manifest.stored_size,
        "wal_bytes": plan.wal_bytes,
        "complete": plan.complete,
        "missing": plan.describe_missing(),
        "space": space,
        "dest": os.path.abspath(options.dest),
        "would_restore": refused is None,
        "refused": None if refused is None else str(refused),
    }


def _warn_beyond_reach(plan: object) -> None:
    from cloudbk.repo.pitr import RecoveryPlan, beyond_reach

    assert isinstance(plan, RecoveryPlan)
    reason = beyond_reach(plan)
    if reason is not None:
        log.warning("%s; restoring anyway (--force): recovery cannot finish before that WAL is archived", reason)


def format_plan(plan: object, stored_size: int, options: object) -> str:
    from cloudbk.backup.restore import RestoreOptions
    from cloudbk.pg.walnames import format_lsn, segment_name
    from cloudbk.repo.pitr import RecoveryPlan, format_target_time

    assert isinstance(plan, RecoveryPlan) and isinstance(options, RestoreOptions)
    b = plan.backup
    timelines = " -> ".join(str(s.timeline) for s in plan.path)
    lines = [
        "recovery plan",
        f"  backup      {b.id}  (timeline {b.timeline}, {format_lsn(b.begin_lsn)} .. {format_lsn(b.end_lsn)}, "
        f"ended {b.end_time})",
        f"  target      {plan.target.describe()}"
        + (f", then {options.target_action}" if plan.target.kind != "end" else ""),
        f"  timelines   {timelines}" + (" (latest)" if options.target_timeline is None else ""),
    ]
    label = "  WAL        "
    for s in plan.stretches:
        first, last = (segment_name(s.timeline, n, plan.segment_size) for n in (s.first, s.last))
        names = [first] if s.count == 1 else [first, last] if s.count == 2 else [first, "..", last]
        lines.append(f"{label} timeline {s.timeline}: {' '.join(names)} ({s.count} segments)")
        label = "             "
    if plan.open_ended:
        lines.append("              (the target cannot be placed in WAL ahead of time: every segment archived on the "
                     "path is required)")  # fmt: skip
    lines.append(
        f"  to fetch    {human_size(stored_size)} of backup + up to {human_size(plan.wal_bytes)} of WAL "
        f"({plan.segment_count} segments)"
    )
    if plan.reach_time is not None:
        lines.append(f"  reachable   up to {format_target_time(plan.reach_time)} at most (when the newest segment "
                     "on the path was archived)")  # fmt: skip
    elif plan.target.kind == "time":
        lines.append("  reachable   unknown (the index does not record when the newest segment was archived)")
    if plan.complete:
        lines.append("  status      every WAL segment and history file the plan needs is in the archive")
    else:
        lines.append("  status      MISSING from the archive:")
        lines += [f"                {m}" for m in plan.describe_missing()]
    return "\n".join(lines)
