#!/usr/bin/env bash
# Set up .venv, then run the whole test suite (extra arguments go to pytest) and ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
