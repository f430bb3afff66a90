#!/usr/bin/env bash
# Launches the scoring job on a Flink cluster with Beam's FlinkRunner.
# Every setting comes from the environment; see docs/flink.md for each one.
#
#   FLINK_MASTER=jobmanager:8081 KAFKA=broker-1:9092,broker-2:9092 \
#   SDK_IMAGE=registry.example.com/sensor-scoring-sdk:0.1.0 deploy/launch_flink.sh [extra job flags]
#
# Without Docker, against deploy/start_flink_cluster.sh's cluster, workers from a
# worker pool of the project's venv (or ENVIRONMENT_TYPE=LOOPBACK: in this process):
#   python -m apache_beam.runners.worker.worker_pool_main --service_port=50000 &
#   FLINK_MASTER=localhost:8081 KAFKA=localhost:9092 ENVIRONMENT_TYPE=EXTERNAL deploy/launch_flink.sh
set -euo pipefail
cd "$(dirname "$0")/.."

: "${FLINK_MASTER:?set FLINK_MASTER to the JobManager REST address, host:port}"
: "${KAFKA:?set KAFKA to the bootstrap servers}"
FLINK_VERSION="${FLINK_VERSION:-}"             # default: the fetched job server's (beam_jobs/flink_runner.py)
PARALLELISM="${PARALLELISM:-4}"
CHECKPOINT_MS="${CHECKPOINT_MS:-60000}"
STATE_URI="${STATE_URI:-}"                     # e.g. s3://bucket/sensor-scoring/checkpoints
# The job's --state_backend needs --state_backend_storage_path: rocksdb with STATE_URI, else the cluster's
# state.backend.type and state.checkpoints.dir (deploy/flink-conf.yaml).
STATE_BACKEND="${STATE_BACKEND:-$([[ -n "$STATE_URI" ]] && echo rocksdb || true)}"
ENVIRONMENT_TYPE="${ENVIRONMENT_TYPE:-DOCKER}" # DOCKER | PROCESS | EXTERNAL | LOOPBACK
case "$ENVIRONMENT_TYPE" in
  DOCKER)   ENVIRONMENT_CONFIG="${SDK_IMAGE:?set SDK_IMAGE to the image built from deploy/Dockerfile}" ;;
  PROCESS)  ENVIRONMENT_CONFIG='{"command": "/opt/apache/beam/boot"}' ;;
  EXTERNAL) ENVIRONMENT_CONFIG="${WORKER_POOL:-localhost:50000}" ;;
  LOOPBACK) ENVIRONMENT_CONFIG="" ;;
  *) echo "ENVIRONMENT_TYPE must be DOCKER, PROCESS, EXTERNAL or LOOPBACK" >&2; exit 2 ;;
esac

args=(
  --runner=FlinkRunner
  --flink_master="$FLINK_MASTER"
  --parallelism="$PARALLELISM"
  --checkpointing_interval="$CHECKPOINT_MS"
  --environment_type="$ENVIRONMENT_TYPE"
  --bootstrap_servers="$KAFKA"
  --start_from=committed
)
[[ -n "$ENVIRONMENT_CONFIG" ]] && args+=(--environment_config="$ENVIRONMENT_CONFIG")
[[ -n "$FLINK_VERSION" ]] && args+=(--flink_version="$FLINK_VERSION")
[[ -n "$STATE_BACKEND" ]] && args+=(--state_backend="$STATE_BACKEND")
[[ -n "$STATE_URI" ]] && args+=(--state_backend_storage_path="$STATE_URI")
[[ -n "${SAVEPOINT:-}" ]] && args+=(--savepoint_path="$SAVEPOINT")
# Without the project on the workers (PROCESS on a bare image), stage it: Beam
# builds an sdist of setup.py and installs it on every worker. LOOPBACK and a
# worker pool from the project's venv have it already; so does the image.
STAGE_SETUP_FILE="${STAGE_SETUP_FILE:-$([[ "$ENVIRONMENT_TYPE" == PROCESS ]] && echo 1 || true)}"
[[ -n "$STAGE_SETUP_FILE" ]] && args+=(--setup_file=./setup.py)

exec python -m beam_jobs.sensor_scoring "${args[@]}" "$@"
