"""Keeping credentials out of what cloudbk shows: the one place URLs and free text are redacted.

A URL may carry a user name and password (``http://user:PW@host``, a libpq ``postgresql://`` URI); SDK
exceptions quote the URL they failed on, and cloudbk's messages end up in the PostgreSQL log. Every URL a
message names goes through :func:`redact_url`; every error message, hint and log line goes through
:func:`redact_text` as well (in :class:`cloudbk.errors.CloudbkError` and the CLI's log formatter), so a
URL quoted inside an SDK's text is covered too.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# scheme://userinfo@ — the userinfo runs up to the last '@' before the end of the authority (a '/', white
# space or a quote), so a password holding a raw '@' is masked whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s'\"<>]*)@")


def redact_url(url: str) -> str:
    """``url`` fit to show: its user name and password replaced by ``***``, its query and fragment dropped
    (they may hold a signature, such as an Azure SAS token)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def strip_userinfo(url: str) -> str:
    """``url`` without its user name and password (for a command line cloudbk writes, where ``***`` would
    be taken literally)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact_text(text: str) -> str:
    """``text`` with the user name and password of every URL in it replaced by ``***``."""
    if "@" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
