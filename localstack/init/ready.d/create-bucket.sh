#!/usr/bin/env bash
# LocalStack init hook: runs when S3 is ready; creates the bucket cloudbk will use.
set -euo pipefail
awslocal s3 mb "s3://${CLOUDBK_BUCKET:-cloudbk}" || true
awslocal s3 ls
