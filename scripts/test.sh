#!/usr/bin/env bash
# Set everything up (once), lint, and run the whole test suite, slow tests included.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -m 'not slow'   # the fast unit tests only
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# Lint first: it takes a second and fails before minutes of tests. Rules: [tool.ruff] in pyproject.toml.
echo "ruff check . && ruff format --check ."
ruff check .
ruff format --check .
export RAY_DEDUP_LOGS=1 RAY_AUTH_MODE=disabled OMP_NUM_THREADS=2
python -m pytest -q --timeout=900 "$@"
