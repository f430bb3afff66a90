#!/usr/bin/env bash
# A standalone Flink cluster on this machine, from PyPI's apache-flink wheels
# (flink-dist and the cluster scripts), for deploy/launch_flink.sh to submit to:
# one JobManager (REST on localhost:8081) and TASKMANAGERS TaskManagers with
# SLOTS slots each, small heaps, logs under the cluster folder.
#
#   deploy/start_flink_cluster.sh            # start (installs the wheels once)
#   deploy/start_flink_cluster.sh stop       # stop every JobManager and TaskManager it started
#   deploy/start_flink_cluster.sh status     # the REST overview
#   deploy/start_flink_cluster.sh add-taskmanager   # one more TaskManager (after one was killed)
#
# Flink's version must be the job server's (beam_jobs/flink_runner.py): the
# job server is Flink's client, and a 1.19 client cannot submit to a 2.x
# cluster. The wheels live in a venv of their own (apache-flink pins an old
# Beam): never in the project's .venv. Needs Java 11 or 17 and Python 3.
set -euo pipefail

FLINK_VERSION="${FLINK_VERSION:-1.19.3}"
CACHE="${SENSOR_SCORING_CACHE:-$HOME/.cache/sensor-scoring}"
VENV="$CACHE/flink-venv-$FLINK_VERSION"
CLUSTER="${FLINK_CLUSTER_DIR:-$CACHE/flink-cluster}"
TASKMANAGERS="${TASKMANAGERS:-1}"
SLOTS="${SLOTS:-2}"
REST_PORT="${REST_PORT:-8081}"

flink_home() {
  "$VENV/bin/python" -c 'import os, pyflink; print(os.path.dirname(os.path.abspath(pyflink.__file__)))'
}

install() {
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pyflink' 2>/dev/null; then
    echo "installing apache-flink $FLINK_VERSION into $VENV (once)" >&2
    python3 -m venv "$VENV"
    # --no-deps: only flink-dist, the connectors and bin/; PyFlink's own dependencies (an old Beam) are not needed.
    "$VENV/bin/pip" install -q --no-deps "apache-flink-libraries==$FLINK_VERSION" "apache-flink==$FLINK_VERSION" >&2
  fi
}

configure() {
  local home=$1
  mkdir -p "$CLUSTER/conf" "$CLUSTER/log" "$CLUSTER/checkpoints" "$CLUSTER/savepoints"
  cp "$home/conf/log4j.properties" "$home/conf/log4j-console.properties" "$CLUSTER/conf/"
  # Flat keys are valid in Flink's config.yaml. The java opts are the wheel's own (Java 17 module access).
  local java_opts
  java_opts=$(grep -E '^\s+all: --add-exports' "$home/conf/config.yaml" | sed 's/^\s*all: //')
  cat > "$CLUSTER/conf/config.yaml" <<EOF
env.java.opts.all: $java_opts
env.log.dir: $CLUSTER/log
env.pid.dir: $CLUSTER
jobmanager.bind-host: localhost
jobmanager.rpc.address: localhost
jobmanager.rpc.port: 6123
jobmanager.memory.process.size: 768m
taskmanager.bind-host: localhost
taskmanager.host: localhost
taskmanager.numberOfTaskSlots: $SLOTS
# Small: the Python SDK harness (torch) runs outside the TaskManager (LOOPBACK or EXTERNAL workers).
taskmanager.memory.process.size: 1536m
taskmanager.memory.managed.size: 64m
# The job's graph is wide (about 20 operators, all-to-all keyed shuffles): 64 MiB of network buffers was too few
# for parallelism 2 ("Insufficient number of network buffers: required 512, but only 490 available"), and 160 MiB
# for two jobs in a row on one TaskManager.
taskmanager.memory.network.min: 256m
taskmanager.memory.network.max: 256m
# A job of parallelism 2 on two TaskManagers gets a slot on each, so losing either TaskManager fails it over.
cluster.evenly-spread-out-slots: true
parallelism.default: 1
rest.address: localhost
rest.bind-address: localhost
rest.port: $REST_PORT
execution.checkpointing.externalized-checkpoint-retention: RETAIN_ON_CANCELLATION
state.checkpoints.dir: file://$CLUSTER/checkpoints
state.savepoints.dir: file://$CLUSTER/savepoints
restart-strategy.type: fixed-delay
restart-strategy.fixed-delay.attempts: 10
restart-strategy.fixed-delay.delay: 2s
EOF
}

wait_for_slots() {
  local want=$((TASKMANAGERS * SLOTS)) deadline=$((SECONDS + 90)) have=0
  while [ $SECONDS -lt $deadline ]; do
    have=$(curl -fsS "http://localhost:$REST_PORT/overview" 2>/dev/null \
      | python3 -c 'import json, sys; print(json.load(sys.stdin)["slots-total"])' 2>/dev/null || echo 0)
    [ "$have" -ge "$want" ] && { echo "Flink $FLINK_VERSION on localhost:$REST_PORT: $have slots; logs in $CLUSTER/log" >&2; return 0; }
    sleep 1
  done
  echo "start_flink_cluster.sh: $have of $want slots after 90 s; see $CLUSTER/log" >&2
  return 1
}

case "${1:-start}" in
  start)
    install
    home=$(flink_home)
    configure "$home"
    export FLINK_CONF_DIR="$CLUSTER/conf" FLINK_LOG_DIR="$CLUSTER/log" FLINK_PID_DIR="$CLUSTER"
    "$home/bin/jobmanager.sh" start >&2
    for _ in $(seq "$TASKMANAGERS"); do "$home/bin/taskmanager.sh" start >&2; done
    wait_for_slots
    ;;
  stop)
    home=$(flink_home)
    export FLINK_CONF_DIR="$CLUSTER/conf" FLINK_LOG_DIR="$CLUSTER/log" FLINK_PID_DIR="$CLUSTER"
    "$home/bin/taskmanager.sh" stop-all >&2 || true
    "$home/bin/jobmanager.sh" stop-all >&2 || true
    ;;
  add-taskmanager)
    home=$(flink_home)
    export FLINK_CONF_DIR="$CLUSTER/conf" FLINK_LOG_DIR="$CLUSTER/log" FLINK_PID_DIR="$CLUSTER"
    "$home/bin/taskmanager.sh" start >&2
    ;;
  status)
    curl -fsS "http://localhost:$REST_PORT/overview"; echo
    ;;
  *)
    echo "usage: $0 [start|stop|status|add-taskmanager]" >&2; exit 2
    ;;
esac
