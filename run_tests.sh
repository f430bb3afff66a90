#!/usr/bin/env bash
# Installs what the tests need into .venv and runs the whole suite.
#   ./run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
# Apache Kafka's jars (Java 17 and Maven needed), fetched once into ~/.cache: the delivery and security tests run on it.
scripts/fetch_kafka.sh > /dev/null
exec python -m pytest "$@"
