#!/usr/bin/env bash
# Create the virtual environment (.venv) and install fedclinic with everything it needs.
# Idempotent: a second call with an unchanged pyproject.toml returns at once.
#   VENV=path  PYTHON=python3.11  scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.fedclinic-installed"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "fedclinic: setting up $VENV (first time: a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, by exact version, with pip: pip finds the local wheels where a machine has them
# (uv and poetry would download a multi-GB CUDA build instead).
"$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "fedclinic: environment ready in $VENV"
