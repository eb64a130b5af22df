# Shell helpers shared by infra/stack.sh and infra/cluster.sh (sourced, not run). Each service runs in its own
# process group with its pid in $STATE_DIR/<name>.pid and its output in $STATE_DIR/<name>.log.

wait_http() {  # url seconds name: poll until the URL answers 2xx, or fail naming the log
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then echo "error: $3 did not answer $1 within $2 s (log: $STATE_DIR/$3.log)" >&2; return 1; fi
    sleep 0.5
  done
}

start() {  # name command...: run in a new session (own process group), so `stop` ends its children too
  local name=$1; shift
  setsid "$@" >"$STATE_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE_DIR/$name.pid"
}

running() {  # name: true while the recorded process lives
  [ -f "$STATE_DIR/$1.pid" ] && kill -0 "$(cat "$STATE_DIR/$1.pid")" 2>/dev/null
}

stop() {  # name signal: signal the process group, wait up to 20 s, then SIGKILL what is left
  local pidfile=$STATE_DIR/$1.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -"$2" -- -"$pid" 2>/dev/null || kill -"$2" "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- -"$pid" 2>/dev/null || true; fi
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$pidfile"
}

listening() {  # port: true when something listens on it (any address)
  ss -Htln "sport = :$1" 2>/dev/null | grep -q .
}

held() {  # port: true when a live TCP socket of this machine holds it: a listener or an open connection's local
  # end (a closing one left by a stopped server does not stop a new one binding it)
  ss -Htan state listening state established state syn-sent state syn-recv "sport = :$1" 2>/dev/null | grep -q .
}
