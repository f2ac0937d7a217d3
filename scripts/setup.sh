#!/usr/bin/env bash
# Create .venv and install the project with its test extras (idempotent; sourced by the other scripts).
# pip only: torch/torchvision resolve to the wheels already on this kind of machine. pip's own output
# goes to .venv/pip.log; on a failure its tail is printed here.
set -euo pipefail
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
source .venv/bin/activate
if [ ! -f .venv/.digpt-installed ] || [ pyproject.toml -nt .venv/.digpt-installed ]; then
  echo "setup: installing digpt and its test extras into .venv (a few minutes the first time; log: .venv/pip.log)"
  if ! { python -m pip install -q --upgrade pip && python -m pip install -q -e '.[test]'; } >.venv/pip.log 2>&1; then
    echo "setup: pip install failed; the end of .venv/pip.log:" >&2
    tail -n 30 .venv/pip.log >&2
    return 1 2>/dev/null || exit 1
  fi
  touch .venv/.digpt-installed
  echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
fi
