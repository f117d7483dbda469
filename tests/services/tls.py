"""A throwaway certificate authority and a server certificate for 127.0.0.1, made with the openssl CLI.

pgBackRest speaks S3 only over TLS and matches the host only against DNS-type subject alternative names, so
the certificate names the loopback address twice: ``DNS:127.0.0.1`` (for pgBackRest) and ``IP:127.0.0.1``
(for clients that follow RFC 6125, such as botocore). Clients trust ``ca`` (``AWS_CA_BUNDLE`` for botocore,
``repo1-s3-ca-file`` for pgBackRest); the keys never leave the directory they are made in.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"  # throwaway: long enough for a benchmark or a test session, no longer


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA certificate clients trust, and the server's certificate and private key."""

    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({proc.returncode}):\n{proc.stderr}")


def make_loopback_tls(directory: Path) -> TlsFiles:
    """Create ``ca.crt``, ``server.crt`` and ``server.key`` in ``directory`` (which must exist)."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS, "-subj", "/CN=cloudbk throwaway CA",
        "-keyout", "ca.key", "-out", "ca.crt",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName = DNS:127.0.0.1, IP:127.0.0.1\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", DAYS, "-extfile", "server.ext", "-out", "server.crt",
        cwd=directory,
    )  # fmt: skip
    for name in ("ca.crt", "server.crt"):
        (directory / name).chmod(0o644)  # clients may run as another user (the PostgreSQL user)
    for name in ("ca.key", "server.key"):
        (directory / name).chmod(0o600)
    return TlsFiles(ca=directory / "ca.crt", cert=directory / "server.crt", key=directory / "server.key")
