#!/usr/bin/env bash
# Runs the scoring job locally: broker (embedded unless KAFKA_BOOTSTRAP_SERVERS
# is set), simulated manufacturing line, job on the DirectRunner, live progress.
#   ./run_local.sh [--events N] [--devices D] [--speed S] [-- extra job flags]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec python -m beam_jobs.local_run "$@"
