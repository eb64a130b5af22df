#!/usr/bin/env bash
# A real multi-node cluster on this one machine, every socket on 127.0.0.1:
#   - a Ray head (0 CPUs: it only schedules and serves the Jobs API) and two Ray worker nodes, each a separate
#     `ray start --block` process with its own temp dir and its own working directory;
#   - an S3 endpoint (moto server) holding raw data, shards, latents, checkpoints and MLflow artefacts;
#   - PostgreSQL (run as an unprivileged user, data under $CLUSTER_DIR/pg) behind an MLflow tracking server whose
#     artefacts go to S3.
#   bash infra/cluster.sh up        # start, then: source $CLUSTER_DIR/env
#   bash infra/cluster.sh status    # what runs, on which port
#   bash infra/cluster.sh down      # stop everything `up` started; fails if a port is still listening
#   bash infra/cluster.sh restart-ray  # replace the three Ray nodes by new ones; S3 and MLflow keep their data
# Settings (environment, defaults in brackets): CLUSTER_DIR [.cluster], RAY_PORT [6390], RAY_DASHBOARD_PORT [8265],
# RAY_CLIENT_PORT [10011], RAY_NODE_PORT_BASE [21000] (each node takes 100 ports from base + 100·i),
# RAY_WORKER_CPUS [1], RAY_OBJECT_STORE_BYTES [268435456], S3_PORT [9100], PG_PORT [5433], MLFLOW_PORT [5100],
# S3_BUCKET [ul-cluster], PG_USER [ulpg: the account PostgreSQL runs as when this script runs as root].
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$PWD
BIN=${BIN:-$ROOT_DIR/.venv/bin}
[ -x "$BIN/ray" ] || BIN=$(dirname "$(command -v ray)")
CLUSTER_DIR=${CLUSTER_DIR:-$ROOT_DIR/.cluster}
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR=$(cd "$CLUSTER_DIR" && pwd)
RAY_PORT=${RAY_PORT:-6390}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10011}
RAY_NODE_PORT_BASE=${RAY_NODE_PORT_BASE:-21000}
RAY_WORKER_CPUS=${RAY_WORKER_CPUS:-1}
RAY_OBJECT_STORE_BYTES=${RAY_OBJECT_STORE_BYTES:-268435456}
S3_PORT=${S3_PORT:-9100}
PG_PORT=${PG_PORT:-5433}
MLFLOW_PORT=${MLFLOW_PORT:-5100}
S3_BUCKET=${S3_BUCKET:-ul-cluster}
PG_USER=${PG_USER:-ulpg}
NODES=(head worker1 worker2)

# Dummy credentials for the local S3 endpoint only (moto accepts any); never real keys.
export AWS_ACCESS_KEY_ID=ul-cluster-local AWS_SECRET_ACCESS_KEY=ul-cluster-local AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false DO_NOT_TRACK=true
# Worker nodes may join (the local runs' RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 forbids it); infra/ray_node.py keeps
# every node's sockets on 127.0.0.1 all the same.
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_USAGE_STATS_ENABLED=0
# Every process of every node asks the state API of this cluster, never "the" Ray instance of the machine (several
# run here; a real cluster has one per machine), and no node watches for spot preemption (a loopback cluster has none).
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0
export PATH=$BIN:$PATH

STATE_DIR=$CLUSTER_DIR
# shellcheck source=infra/lib.sh
source infra/lib.sh

pg_bin() {  # the newest installed PostgreSQL's bin folder (Debian keeps it off PATH); installs postgresql if absent
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$bin" ]; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  echo "$bin"
}

AS_PG=()  # prefix that runs a command as the PostgreSQL account (PostgreSQL refuses to run as root)
[ "$(id -u)" -eq 0 ] && AS_PG=(runuser -u "$PG_USER" --)

ray_node() {  # name index [extra ray start args...]: one `ray start --block` in its own folder and temp dir
  local name=$1 index=$2; shift 2
  local base=$((RAY_NODE_PORT_BASE + 100 * index))
  mkdir -p "$CLUSTER_DIR/$name/work" "$CLUSTER_DIR/$name/tmp"
  (cd "$CLUSTER_DIR/$name/work" && start "ray-$name" "$BIN/python" "$ROOT_DIR/infra/ray_node.py" start --block \
    --node-ip-address=127.0.0.1 \
    --temp-dir="$CLUSTER_DIR/$name/tmp" --object-store-memory="$RAY_OBJECT_STORE_BYTES" \
    --node-manager-port=$base --object-manager-port=$((base + 1)) --dashboard-agent-listen-port=$((base + 2)) \
    --dashboard-agent-grpc-port=$((base + 3)) --runtime-env-agent-port=$((base + 4)) \
    --metrics-export-port=$((base + 5)) --min-worker-port=$((base + 10)) --max-worker-port=$((base + 99)) \
    --disable-usage-stats "$@")
}

alive_nodes() {  # how many nodes the head reports alive (0 while it does not answer)
  curl -fsS -m 10 "http://127.0.0.1:$RAY_DASHBOARD_PORT/nodes?view=summary" 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(n["raylet"]["state"] == "ALIVE" for n in json.load(sys.stdin)["data"]["summary"]))' \
    2>/dev/null || echo 0
}

