"""Settings shared by the lifecycle commands (retention, delete, keep, check): flags > env > config file.

| setting | flag | env | TOML |
| --- | --- | --- | --- |
| redundancy | --redundancy N | CLOUDBK_RETENTION_REDUNDANCY | [retention] redundancy |
| recovery window | --recovery-window DAYS | CLOUDBK_RETENTION_RECOVERY_WINDOW | [retention] recovery_window |
| minimum redundancy | --minimum-redundancy N | CLOUDBK_RETENTION_MINIMUM_REDUNDANCY | [retention] minimum_redundancy |
| stale upload age | --stale-upload-age AGE | CLOUDBK_RETENTION_STALE_UPLOAD_AGE | [retention] stale_upload_age |
| max backup age | --max-backup-age HOURS | CLOUDBK_CHECK_MAX_BACKUP_AGE | [check] max_backup_age |
| max WAL lag | --max-wal-lag SEGMENTS | CLOUDBK_CHECK_MAX_WAL_LAG | [check] max_wal_lag |

A policy given on the command line replaces the configured one entirely (``--redundancy 3`` wins over a
``recovery_window`` in the file); giving both policies at the same level is a usage error.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from cloudbk.config import Settings
from cloudbk.errors import UsageError
from cloudbk.lifecycle.retention import DEFAULT_MINIMUM_REDUNDANCY, Policy, parse_window
from cloudbk.repo.inflight import DEFAULT_STALE_UPLOAD_AGE

RETENTION_KEYS = ("redundancy", "recovery_window", "minimum_redundancy", "stale_upload_age")
CHECK_KEYS = ("max_backup_age", "max_wal_lag", "minimum_redundancy")
_ENV_PREFIX = {"retention": "CLOUDBK_RETENTION_", "check": "CLOUDBK_CHECK_"}
_NOT_POLICY = ("minimum_redundancy", "stale_upload_age")  # [retention] settings that are not the policy


def section(settings: Settings, name: str, known: tuple[str, ...]) -> dict[str, Any]:
    table = settings.sections.get(name, {})
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UsageError(
            f"config file {settings.config_file} has unknown settings in [{name}]: {', '.join(unknown)}",
            hint=f"known settings: {', '.join(known)}",
        )
    return dict(table)


def _layer(settings: Settings, name: str, known: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(env values, file values) of one table."""
    prefix = _ENV_PREFIX[name]
    env = {k: settings.environ[prefix + k.upper()] for k in known if settings.environ.get(prefix + k.upper())}
    return env, section(settings, name, known)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{what} {value!r} is not a whole number")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UsageError(f"{what} {value!r} is not a whole number") from None
    return number


def minimum_redundancy(settings: Settings, flag: int | None) -> int:
    if flag is not None:
        return flag
    env, file = _layer(settings, "retention", RETENTION_KEYS)
    for layer in (env, file):
        if "minimum_redundancy" in layer:
            return _int(layer["minimum_redundancy"], "minimum redundancy")
    return DEFAULT_MINIMUM_REDUNDANCY


def retention_policy(
    settings: Settings, redundancy: int | None, recovery_window: str | None, minimum: int | None
) -> Policy:
    """The policy from flags, else env, else the [retention] table."""
    env, file = _layer(settings, "retention", RETENTION_KEYS)
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
    env, file = _layer(settings, "retention", RETENTION_KEYS)
    value = flag if flag is not None else env.get("stale_upload_age", file.get("stale_upload_age"))
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
    """(max backup age, max WAL lag, minimum redundancy); None where nothing was configured."""
    env, file = _layer(settings, "check", CHECK_KEYS)
    age: timedelta | None = None
    hours: Any = max_backup_age
    if hours is None:
        hours = env.get("max_backup_age", file.get("max_backup_age"))
    if hours is not None:
        try:
            value = float(hours)
        except (TypeError, ValueError):
            raise UsageError(f"max backup age {hours!r} is not a number of hours") from None
        if not value > 0:
            raise UsageError("max backup age must be more than zero hours")
        age = timedelta(hours=value)
    lag: int | None = max_wal_lag
    if lag is None and ("max_wal_lag" in env or "max_wal_lag" in file):
        lag = _int(env.get("max_wal_lag", file.get("max_wal_lag")), "max WAL lag")
    if lag is not None and lag < 0:
        raise UsageError("max WAL lag must not be negative")
    if minimum is None and ("minimum_redundancy" in env or "minimum_redundancy" in file):
        minimum = _int(env.get("minimum_redundancy", file.get("minimum_redundancy")), "minimum redundancy")
    return age, lag, minimum_redundancy(settings, minimum)
