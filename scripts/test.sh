#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh), then lint, type-check and run the whole suite against
# real services: PostgreSQL 15, the local filesystem, moto and SeaweedFS (S3), Azurite, fake-gcs-server.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k wal -x`).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CLOUDBK_VENV:-/opt/cloudbk-venv}"
cd "$REPO"
bash scripts/install.sh
echo "==> ruff"
"$VENV/bin/ruff" check cloudbk tests scripts
echo "==> mypy"
"$VENV/bin/mypy"
echo "==> pytest"
# In CI every backend must run: CLOUDBK_TEST_BACKENDS is ignored there, so nothing is silently left out.
if [ "${CI:-}" = "true" ]; then unset CLOUDBK_TEST_BACKENDS; fi
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
