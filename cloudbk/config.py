"""Settings from flags, environment variables and an optional TOML file: flags win over env over file.

| setting        | flag               | env                                          | TOML key        |
|----------------|--------------------|----------------------------------------------|-----------------|
| repo           | --repo             | CLOUDBK_REPO                                 | repo            |
| server         | --server           | CLOUDBK_SERVER                               | server          |
| endpoint_url   | --endpoint-url     | CLOUDBK_ENDPOINT_URL, AWS_ENDPOINT_URL       | endpoint_url    |
| compression    | --compression      | CLOUDBK_COMPRESSION                          | compression     |
| dbname         | --dbname           | (libpq's own PGHOST, PGPORT, ...)            | dbname          |
| pgdata         | --pgdata           | PGDATA                                       | pgdata          |
| retry_deadline | --retry-deadline   | CLOUDBK_RETRY_DEADLINE                       | retry_deadline  |
| push_ahead     | --push-ahead       | CLOUDBK_PUSH_AHEAD                           | push_ahead      |
| jobs           | --jobs             | CLOUDBK_JOBS                                 | jobs            |
| volume_size    | --volume-size      | CLOUDBK_VOLUME_SIZE                          | volume_size     |
| prefetch       | --prefetch         | CLOUDBK_PREFETCH                             | prefetch        |
| config file    | --config           | CLOUDBK_CONFIG                               |                 |

The lifecycle commands (retention, delete, keep, check) read two tables the same way, flags > env > file:

| setting            | flag                   | env                                  | TOML                           |
|--------------------|------------------------|--------------------------------------|--------------------------------|
| redundancy         | --redundancy N         | CLOUDBK_RETENTION_REDUNDANCY         | [retention] redundancy         |
| recovery window    | --recovery-window DAYS | CLOUDBK_RETENTION_RECOVERY_WINDOW    | [retention] recovery_window    |
| minimum redundancy | --minimum-redundancy N | CLOUDBK_RETENTION_MINIMUM_REDUNDANCY | [retention] minimum_redundancy |
| stale upload age   | --stale-upload-age AGE | CLOUDBK_RETENTION_STALE_UPLOAD_AGE   | [retention] stale_upload_age   |
| max backup age     | --max-backup-age HOURS | CLOUDBK_CHECK_MAX_BACKUP_AGE         | [check] max_backup_age         |
| max WAL lag        | --max-wal-lag SEGMENTS | CLOUDBK_CHECK_MAX_WAL_LAG            | [check] max_wal_lag            |
| max drill age      | --max-drill-age HOURS  | CLOUDBK_CHECK_MAX_DRILL_AGE          | [check] max_drill_age          |
| max verify age     | --max-verify-age HOURS | CLOUDBK_CHECK_MAX_VERIFY_AGE         | [check] max_verify_age         |

A policy given on the command line replaces the configured one entirely (``--redundancy 3`` wins over a
``recovery_window`` in the file); giving both policies at the same level is a usage error. Those tables are
checked for unknown settings only by the commands that read them. Other tables are kept in
``Settings.sections``. Secrets are never read from or written to the config file by cloudbk: credentials
follow each SDK's chain.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from cloudbk.errors import UsageError
from cloudbk.repo.compression import DEFAULT_ALGORITHM, check_algorithm
from cloudbk.repo.layout import check_server
from cloudbk.storage.registry import StorageOptions, parse_url

if TYPE_CHECKING:
    from cloudbk.lifecycle.retention import Policy

DEFAULT_SERVER = "main"
WAL_RETRY_DEADLINE = 60.0
DEFAULT_PUSH_AHEAD = 8  # files the push-ahead worker uploads at once (cloudbk.wal.ahead); 0 turns it off
DEFAULT_PREFETCH = 8  # segments the prefetcher keeps ready for restore_command (cloudbk.wal.prefetch); 0: off
_SCALARS = (
    "repo", "server", "endpoint_url", "compression", "dbname", "pgdata", "retry_deadline", "jobs", "volume_size",
    "push_ahead", "prefetch",
)  # fmt: skip
_ENV = {
    "repo": ("CLOUDBK_REPO",),
    "server": ("CLOUDBK_SERVER",),
    "endpoint_url": ("CLOUDBK_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
    "compression": ("CLOUDBK_COMPRESSION",),
    "pgdata": ("PGDATA",),
    "retry_deadline": ("CLOUDBK_RETRY_DEADLINE",),
    "push_ahead": ("CLOUDBK_PUSH_AHEAD",),
    "jobs": ("CLOUDBK_JOBS",),
    "volume_size": ("CLOUDBK_VOLUME_SIZE",),
    "prefetch": ("CLOUDBK_PREFETCH",),
}
_SIZE_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}
RETENTION_KEYS = ("redundancy", "recovery_window", "minimum_redundancy", "stale_upload_age")
CHECK_KEYS = ("max_backup_age", "max_wal_lag", "minimum_redundancy", "max_drill_age", "max_verify_age")
_SECTION_ENV_PREFIX = {"retention": "CLOUDBK_RETENTION_", "check": "CLOUDBK_CHECK_"}
_NOT_POLICY = ("minimum_redundancy", "stale_upload_age")  # [retention] settings that are not the policy


@dataclass
class Settings:
    repo: str | None = None
    server: str = DEFAULT_SERVER
    endpoint_url: str | None = None
    compression: str = DEFAULT_ALGORITHM
    dbname: str | None = None
    pgdata: str | None = None
    retry_deadline: float | None = None
    push_ahead: int = DEFAULT_PUSH_AHEAD
    #: volumes in flight in backup-push and restore; None: the use case's default
    jobs: int | None = None
    #: bytes of file content per backup volume; None: the use case's default
    volume_size: int | None = None
    prefetch: int = DEFAULT_PREFETCH
    verbose: bool = False
    config_file: str | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def require_repo(self) -> str:
        if not self.repo:
            raise UsageError(
                "no repository configured",
                hint="pass --repo URL or set CLOUDBK_REPO (e.g. s3://bucket/prefix or file:///var/lib/cloudbk)",
            )
        return self.repo

    def storage_options(self, default_deadline: float = WAL_RETRY_DEADLINE) -> StorageOptions:
        deadline = self.retry_deadline if self.retry_deadline is not None else default_deadline
        return StorageOptions(endpoint_url=self.endpoint_url, retry_deadline=deadline, environ=self.environ)

    def section(self, name: str, known: tuple[str, ...]) -> dict[str, Any]:
        """The ``[name]`` table of the config file; a usage error when it holds a setting not in ``known``."""
        table = self.sections.get(name, {})
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise UsageError(
                f"config file {self.config_file} has unknown settings in [{name}]: {', '.join(unknown)}",
                hint=f"known settings: {', '.join(known)}",
            )
        return dict(table)

    def layers(self, name: str, known: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(environment values, config file values) of the ``[name]`` table's settings."""
        prefix = _SECTION_ENV_PREFIX[name]
        env = {k: self.environ[prefix + k.upper()] for k in known if self.environ.get(prefix + k.upper())}
        return env, self.section(name, known)


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist", hint="fix --config / CLOUDBK_CONFIG") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings. ``flags`` holds parsed command-line values, None where a flag was not given."""
    env = dict(os.environ) if environ is None else dict(environ)
    config_file = flags.get("config") or env.get("CLOUDBK_CONFIG")
    file_values: dict[str, Any] = _read_toml(config_file) if config_file else {}
    sections = {k: v for k, v in file_values.items() if isinstance(v, dict)}
    unknown = [k for k, v in file_values.items() if not isinstance(v, dict) and k not in _SCALARS]
    if unknown:
        raise UsageError(
            f"config file {config_file} has unknown settings: {', '.join(sorted(unknown))}",
            hint=f"known settings: {', '.join(_SCALARS)}",
        )
    values: dict[str, Any] = {}
    for name in _SCALARS:
        value = flags.get(name)
        if value is None:
            value = next((env[e] for e in _ENV.get(name, ()) if env.get(e)), None)
        if value is None:
            value = file_values.get(name)
        if value is not None:
            values[name] = value

    settings = Settings(verbose=bool(flags.get("verbose")), config_file=config_file, sections=sections, environ=env)
    if "repo" in values:
        settings.repo = str(values["repo"])
        parse_url(settings.repo)  # fail early, as a usage error, on a malformed URL
    if "server" in values:
        settings.server = check_server(str(values["server"]))
    if "endpoint_url" in values:
        settings.endpoint_url = str(values["endpoint_url"])
    if "compression" in values:
        settings.compression = check_algorithm(str(values["compression"]))
    if "dbname" in values:
        settings.dbname = str(values["dbname"])
    if "pgdata" in values:
        settings.pgdata = str(values["pgdata"])
    if "retry_deadline" in values:
        try:
            settings.retry_deadline = float(values["retry_deadline"])
        except (TypeError, ValueError):
            raise UsageError(f"retry deadline {values['retry_deadline']!r} is not a number of seconds") from None
        if settings.retry_deadline < 0:
            raise UsageError("retry deadline must not be negative")
    if "push_ahead" in values:
        settings.push_ahead = _int(values["push_ahead"], "push-ahead window (--push-ahead, CLOUDBK_PUSH_AHEAD)")
        if settings.push_ahead < 0:
            raise UsageError("the push-ahead window must be 0 (off) or more files")
    if "jobs" in values:
        settings.jobs = _int(values["jobs"], "jobs")
        if settings.jobs < 1:
            raise UsageError(f"jobs {settings.jobs} must be at least 1")
    if "volume_size" in values:
        settings.volume_size = parse_size(values["volume_size"], "volume size")
    if "prefetch" in values:
        settings.prefetch = _int(values["prefetch"], "prefetch window (--prefetch, CLOUDBK_PREFETCH)")
        if settings.prefetch < 0:
            raise UsageError("the prefetch window must be 0 (off) or more segments")
    return settings


