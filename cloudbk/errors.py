"""The exception taxonomy and the exit codes (SPEC §1), defined in one place.

Every error carries a message, the key or path it concerns, and an optional hint telling the operator what
to do. Storage drivers translate SDK errors into the ``Storage*`` classes at their boundary (always chained
with ``raise ... from exc``); retry decisions are made by class, never by message text.
"""

from __future__ import annotations

from cloudbk.redact import redact_text


class ExitCode:
    """Process exit codes. Only ``cloudbk.cli`` turns exceptions into these."""

    OK = 0
    FAILED = 1  # operation failed; for wal-fetch: the file is not in the archive
    STORAGE = 2  # storage unreachable or failing after retries
    USAGE = 3  # bad flag, bad URL, bad config
    OTHER = 4  # integrity failure, conflict, anything else
    # wal-fetch during archive recovery when the archive cannot be read: PostgreSQL treats an exit status
    # above 125 as fatal and stops instead of ending recovery (xlogarchive.c, RestoreArchivedFile). 143 is
    # excluded because it reads as SIGTERM.
    FETCH_FATAL = 126


class Terminated(BaseException):
    """Raised in place of dying on SIGTERM (``cloudbk.cli.common.terminate_on_sigterm``), so ``finally`` blocks
    remove temporary files and abort uploads; not an error, so ``except Exception`` does not catch it."""


class CloudbkError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for it."""

    exit_code: int = ExitCode.OTHER

    def __init__(self, message: str, *, key: str | None = None, hint: str | None = None) -> None:
        # Messages quote URLs and SDK texts, and they end up in the PostgreSQL log: never a password.
        message = redact_text(message)
        super().__init__(message)
        self.message = message
        self.key = key
        self.hint = None if hint is None else redact_text(hint)

    def __str__(self) -> str:
        text = self.message
        if self.key is not None and self.key not in text:
            text = f"{text} ({self.key})"
        if self.hint:
            text = f"{text}\nHINT: {self.hint}"
        return text


class UsageError(CloudbkError):
    """Bad flag, URL or configuration."""

    exit_code = ExitCode.USAGE


class IntegrityError(CloudbkError):
    """Stored data does not match its checksum or format."""

    exit_code = ExitCode.OTHER


def refuse_newer_format(what: str, key: str, version: int, known: int) -> None:
    """Raise ``IntegrityError`` when ``what`` at ``key`` has a format version newer than the ``known`` one."""
    if version > known:
        raise IntegrityError(
            f"{what} {key} has format version {version}, newer than this cloudbk ({known})",
            key=key,
            hint="upgrade cloudbk",
        )


class ConflictError(CloudbkError):
    """An object exists with different content than the one we were asked to store."""

    exit_code = ExitCode.OTHER


class OperationFailed(CloudbkError):
    """The operation could not be done (for example: a backup that does not exist)."""

    exit_code = ExitCode.FAILED


# --- what the use cases raise ---------------------------------------------------------------------------


class ArchiveNotConfigured(CloudbkError):
    """The repository holds no archive for this server: a configuration error, never "file absent"."""

    exit_code = ExitCode.USAGE


class LocalWriteError(CloudbkError):
    """The fetched file could not be written to the destination (disk full, permissions)."""

    exit_code = ExitCode.OTHER


class IndexUpdateFailed(CloudbkError):
    """The WAL file is durably stored, but the index could not be updated to list it.

    The push reports failure (with the exit code of the underlying error) so PostgreSQL retries it: the
    retry finds the identical object, which is success, and finishes the index update. Exiting 0 would
    leave a silent hole in the index that PITR planning and retention trust.
    """

    def __init__(self, cause: CloudbkError, name: str, key: str) -> None:
        super().__init__(
            f"{name} is stored durably at {key}, but the index could not be updated: {cause.message}",
            key=key,
            hint="PostgreSQL will retry this push, which is safe and completes the index update; "
            "if the index itself is damaged run `cloudbk reindex`",
        )
        self.exit_code = cause.exit_code
        self.cause = cause


class DatabaseError(CloudbkError):
    """PostgreSQL refused a request or the connection failed."""


class LinkLoop(UsageError):
    """A symbolic link leads back into a directory the walk is inside of: following it would never end."""

    def __init__(self, path: str, target: str) -> None:
        super().__init__(
            f"symbolic link {path} -> {target} leads back into a directory that contains it",
            key=path,
            hint="a backup follows symbolic links in the data directory; remove this one or point it elsewhere",
        )


class UnreadableIndex(IntegrityError):
    """The index object was read but does not parse (truncated, not JSON, fields missing). Not raised for an
    index of a newer format version: that one is refused, never replaced."""


class CorruptManifest(IntegrityError):
    """A manifest that was read but is not valid (not JSON, not an object, fields missing or malformed)."""


class UnsafeMember(IntegrityError):
    """A tar member would escape the destination or is of a type a backup never holds."""


class LinkEscapes(Exception):
    """A link would resolve outside the root (``reason`` says how). Internal to restore: the tar extractor
    reports it as :class:`UnsafeMember`, naming the member."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- storage taxonomy -------------------------------------------------------------------------------------


class StorageError(CloudbkError):
    """Base of every error raised by a storage driver."""

    exit_code = ExitCode.STORAGE


class NotFound(StorageError):
    """The key does not exist (the storage answered, and the answer was: absent)."""

    exit_code = ExitCode.FAILED


class AlreadyExists(StorageError):
    """A create-only write found the key already present."""

    exit_code = ExitCode.OTHER


class PreconditionFailed(StorageError):
    """A replace-if-version-matches write found another version."""

    exit_code = ExitCode.OTHER


class AccessDenied(StorageError):
    """Credentials missing, wrong, or lacking permission. Not retried."""

    exit_code = ExitCode.STORAGE


class PermanentError(StorageError):
    """The storage rejected the request for a reason retrying will not fix (bad bucket name, 4xx)."""

    exit_code = ExitCode.STORAGE


class TransientError(StorageError):
    """Network failure, timeout, 5xx, throttling: retried by the retry layer until its deadline."""

    exit_code = ExitCode.STORAGE
