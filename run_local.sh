#!/usr/bin/env bash
# Runs the scoring job locally: broker (Tansu, or Apache Kafka with --broker kafka; none if KAFKA_BOOTSTRAP_SERVERS
# is set), simulated manufacturing line, job on the DirectRunner, live progress.
#   ./run_local.sh [--events N] [--devices D] [--speed S] [--broker kafka] [-- extra job flags]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec python -m beam_jobs.local_run "$@"
