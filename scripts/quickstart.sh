#!/usr/bin/env bash
# Quick start: set up .venv, then `flwr run .` on the embedded default (breast cancer data
# shipped with scikit-learn, 3 simulated hospitals). Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec scripts/flwr_local.sh "$@"
