#!/usr/bin/env bash
# Launches the scoring job on a Flink cluster with Beam's FlinkRunner.
# Every setting comes from the environment; see docs/flink.md for each one.
#
#   FLINK_MASTER=jobmanager:8081 KAFKA=broker-1:9092,broker-2:9092 \
#   SDK_IMAGE=registry.example.com/sensor-scoring-sdk:0.1.0 deploy/launch_flink.sh [extra job flags]
set -euo pipefail
cd "$(dirname "$0")/.."

: "${FLINK_MASTER:?set FLINK_MASTER to the JobManager REST address, host:port}"
: "${KAFKA:?set KAFKA to the bootstrap servers}"
FLINK_VERSION="${FLINK_VERSION:-1.20}"
PARALLELISM="${PARALLELISM:-4}"
CHECKPOINT_MS="${CHECKPOINT_MS:-60000}"
STATE_URI="${STATE_URI:-}"                     # e.g. s3://bucket/sensor-scoring/checkpoints
ENVIRONMENT_TYPE="${ENVIRONMENT_TYPE:-DOCKER}" # DOCKER | PROCESS | EXTERNAL
case "$ENVIRONMENT_TYPE" in
  DOCKER)   ENVIRONMENT_CONFIG="${SDK_IMAGE:?set SDK_IMAGE to the image built from deploy/Dockerfile}" ;;
  PROCESS)  ENVIRONMENT_CONFIG='{"command": "/opt/apache/beam/boot"}' ;;
  EXTERNAL) ENVIRONMENT_CONFIG="${WORKER_POOL:-localhost:50000}" ;;
  *) echo "ENVIRONMENT_TYPE must be DOCKER, PROCESS or EXTERNAL" >&2; exit 2 ;;
esac

args=(
  --runner=FlinkRunner
  --flink_master="$FLINK_MASTER"
  --flink_version="$FLINK_VERSION"
  --parallelism="$PARALLELISM"
  --checkpointing_interval="$CHECKPOINT_MS"
  --state_backend=rocksdb
  --environment_type="$ENVIRONMENT_TYPE"
  --environment_config="$ENVIRONMENT_CONFIG"
  --bootstrap_servers="$KAFKA"
  --start_from=committed
)
[[ -n "$STATE_URI" ]] && args+=(--state_backend_storage_path="$STATE_URI")
[[ -n "${SAVEPOINT:-}" ]] && args+=(--savepoint_path="$SAVEPOINT")
# Without the project baked into the image, stage it: Beam builds an sdist of
# setup.py and installs it on every worker.
[[ "$ENVIRONMENT_TYPE" != "DOCKER" || -n "${STAGE_SETUP_FILE:-}" ]] && args+=(--setup_file=./setup.py)

exec python -m beam_jobs.sensor_scoring "${args[@]}" "$@"
