#!/usr/bin/env bash
# Local stack on 127.0.0.1: Prefect server (SQLite) + process worker + MLflow tracking server (SQLite, local
# artefacts), with the deployments of infra/prefect.yaml registered.
#   bash infra/stack.sh up      # start everything, print the URLs; then: source .stack/env
#   bash infra/stack.sh down    # stop everything started by `up` (pids in .stack/) and the flow runs it started
# Settings (environment): PREFECT_PORT (4200), MLFLOW_PORT (5000), STACK_DIR (.stack), UL_STORAGE_ROOT (.)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$PWD
BIN=${BIN:-$ROOT_DIR/.venv/bin}
[ -x "$BIN/prefect" ] || BIN=$(dirname "$(command -v prefect)")
STACK_DIR=${STACK_DIR:-$ROOT_DIR/.stack}
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
STORE=$(cd "${UL_STORAGE_ROOT:-.}" && pwd)
POOL=ul-local

export PREFECT_HOME=${PREFECT_HOME:-$STACK_DIR/prefect-home}
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false DVC_NO_ANALYTICS=1 DO_NOT_TRACK=true
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export PATH=$BIN:$PATH

STATE_DIR=$STACK_DIR
# shellcheck source=infra/lib.sh
source infra/lib.sh

up() {
  mkdir -p "$STACK_DIR" "$PREFECT_HOME" "$STORE/mlartifacts"
  if [ -f "$STACK_DIR/prefect-server.pid" ] && kill -0 "$(cat "$STACK_DIR/prefect-server.pid")" 2>/dev/null; then
    echo "the stack is already up (bash infra/stack.sh down first)"; exit 1
  fi
  start prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
  start mlflow-server mlflow server --backend-store-uri "sqlite:///$STORE/mlflow.db" \
    --artifacts-destination "$STORE/mlartifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" 90 prefect-server
  prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process >/dev/null
  MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT start prefect-worker prefect worker start --pool "$POOL"
  # The deployments on this pool only: the Kubernetes ones need their own pool, image and cluster (infra/README.md).
  local names
  names=$("$BIN/python" -c 'import sys, yaml
for d in yaml.safe_load(open(sys.argv[1]))["deployments"]:
    if d["work_pool"]["name"] == sys.argv[2]:
        print("--name", d["name"])' infra/prefect.yaml "$POOL")
  # shellcheck disable=SC2086  # $names is a list of `--name NAME` words
  prefect --no-prompt deploy $names --prefect-file infra/prefect.yaml >"$STACK_DIR/deploy.log" 2>&1 \
    || { echo "error: prefect deploy failed:" >&2; tail -n 30 "$STACK_DIR/deploy.log" >&2; exit 1; }
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 90 mlflow-server
  cat >"$STACK_DIR/env" <<ENV
export PREFECT_HOME=$PREFECT_HOME
export PREFECT_API_URL=$PREFECT_API_URL
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
ENV
  echo "Prefect UI/API : http://127.0.0.1:$PREFECT_PORT   (pool $POOL, worker log $STACK_DIR/prefect-worker.log)"
  echo "MLflow UI      : http://127.0.0.1:$MLFLOW_PORT   (backend sqlite:///$STORE/mlflow.db)"
  echo "deployments    : ul/full-pipeline, ul-retrain/scheduled-retrain (schedule inactive)"
  echo "run it         : source $STACK_DIR/env && prefect deployment run ul/full-pipeline --watch"
  echo "stop           : bash infra/stack.sh down"
}

flow_run_pids() {  # flow runs of this stack's worker and what they started (a local Ray and its workers): the
  # worker starts each in a session of its own, so stopping its group misses them; they carry this stack's API URL
  # and a flow run id in their environment
  local proc env
  for proc in /proc/[0-9]*; do
    [ "${proc#/proc/}" = "$$" ] && continue
    env=$(tr '\0' '\n' <"$proc/environ" 2>/dev/null) || continue
    grep -qx "PREFECT_API_URL=$PREFECT_API_URL" <<<"$env" && grep -q "^PREFECT__FLOW_RUN_ID=" <<<"$env" \
      && echo "${proc#/proc/}"
  done
  return 0
}

stop_flow_runs() {  # TERM what is still running (a run cut short by a timeout, a cancelled one), KILL after 10 s
  local pids
  pids=$(flow_run_pids)
  [ -n "$pids" ] || return 0
  echo "stopping flow-run processes still running: $(echo $pids)"
  # shellcheck disable=SC2086  # a list of pids
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do [ -n "$(flow_run_pids)" ] || return 0; sleep 0.5; done
  # shellcheck disable=SC2046
  kill -KILL $(flow_run_pids) 2>/dev/null || true
}

down() {
  stop prefect-worker INT   # SIGTERM leaves a Prefect worker running; SIGINT stops it
  stop_flow_runs
  stop mlflow-server TERM
  stop prefect-server TERM
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