node_ports_free() {  # name index: fail naming the first of the node's fixed ports something already holds. A
  # raylet whose port is taken (even by an outgoing connection's local end) dies at start and `ray start` only says
  # "timed out during startup", so the ports are checked before anything starts.
  local name=$1 base=$((RAY_NODE_PORT_BASE + 100 * $2)) i
  local roles=(node-manager object-manager dashboard-agent-listen dashboard-agent-grpc runtime-env-agent metrics-export)
  for i in "${!roles[@]}"; do
    if held $((base + i)); then
      echo "error: port $((base + i)) ($name's ${roles[$i]} port, RAY_NODE_PORT_BASE + $((100 * $2 + i))) is in use:" \
        "set RAY_NODE_PORT_BASE to a free block of 300 ports below the ephemeral range" \
        "($(tr '\t' '-' </proc/sys/net/ipv4/ip_local_port_range))" >&2
      return 1
    fi
  done
}

raylet_fatal() {  # name: the first fatal line of the node's last raylet log, if it wrote one
  grep -h -m 1 -o 'Check failed.*' "$CLUSTER_DIR/$1/tmp/session_latest/logs/raylet.out" 2>/dev/null | cut -c 1-300
}

start_node() {  # name index count args...: start a node and wait until `count` nodes are alive. A raylet exits
  # when its dashboard agent has not come up within ~15 s, which a loaded 2-core machine can exceed: one retry.
  local name=$1 index=$2 count=$3 attempt deadline fatal; shift 3
  for attempt in 1 2; do
    ray_node "$name" "$index" "$@"
    deadline=$((SECONDS + 120))
    while running "ray-$name" && [ "$(alive_nodes)" -lt "$count" ] && [ $SECONDS -lt $deadline ]; do sleep 1; done
    if [ "$(alive_nodes)" -ge "$count" ]; then return 0; fi
    stop "ray-$name" TERM >/dev/null
    fatal=$(raylet_fatal "$name")
    [ -n "$fatal" ] && fatal="; raylet: $fatal"
    echo "Ray node $name did not come up (attempt $attempt; log: $CLUSTER_DIR/ray-$name.log)$fatal" >&2
  done
  echo "error: Ray node $name failed to start twice (log: $CLUSTER_DIR/ray-$name.log)" >&2
  return 1
}

ray_ports_free() {  # every node's fixed ports, before anything starts
  node_ports_free head 0 && node_ports_free worker1 1 && node_ports_free worker2 2
}

ray_up() {  # the head, then the two worker nodes
  start_node head 0 1 --head --port="$RAY_PORT" --num-cpus=0 --dashboard-host=127.0.0.1 \
    --dashboard-port="$RAY_DASHBOARD_PORT" --ray-client-server-port="$RAY_CLIENT_PORT"
  start_node worker1 1 2 --address="127.0.0.1:$RAY_PORT" --num-cpus="$RAY_WORKER_CPUS"
  start_node worker2 2 3 --address="127.0.0.1:$RAY_PORT" --num-cpus="$RAY_WORKER_CPUS"
}