def parse_size(value: Any, what: str) -> int:
    """Bytes from ``value``: a whole number, optionally with a binary unit (``128MiB``, ``1G``, ``512k``)."""
    text = str(value).strip().lower()
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(digits) :].strip()
    if not digits.isdigit() or unit not in _SIZE_UNITS or isinstance(value, bool):
        raise UsageError(f"{what} {value!r} is not a size (bytes, or a number with KiB, MiB or GiB)")
    return int(digits) * _SIZE_UNITS[unit]


# -- the lifecycle tables ([retention], [check]) ----------------------------------------------------------
# The lifecycle types are imported inside these functions: archive_command imports this module too.


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{what} {value!r} is not a whole number")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UsageError(f"{what} {value!r} is not a whole number") from None
    return number


def _first(flag: Any, key: str, *layers: Mapping[str, Any]) -> Any:
    """``flag`` when given, else ``key`` from the first of ``layers`` that sets it (env before file), else None."""
    if flag is not None:
        return flag
    return next((layer[key] for layer in layers if key in layer), None)


def minimum_redundancy(settings: Settings, flag: int | None) -> int:
    """How many backups retention and delete never go below."""
    from cloudbk.lifecycle.retention import DEFAULT_MINIMUM_REDUNDANCY

    value = _first(flag, "minimum_redundancy", *settings.layers("retention", RETENTION_KEYS))
    return DEFAULT_MINIMUM_REDUNDANCY if value is None else _int(value, "minimum redundancy")


