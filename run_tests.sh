#!/usr/bin/env bash
# Installs what the tests need into .venv and runs the whole suite.
#   ./run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
exec python -m pytest "$@"
