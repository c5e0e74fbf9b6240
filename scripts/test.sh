#!/usr/bin/env bash
# Set up .venv, then run the whole test suite (extra arguments go to pytest) and ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# no quiet egress from the Flower processes the tests start (the deployment tests check that
# scripts/deploy sets these itself)
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