def retention_policy(
    settings: Settings, redundancy: int | None, recovery_window: str | None, minimum: int | None
) -> Policy:
    """The policy from flags, else env, else the [retention] table."""
    from cloudbk.lifecycle.retention import Policy, parse_window

    env, file = settings.layers("retention", RETENTION_KEYS)
    layers: list[dict[str, Any]] = [
        {k: v for k, v in (("redundancy", redundancy), ("recovery_window", recovery_window)) if v is not None},
        {k: v for k, v in env.items() if k not in _NOT_POLICY},
        {k: v for k, v in file.items() if k not in _NOT_POLICY},
    ]
    chosen = next((layer for layer in layers if layer), None)
    if chosen is None:
        raise UsageError(
            "no retention policy given",
            hint="pass --redundancy N or --recovery-window DAYS, or set redundancy or recovery_window in the "
            "[retention] table of the config file",
        )
    if len(chosen) > 1:
        raise UsageError("give one retention policy, not both --redundancy and --recovery-window")
    floor = minimum_redundancy(settings, minimum)
    if "redundancy" in chosen:
        return Policy(redundancy=_int(chosen["redundancy"], "redundancy"), minimum_redundancy=floor)
    return Policy(recovery_window=parse_window(chosen["recovery_window"]), minimum_redundancy=floor)


def stale_upload_age(settings: Settings, flag: str | None) -> timedelta:
    """How old an incomplete upload no running backup claims must be before retention aborts it."""
    from cloudbk.lifecycle.retention import parse_window
    from cloudbk.repo.inflight import DEFAULT_STALE_UPLOAD_AGE

    value = _first(flag, "stale_upload_age", *settings.layers("retention", RETENTION_KEYS))
    if value is None:
        return DEFAULT_STALE_UPLOAD_AGE
    try:
        return parse_window(value)
    except UsageError:
        raise UsageError(
            f"stale upload age {value!r} is not a duration longer than zero",
            hint="write it as a number of days (1) or with a unit: 90s, 6h, 2d",
        ) from None


def check_limits(
    settings: Settings, max_backup_age: float | None, max_wal_lag: int | None, minimum: int | None
) -> tuple[timedelta | None, int | None, int]:
    """(max backup age, max WAL lag, minimum redundancy) for ``check``; None where nothing was configured."""
    env, file = settings.layers("check", CHECK_KEYS)
    age = _hours(_first(max_backup_age, "max_backup_age", env, file), "max backup age")
    raw_lag = _first(max_wal_lag, "max_wal_lag", env, file)
    lag = None if raw_lag is None else _int(raw_lag, "max WAL lag")
    if lag is not None and lag < 0:
        raise UsageError("max WAL lag must not be negative")
    raw_minimum = _first(minimum, "minimum_redundancy", env, file)  # [check] first, then [retention]
    floor = None if raw_minimum is None else _int(raw_minimum, "minimum redundancy")
    return age, lag, minimum_redundancy(settings, floor)


def _hours(hours: Any, what: str) -> timedelta | None:
    if hours is None:
        return None
    try:
        value = float(hours)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {hours!r} is not a number of hours") from None
    if not value > 0:
        raise UsageError(f"{what} must be more than zero hours")
    return timedelta(hours=value)


def proof_ages(
    settings: Settings, max_drill_age: float | None, max_verify_age: float | None
) -> tuple[timedelta | None, timedelta | None]:
    """(max drill age, max verify age) for ``check``: how old the last successful drill and verify may be;
    None where nothing was configured (the default: those checks then only report)."""
    env, file = settings.layers("check", CHECK_KEYS)
    return (
        _hours(_first(max_drill_age, "max_drill_age", env, file), "max drill age"),
        _hours(_first(max_verify_age, "max_verify_age", env, file), "max verify age"),
    )
