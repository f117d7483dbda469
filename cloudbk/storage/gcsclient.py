"""The google-cloud-storage client of the ``gs://`` backend: credentials, no SDK retries, deadline-capped waits.

Every request of the SDK, and of the resumable uploads driven through google-resumable-media, goes through one
:class:`DeadlineSession` (an ``AuthorizedSession``): it caps each request's connect and read timeouts by the
time left to the current deadline (:func:`~cloudbk.storage.deadline.request_timeout`) whatever timeout the
library passes (``recover()`` of a resumable upload takes none), and reads every response body through
:class:`~cloudbk.storage.deadline.WatchedBody`, one socket read at a time, so a trickling body is cut when the
time is up. The ``requests`` adapter retries nothing: the retry layer (:mod:`cloudbk.storage.retry`) decides.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from cloudbk.errors import AccessDenied, UsageError
from cloudbk.storage.deadline import WatchedBody, request_timeout

if TYPE_CHECKING:
    from cloudbk.storage.base import StorageOptions

GCS_ENDPOINT = "https://storage.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
CONNECT_TIMEOUT = 10.0  # seconds to establish a connection
READ_TIMEOUT = 60.0  # seconds without a byte from the service
STREAM_READ = 1024 * 1024  # the most one socket read of a streamed body may bring
POOL_SIZE = 32  # connections kept per host: parallel deletes and part-parallel callers share the session
EMULATOR_PROJECT = "cloudbk"  # fake-gcs-server needs some project id; GOOGLE_CLOUD_PROJECT wins
ACCESS_HINT = (
    "check the credentials (GOOGLE_APPLICATION_CREDENTIALS or application default credentials) and that the "
    "identity holds roles/storage.objectUser (or objectAdmin) on the bucket"
)


class _Body(WatchedBody):
    """A watched body whose ``stream`` asks each socket read for up to ``STREAM_READ`` bytes: the SDK's
    downloads iterate in 8 KiB steps, and every step is a watched wait (a timeout set, the watch told)."""

    def stream(self, amt: int | None = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
        return super().stream(max(amt or 0, STREAM_READ), decode_content)


def _capped(timeout: Any) -> tuple[float, float]:
    """(connect, read) for one request: what the library asked, at most ours, at most the time left."""
    if isinstance(timeout, tuple):
        connect, read = timeout
    elif isinstance(timeout, int | float):
        connect = read = float(timeout)
    else:
        connect, read = CONNECT_TIMEOUT, READ_TIMEOUT
    return request_timeout(min(connect, CONNECT_TIMEOUT)), request_timeout(min(read, READ_TIMEOUT))


def _session_class() -> type[Any]:
    authorized: Any = importlib.import_module("google.auth.transport.requests").AuthorizedSession

    class DeadlineSession(authorized):  # type: ignore[misc]  # google-auth is not annotated
        """An AuthorizedSession whose waits obey the current deadline and whose bodies are read watched."""

        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = _capped(kwargs.get("timeout"))
            headers = kwargs.get("headers") or {}
            if any(name.lower() == "range" for name in headers):
                # fake-gcs-server drops the connection after a ranged read without saying so, and a request
                # sent on it meanwhile is reset; ask for that, so the pool never reuses it (one connection per
                # read window, as the hand-written client had: it closed every read's response).
                kwargs["headers"] = {**headers, "Connection": "close"}
            streamed = bool(kwargs.pop("stream", False))
            # Always streamed underneath, so the body is read through the watch; read it here (as requests
            # itself would) when the caller did not ask for a stream.
            response = super().request(method, url, *args, stream=True, **kwargs)
            if not isinstance(response.raw, WatchedBody):
                response.raw = _Body(response.raw, READ_TIMEOUT)
            if not streamed:
                try:
                    response.content  # noqa: B018 - reads and keeps the body
                except BaseException:
                    response.close()  # cut short (a deadline, a reset): the connection is not reused
                    raise
            return response

    return DeadlineSession


def _credentials(environ: Mapping[str, str]) -> Any:
    auth: Any = importlib.import_module("google.auth")  # Any: google-auth is only partly annotated
    try:
        key_file = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if key_file:
            credentials, _ = auth.load_credentials_from_file(key_file, scopes=[SCOPE])
        else:
            credentials, _ = auth.default(scopes=[SCOPE])
    except auth.exceptions.DefaultCredentialsError as exc:
        raise AccessDenied(f"no usable Google Cloud credentials: {exc}", hint=ACCESS_HINT) from exc
    return credentials


def endpoint_of(options: StorageOptions) -> str:
    """The JSON API endpoint: ``STORAGE_EMULATOR_HOST``, else ``options.endpoint_url``, else Google's."""
    emulator = (options.environ.get("STORAGE_EMULATOR_HOST") or "").strip()
    if emulator:
        endpoint = emulator if "://" in emulator else f"http://{emulator}"
    else:
        endpoint = options.endpoint_url or GCS_ENDPOINT
    if "://" not in endpoint:
        raise UsageError(f"GCS endpoint {endpoint!r} is not a URL", hint="use http(s)://host[:port]")
    return endpoint.rstrip("/")


def build_client(options: StorageOptions, endpoint: str) -> tuple[Any, Any]:
    """``(client, session)`` for ``endpoint`` from ``options.environ`` (SPEC §1).

    The emulator (``STORAGE_EMULATOR_HOST``): anonymous credentials, ``GOOGLE_CLOUD_PROJECT`` or a fixed
    project id. Otherwise application default credentials (or ``GOOGLE_APPLICATION_CREDENTIALS``). The
    endpoint is passed explicitly, so the SDK's own reading of the process environment never overrides
    ``options.environ``.
    """
    from google.api_core.client_options import ClientOptions
    from google.cloud import storage
    from requests.adapters import HTTPAdapter

    environ = options.environ
    project = environ.get("GOOGLE_CLOUD_PROJECT") or environ.get("GCLOUD_PROJECT") or None
    credentials: Any
    if (environ.get("STORAGE_EMULATOR_HOST") or "").strip():
        credentials = importlib.import_module("google.auth.credentials").AnonymousCredentials()
        project = project or EMULATOR_PROJECT
    else:
        credentials = _credentials(environ)
    session = _session_class()(credentials)
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)  # retries are ours
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    client = storage.Client(
        project=project,
        credentials=credentials,
        client_options=ClientOptions(api_endpoint=endpoint),
        _http=session,
    )
    # The SDK fetches each bucket's metadata once per client, in a background thread with its own retries,
    # for tracing attributes: one more request per WAL command, outside the retry layer and the deadline.
    # None is its own "no cache" (the other switch is a process-wide environment variable).
    client._bucket_metadata_cache = None
    return client, session
