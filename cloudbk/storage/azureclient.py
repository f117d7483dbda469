"""The azure-storage-blob client of the ``azure://`` backend: credentials, no SDK retries, deadline-capped waits."""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cloudbk.errors import UsageError
from cloudbk.storage.deadline import WatchedBody, request_timeout

if TYPE_CHECKING:
    from cloudbk.storage.base import StorageOptions

MiB = 1024 * 1024

CONNECT_TIMEOUT = 10.0  # seconds to establish a connection
READ_TIMEOUT = 60.0  # seconds without a byte from the service
FIRST_GET_SIZE = 8 * MiB  # the first GET of a read (and all of a small object): one request for WAL and the index
READ_CHUNK_SIZE = 4 * MiB  # later GETs of a streamed read: memory held by a reader

CREDENTIALS_HINT = (
    "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or "
    "AZURE_STORAGE_SAS_TOKEN; with Azure AD (azure-identity), the identity needs the "
    "'Storage Blob Data Contributor' role on the container"
)


def _account_from_endpoint(endpoint: str) -> str | None:
    """``http://127.0.0.1:10000/acct`` (emulator style) or ``https://acct.blob.core.windows.net``."""
    parts = urlsplit(endpoint)
    path = parts.path.strip("/")
    if path:
        return path.split("/")[0]
    host = parts.hostname or ""
    return host.split(".")[0] if ".blob." in host else None


def _limit_waits(request: Any) -> None:
    """Each wait of a request (connect, each socket read) at most the time left to the current deadline.

    azure-core's transport takes ``connection_timeout`` / ``read_timeout`` per request from the request's
    options, which this hook (called for every request) sets.
    """
    options = request.context.options
    options["connection_timeout"] = request_timeout(CONNECT_TIMEOUT)
    options["read_timeout"] = request_timeout(READ_TIMEOUT)


def _watch_body(response: Any) -> None:
    """A streamed response body read one socket read at a time, bounded by the current watch.

    The downloader reads a whole chunk with buffered reads of the urllib3 response (``raw``) before handing it
    over; standing a WatchedBody in its place gets control back after every socket read.
    """
    internal = getattr(response.http_response, "internal_response", None)
    raw = getattr(internal, "raw", None)
    if internal is not None and hasattr(raw, "read1") and not isinstance(raw, WatchedBody):
        internal.raw = WatchedBody(raw, READ_TIMEOUT)


def _check_account_key(key: str, setting: str) -> None:
    """An account key is base64 (the SDK would fail signing every request, with no HTTP status to show)."""
    try:
        base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(
            f"{setting} is not a valid Azure storage account key (not base64)",
            hint="copy key1 or key2 from the storage account's 'Access keys' page (88 characters ending in '=='), "
            "or use AZURE_STORAGE_SAS_TOKEN or Azure AD instead",
        ) from exc


def build_client(options: StorageOptions) -> Any:
    """A BlobServiceClient from ``options.environ`` (SPEC §1: connection string, key, SAS, Azure AD)."""
    from azure.storage.blob import BlobServiceClient

    def env(name: str) -> str | None:
        return (options.environ.get(name) or "").strip() or None

    settings: dict[str, Any] = {
        # our retry layer retries by error class; every SDK retry counter at zero
        "retry_total": 0,
        "retry_connect": 0,
        "retry_read": 0,
        "retry_status": 0,
        "connection_timeout": CONNECT_TIMEOUT,
        "read_timeout": READ_TIMEOUT,
        "max_single_get_size": FIRST_GET_SIZE,
        "max_chunk_get_size": READ_CHUNK_SIZE,
        "raw_request_hook": _limit_waits,
        "raw_response_hook": _watch_body,
    }
    endpoint = options.endpoint_url
    connection_string = env("AZURE_STORAGE_CONNECTION_STRING")
    if connection_string:
        fields = {k.strip().lower(): v for k, v in (f.split("=", 1) for f in connection_string.split(";") if "=" in f)}
        if "accountkey" in fields:
            _check_account_key(fields["accountkey"], "the AccountKey of AZURE_STORAGE_CONNECTION_STRING")
        try:
            client = BlobServiceClient.from_connection_string(connection_string, **settings)
        except ValueError as exc:
            raise UsageError(
                f"AZURE_STORAGE_CONNECTION_STRING is malformed: {exc}",
                hint="it is a list of Name=value pairs separated by ';', e.g. DefaultEndpointsProtocol=https;"
                "AccountName=NAME;AccountKey=KEY;EndpointSuffix=core.windows.net, as the portal's 'Access keys' "
                "page shows it; or unset it and use " + CREDENTIALS_HINT.removeprefix("set "),
            ) from exc
        if not endpoint:
            return client
        # the endpoint option overrides the connection string's endpoint; keep its credential
        sas = fields.get("sharedaccesssignature")
        return BlobServiceClient(endpoint, credential=sas or client.credential, **settings)
    account = env("AZURE_STORAGE_ACCOUNT") or (_account_from_endpoint(endpoint) if endpoint else None)
    if not account:
        raise UsageError("no Azure storage account configured", hint=CREDENTIALS_HINT)
    url = endpoint or f"https://{account}.blob.core.windows.net"
    key, sas = env("AZURE_STORAGE_KEY"), env("AZURE_STORAGE_SAS_TOKEN")
    credential: Any
    if key:
        _check_account_key(key, "AZURE_STORAGE_KEY")
        credential = {"account_name": account, "account_key": key}
    elif sas:
        credential = sas.lstrip("?")
    else:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError as exc:
            raise UsageError(
                f"no credentials for Azure storage account {account}: AZURE_STORAGE_KEY and AZURE_STORAGE_SAS_TOKEN "
                "are unset and azure-identity is not installed",
                hint=CREDENTIALS_HINT + " (pip install azure-identity)",
            ) from exc
        credential = DefaultAzureCredential()
    return BlobServiceClient(url, credential=credential, **settings)
