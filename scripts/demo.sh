#!/usr/bin/env bash
# Set everything up (once) and run the demo: the whole pipeline on a generated dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export RAY_DEDUP_LOGS=1 RAY_AUTH_MODE=disabled
digpt demo "$@"
