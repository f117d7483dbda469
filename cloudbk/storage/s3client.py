"""The botocore client of the ``s3://`` backend: timeouts, no SDK retries, and waits capped by the deadline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cloudbk import __version__
from cloudbk.errors import UsageError
from cloudbk.storage.deadline import request_timeout

CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 60.0  # seconds without a byte from the server
# Connections kept per client: enough for the worker threads sharing one storage and parallel part uploads.
MAX_POOL_CONNECTIONS = 64
DEFAULT_REGION = "us-east-1"


def make_client(url: str, endpoint_url: str | None, env: Mapping[str, str]) -> Any:
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    # Explicit keys when the environment has them; otherwise the SDK's default chain (profile, web identity,
    # instance role). The keys go to the client object only, never into a message.
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not (key_id and secret):
        key_id = secret = None
    token = (env.get("AWS_SESSION_TOKEN") or None) if key_id else None
    try:
        session = botocore.session.Session(profile=env.get("AWS_PROFILE") or None)
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or session.get_config_variable("region")
        config = Config(
            region_name=region or DEFAULT_REGION,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"total_max_attempts": 1},  # no SDK retries: cloudbk.storage.retry decides
            max_pool_connections=MAX_POOL_CONNECTIONS,
            tcp_keepalive=True,
            user_agent_extra=f"cloudbk/{__version__}",
            # S3-compatible stores rarely resolve bucket.host names: path-style addressing with an endpoint.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        client = session.create_client(
            "s3",
            endpoint_url=endpoint_url,
            config=config,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=token,
        )
    except (BotoCoreError, ValueError) as exc:
        raise UsageError(
            f"cannot set up the S3 client for {url}: {exc}",
            hint="check --endpoint-url / CLOUDBK_ENDPOINT_URL, AWS_PROFILE and AWS_REGION",
        ) from exc
    # botocore fixes its timeouts per client, but reads a per-request ``read_timeout`` from the request
    # context (botocore.httpsession.URLLib3Session._get_request_timeout): set it from the current deadline, so
    # each socket read of a request waits at most the time remaining. The connect timeout stays per client.
    client.meta.events.register("before-call.s3", _limit_read_timeout)
    return client


def _limit_read_timeout(context: dict[str, Any], **kwargs: Any) -> None:
    context["read_timeout"] = request_timeout(READ_TIMEOUT)