node_strays() {  # pids of processes working in a node's folder: Ray job drivers run in sessions of their own, so
  # stopping a node's process group leaves them (a "lost" cluster whose drivers go on writing checkpoints)
  local proc
  for proc in /proc/[0-9]*; do
    case "$(readlink "$proc/cwd" 2>/dev/null)" in
      "$CLUSTER_DIR"/head/*|"$CLUSTER_DIR"/worker1/*|"$CLUSTER_DIR"/worker2/*) echo "${proc#/proc/}" ;;
    esac
  done
}

ray_down() {
  local name pids
  for name in ray-worker2 ray-worker1 ray-head; do stop "$name" TERM; done
  pids=$(node_strays)
  [ -z "$pids" ] && return 0
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do [ -z "$(node_strays)" ] && return 0; sleep 0.5; done
  pids=$(node_strays)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  return 0
}

restart_ray() {  # a new Ray cluster (new session, nothing of the old one's state) on the same S3 and MLflow server
  if ! running s3 || ! running mlflow-server; then echo "error: the cluster is not up (bash $0 up)" >&2; exit 1; fi
  ray_down
  ray_ports_free || exit 1
  ray_up
  status
}

up() {
  if running ray-head; then echo "the cluster is already up (bash infra/cluster.sh down first)" >&2; exit 1; fi
  local port
  for port in "$RAY_PORT" "$RAY_DASHBOARD_PORT" "$RAY_CLIENT_PORT" "$S3_PORT" "$PG_PORT" "$MLFLOW_PORT"; do
    if held "$port"; then echo "error: port $port is in use; set another (see the header of $0)" >&2; exit 1; fi
  done
  ray_ports_free || exit 1

  start s3 moto_server -H 127.0.0.1 -p "$S3_PORT"

  local pgbin secret
  pgbin=$(pg_bin)
  if [ "$(id -u)" -eq 0 ] && ! id "$PG_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
  fi
  if ! "${AS_PG[@]}" test -x "$CLUSTER_DIR"; then
    echo "error: $PG_USER (the PostgreSQL account) cannot enter $CLUSTER_DIR: make it and its parents traversable (chmod o+x) or set CLUSTER_DIR" >&2
    exit 1
  fi
  mkdir -p "$CLUSTER_DIR/pg-sock"
  if [ ! -s "$CLUSTER_DIR/pg-secret" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$CLUSTER_DIR/pg-secret")
  fi
  secret=$(cat "$CLUSTER_DIR/pg-secret")
  [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$CLUSTER_DIR/pg-sock" "$CLUSTER_DIR/pg-secret"
  if [ ! -f "$CLUSTER_DIR/pg/PG_VERSION" ]; then
    mkdir -p "$CLUSTER_DIR/pg"
    [ "$(id -u)" -eq 0 ] && chown "$PG_USER" "$CLUSTER_DIR/pg"
    "${AS_PG[@]}" "$pgbin/initdb" -D "$CLUSTER_DIR/pg" -U ul --auth-local=trust --auth-host=scram-sha-256 \
      --pwfile="$CLUSTER_DIR/pg-secret" >"$CLUSTER_DIR/pg-init.log" 2>&1 \
      || { echo "error: initdb failed (log: $CLUSTER_DIR/pg-init.log)" >&2; exit 1; }
  fi
  start postgres "${AS_PG[@]}" "$pgbin/postgres" -D "$CLUSTER_DIR/pg" -p "$PG_PORT" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories="$CLUSTER_DIR/pg-sock"
  local deadline=$((SECONDS + 60))
  until "${AS_PG[@]}" "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; do
    if [ $SECONDS -ge $deadline ]; then echo "error: PostgreSQL not ready (log: $CLUSTER_DIR/postgres.log)" >&2; exit 1; fi
    sleep 0.5
  done
  "${AS_PG[@]}" "$pgbin/psql" -q -h "$CLUSTER_DIR/pg-sock" -p "$PG_PORT" -U ul -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
    || "${AS_PG[@]}" "$pgbin/createdb" -h "$CLUSTER_DIR/pg-sock" -p "$PG_PORT" -U ul mlflow

  wait_http "http://127.0.0.1:$S3_PORT/" 60 s3
  "$BIN/python" - "$S3_BUCKET" <<'PY'
import sys, boto3
s3 = boto3.client("s3")
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[1])
PY

  # The backend URI (it holds the database password) reaches MLflow through its environment, not its argv.
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://ul:$secret@127.0.0.1:$PG_PORT/mlflow" \
    start mlflow-server mlflow server --artifacts-destination "s3://$S3_BUCKET/mlflow" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1

  ray_up
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 120 mlflow-server

  (umask 077 && cat >"$CLUSTER_DIR/env" <<ENV
# made by infra/cluster.sh up; the credentials are dummies accepted by the local S3 endpoint only
export RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
# Training workers sized to the worker nodes: one per node (ray.num_workers = the number of worker nodes).
export UL_CLUSTER_ARGS="--set storage.root=s3://$S3_BUCKET/pipeline --set storage.s3_endpoint=http://127.0.0.1:$S3_PORT --set ray.address=http://127.0.0.1:$RAY_DASHBOARD_PORT --set tracking.uri=http://127.0.0.1:$MLFLOW_PORT --set ray.num_workers=2 --set ray.cpus_per_worker=$RAY_WORKER_CPUS"
ENV
  )
  status
  echo "use it   : source $CLUSTER_DIR/env && python -m flows.pipeline \$UL_CLUSTER_ARGS"
  echo "stop     : bash infra/cluster.sh down"
}

status() {
  local name
  for name in s3 postgres mlflow-server "${NODES[@]/#/ray-}"; do
    if running "$name"; then state="up (pid $(cat "$CLUSTER_DIR/$name.pid"))"; else state=down; fi
    printf '%-14s %s\n' "$name" "$state"
  done
  echo "Ray jobs : http://127.0.0.1:$RAY_DASHBOARD_PORT (dashboard and Jobs API), GCS 127.0.0.1:$RAY_PORT"
  echo "S3       : http://127.0.0.1:$S3_PORT (bucket $S3_BUCKET)"
  echo "MLflow   : http://127.0.0.1:$MLFLOW_PORT (PostgreSQL 127.0.0.1:$PG_PORT, artefacts s3://$S3_BUCKET/mlflow)"
}

down() {
  local port left=()
  ray_down
  stop mlflow-server TERM
  stop postgres INT   # SIGINT: PostgreSQL's fast shutdown
  stop s3 TERM
  for port in "$RAY_PORT" "$RAY_DASHBOARD_PORT" "$RAY_CLIENT_PORT" "$S3_PORT" "$PG_PORT" "$MLFLOW_PORT"; do
    listening "$port" && left+=("$port")
  done
  if [ ${#left[@]} -gt 0 ]; then echo "error: still listening after down: ports ${left[*]}" >&2; return 1; fi
  return 0
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  restart-ray) restart_ray ;;
  *) echo "usage: $0 up|status|down|restart-ray" >&2; exit 2 ;;
esac
