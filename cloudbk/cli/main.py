"""Entry points: ``cloudbk``, ``cloudbk-wal-push``, ``cloudbk-wal-fetch``.

Command modules are imported only when the parser is built, and keep their own heavy imports (SDKs,
psycopg) inside ``run`` so an archive_command pays only for what it uses.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType, TracebackType
from typing import NoReturn

from cloudbk import __version__
from cloudbk.errors import CloudbkError, ExitCode, Terminated, UsageError
from cloudbk.redact import redact_text

# command name -> module under cloudbk.cli
COMMANDS: dict[str, str] = {
    "wal-push": "wal_push",
    "wal-fetch": "wal_fetch",
    "backup-push": "backup_push",
    "backup-list": "backup_list",
    "backup-show": "backup_show",
    "restore": "restore",
    "reindex": "reindex",
    "retention": "retention",
    "delete": "delete",
    "keep": "keep",
    "check": "check",
    "wal-verify": "wal_verify",
}

log = logging.getLogger("cloudbk")


def _die_of_sigterm() -> NoReturn:
    logging.shutdown()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    raise SystemExit(128 + signal.SIGTERM)  # not reached: the default action ends the process


class ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 on a bad flag; our contract says usage errors exit 3."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(message)


def common_options(into: argparse.ArgumentParser | None = None, suppress: bool = False) -> ArgumentParser:
    """Options every command accepts, before or after the command name.

    The top-level parser holds them with default None; each subcommand holds a copy whose default is
    SUPPRESS, so ``cloudbk --repo X wal-push P`` keeps X while ``cloudbk wal-push --repo X P`` also works.
    """
    p = into if into is not None else ArgumentParser(add_help=False)
    if suppress:
        p.argument_default = argparse.SUPPRESS
    g = p.add_argument_group("repository and connection")
    g.add_argument("--config", help="TOML config file (env CLOUDBK_CONFIG)")
    g.add_argument(
        "--repo", help="repository URL: s3://, gs://, azure://container/prefix, file:///path (env CLOUDBK_REPO)"
    )
    g.add_argument("--server", help="cluster name inside the repository, default 'main' (env CLOUDBK_SERVER)")
    g.add_argument("--endpoint-url", help="S3-compatible or emulator endpoint (env CLOUDBK_ENDPOINT_URL)")
    g.add_argument("--compression", help="zstd (default), lz4, gzip, none (env CLOUDBK_COMPRESSION)")
    g.add_argument("--dbname", help="PostgreSQL connection string (default: libpq environment)")
    g.add_argument("--pgdata", help="PostgreSQL data directory (env PGDATA)")
    g.add_argument(
        "--retry-deadline", type=float, help="seconds to retry transient storage errors (env CLOUDBK_RETRY_DEADLINE)"
    )
    g.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="volumes backup-push and restore transfer at once, default 2 (env CLOUDBK_JOBS)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else None,
        help="log more detail to stderr",
    )
    return p  # type: ignore[return-value]


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"cloudbk.cli.{name}")


def build_parser(only: str | None = None) -> ArgumentParser:
    common = common_options(suppress=True)
    parser = ArgumentParser(prog="cloudbk", description="PostgreSQL backup and WAL archiving to object storage")
    parser.add_argument("--version", action="version", version=f"cloudbk {__version__}")
    common_options(into=parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = _module(modname)
        text = module.HELP.replace("%", "%%")  # argparse %-formats help; '%p' in a HELP would crash --help
        cmd = sub.add_parser(name, parents=[common], help=text, description=text)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


class RedactingFormatter(logging.Formatter):
    """The last line of defence: no log line (the PostgreSQL log, for WAL commands) shows a URL's password."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """Tracebacks of unexpected errors, redacted like every other line cloudbk prints."""
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))


def _setup_logging(command: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(f"cloudbk {command}: %(levelname)s: %(message)s"))
    root = logging.getLogger("cloudbk")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    if logging.lastResort is not None:  # what prints the SDKs' own warnings: redacted too
        logging.lastResort.setFormatter(RedactingFormatter("%(message)s"))


def command_word(args: Sequence[str]) -> str | None:
    """The command named in ``args``: the first word that is neither an option nor an option's value, as
    argparse reads it (``cloudbk --server restore backup-list`` runs backup-list); None when there is none."""
    takes_value = {opt for action in common_options()._actions if action.nargs != 0 for opt in action.option_strings}
    words = iter(args)
    for word in words:
        if word == "--":
            word = next(words, "")
        elif word.startswith("-"):
            if "=" not in word and _option_named(word, takes_value):
                next(words, None)
            continue
        return word if word in COMMANDS else None
    return None


def _option_named(word: str, options: set[str]) -> bool:
    """Whether ``word`` is one of ``options``, or (as argparse allows) an unambiguous prefix of one."""
    if word in options:
        return True
    return word.startswith("--") and len([o for o in options if o.startswith(word)]) == 1


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Build only the named command's parser when we can tell it: faster start for archive_command.
    only = command_word(args_list)
    try:
        parser = build_parser(only if only in COMMANDS else None)
        args = parser.parse_args(args_list)
    except UsageError as exc:
        print(redact_text(f"cloudbk: ERROR: {exc}"), file=sys.stderr)
        # a command may map even a usage error (wal-fetch during archive recovery must not exit "absent")
        modname = COMMANDS.get(only) if only is not None else None
        usage_handler = getattr(_module(modname), "exit_code_for", None) if modname else None
        return int(usage_handler(exc, None)) if usage_handler else ExitCode.USAGE
    command: str = args.command
    _setup_logging(command, bool(args.verbose))
    module: ModuleType = args._module
    try:
        from cloudbk.config import resolve

        settings = resolve(vars(args))
        code: int = module.run(args, settings)
        return code
    except CloudbkError as exc:
        log.error("%s", exc)
        handler = getattr(module, "exit_code_for", None)
        code = handler(exc, args) if handler else exc.exit_code
        return code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Terminated:
        log.error("terminated by SIGTERM")
        _die_of_sigterm()


def _run(argv: Sequence[str]) -> NoReturn:
    sys.excepthook = _excepthook
    sys.exit(main(argv))


def entry() -> NoReturn:
    _run(sys.argv[1:])


def wal_push_main() -> NoReturn:
    _run(["wal-push", *sys.argv[1:]])


def wal_fetch_main() -> NoReturn:
    _run(["wal-fetch", *sys.argv[1:]])
