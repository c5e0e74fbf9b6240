#!/usr/bin/env bash
# Run fedclinic with the Flower CLI (`flwr run .`) on a local simulation SuperLink, with one
# SuperNode per site, then stop the SuperLink that `flwr run` started (it would keep running).
#
#   scripts/flwr_local.sh                                   # embedded default (breast_cancer)
#   scripts/flwr_local.sh task=heart_disease task.data_dir=$PWD/../shared/data/heart_disease num_rounds=20
#
# Environment: VENV (default .venv), FLWR_HOME (default ./.flwr), FEDCLINIC_PORT (SuperLink
# port, default: a free one), FEDCLINIC_CPUS_PER_SITE (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export PATH="$PWD/$VENV/bin:$PATH"   # flwr starts flower-superlink from PATH
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # never `uv sync` a CUDA torch per run
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1   # no quiet egress
mkdir -p "$FLWR_HOME"

overrides="$*"
# Outputs land in ./outputs unless the overrides say otherwise (the SuperLink's cwd may differ).
case " $overrides " in *" output_dir="*) ;; *) overrides="$overrides output_dir=$PWD/outputs" ;; esac
# One SuperNode per site: ask the config how many sites this experiment has (fails early and
# clearly on a bad override, before any process starts).
sites=$("$PY" -m fl_app.simulation "$overrides")

port=${FEDCLINIC_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
control_port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=$port FLWR_LOCAL_CONTROL_API_PORT=$control_port

stop_superlink() {
  # Only the SuperLink this script started: matched by its port; its superexec child follows.
  local pids
  pids=$(pgrep -f "flower-superlink.*--port $port( |$)" || true)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    for _ in $(seq 1 20); do pgrep -f "flower-superlink.*--port $port( |$)" >/dev/null || break; sleep 0.5; done
    pkill -9 -f "flower-superlink.*--port $port( |$)" 2>/dev/null || true
  fi
}
trap stop_superlink EXIT

echo "fedclinic: flwr run . with $sites SuperNodes (FLWR_HOME=$FLWR_HOME, SuperLink port $port)"
"$VENV/bin/flwr" run . local --stream \
  --federation-config "num-supernodes=$sites client-resources-num-cpus=${FEDCLINIC_CPUS_PER_SITE:-1}" \
  --run-config "overrides=\"$overrides\""
# `flwr run` exits 0 even when the run failed: ask the SuperLink how the run ended (its status
# and the reason), and exit non-zero, with that line last, unless it completed.
if status=$("$PY" scripts/deploy/run_status.py local 2>&1 | tr -s " \n" "  "); then
  echo "fedclinic: $status"
else
  echo "fedclinic: run failed: $status" >&2
  exit 1
fi
