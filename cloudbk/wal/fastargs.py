"""The command line of a hit path (``cloudbk-wal-push``, ``cloudbk-wal-fetch``), read without argparse.

Standard library only, and only the forms PostgreSQL's commands use: ``--flag value``, ``--flag=value``,
``-v``, ``--`` and a fixed number of positional words. Anything else -> None, and the caller runs the full
command, whose real parser reports it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs import time on the fast path
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

# long options every WAL command takes, and the Settings name each fills (None: accepted, not needed here)
COMMON_FLAGS: dict[str, str | None] = {
    "--config": "config",
    "--repo": "repo",
    "--server": "server",
    "--endpoint-url": "endpoint_url",
    "--retry-deadline": "retry_deadline",
    "--compression": None,
    "--dbname": None,
    "--pgdata": None,
}
BOOL_FLAGS = ("-v", "--verbose")


def parse(
    argv: Sequence[str], value_flags: Mapping[str, str | None], count: int
) -> tuple[dict[str, str], list[str]] | None:
    """(flags by Settings name, the ``count`` positional words), or None when the line needs the real parser."""
    flags: dict[str, str] = {}
    words: list[str] = []
    it = iter(argv)
    for word in it:
        if word == "--":
            words += list(it)
            break
        if word.startswith("-") and word != "-":
            option, sep, value = word.partition("=")
            if option in BOOL_FLAGS and not sep:
                continue
            if option not in value_flags:
                return None
            if not sep:
                following = next(it, None)
                if following is None:
                    return None
                value = following
            name = value_flags[option]
            if name is not None:
                flags[name] = value
            continue
        words.append(word)
    if len(words) != count or not all(words):
        return None
    return flags, words


def seconds(value: str | None, default: float) -> float:
    try:
        return max(0.0, float(value)) if value else default
    except ValueError:
        return default
