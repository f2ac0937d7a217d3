#!/usr/bin/env bash
# Create .venv and install the project with its test extras (idempotent; sourced by the other scripts).
# pip only: torch/torchvision resolve to the wheels already on this kind of machine.
set -euo pipefail
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
source .venv/bin/activate
if [ ! -f .venv/.digpt-installed ] || [ pyproject.toml -nt .venv/.digpt-installed ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e '.[test]'
  touch .venv/.digpt-installed
fi
