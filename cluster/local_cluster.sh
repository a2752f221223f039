#!/usr/bin/env bash
# Local single-node Ray cluster with token authentication, dashboard bound to 127.0.0.1.
#
#   cluster/local_cluster.sh start    # start (idempotent); prints the token file and client env
#   cluster/local_cluster.sh env      # print `export ...` lines for clients:  eval "$(cluster/local_cluster.sh env)"
#   cluster/local_cluster.sh status   # is it running? (+ `ray status` through the token)
#   cluster/local_cluster.sh stop     # stop THIS cluster only (never `ray stop`)
#   cluster/local_cluster.sh purge    # stop and delete the state dir (token included)
#
# Settings (environment):
#   KOA_RAY_DIR            state dir: token, logs, pid, Ray --temp-dir   (default /tmp/koa-ray-local;
#                          keep it short: Ray's unix socket paths live below it, limit ~107 bytes)
#   KOA_RAY_PORT           GCS port                    (default 6379)
#   KOA_RAY_DASHBOARD_PORT dashboard / Jobs API port   (default 8265)
#   KOA_RAY_CLIENT_PORT    Ray Client server port      (default 10001)
#   KOA_RAY_NUM_CPUS / KOA_RAY_NUM_GPUS   resources to advertise (default: autodetect)
#   RAY                    ray CLI                     (default: <repo>/.venv/bin/ray, else `ray` on PATH)
#
# How it works: `ray start --head --block` runs in its own session (process group), its PID is
# saved, and `stop` sends SIGTERM to that process, whose handler shuts down this node's Ray
# processes (GCS, raylet, dashboard, workers); leftovers in the group get SIGKILL. `ray stop`
# is NOT used because on Ray 2.60 it kills every Ray process on the machine (all clusters,
# including ray.init() instances of other programs/tests).
#
# Note on addresses: Ray replaces --node-ip-address 127.0.0.1 with the host's routable IP
# for GCS/raylet, and the GCS, raylet and object manager listen on all interfaces; only the
# dashboard honours --dashboard-host 127.0.0.1. Token auth is what protects those ports --
# keep a host firewall in front of them on shared machines.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
DIR="${KOA_RAY_DIR:-/tmp/koa-ray-local}"
PORT="${KOA_RAY_PORT:-6379}"
DASH_PORT="${KOA_RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${KOA_RAY_CLIENT_PORT:-10001}"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
[[ -n "$RAY" && -x "$RAY" ]] || { echo "ray CLI not found (set RAY=/path/to/ray)" >&2; exit 2; }
PY="$(dirname "$RAY")/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

TOKEN_FILE="$DIR/auth_token"
PID_FILE="$DIR/ray.pid"
LOG_FILE="$DIR/ray.log"
TMP_DIR="$DIR/tmp"
URL="http://127.0.0.1:$DASH_PORT"

is_running() {
  [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

# HTTP status of GET $URL$1 (000 when nothing listens); sends the token when $2 == auth.
http_status() {
  "$PY" - "$URL$1" "${2:-}" "$TOKEN_FILE" <<'PYEOF'
import sys, urllib.request, urllib.error
url, auth, token_file = sys.argv[1:4]
req = urllib.request.Request(url)
if auth == "auth":
    req.add_header("Authorization", "Bearer " + open(token_file).read().strip())
try:
    print(urllib.request.urlopen(req, timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PYEOF
}

print_env() {
  cat <<EOF
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
export RAY_API_SERVER_ADDRESS=$URL
EOF
}

cmd_start() {
  if is_running; then
    echo "already running (pid $(cat "$PID_FILE")), dashboard $URL"
    echo "token file: $TOKEN_FILE"
    return 0
  fi
  umask 077
  mkdir -p "$DIR" "$TMP_DIR"
  chmod 700 "$DIR"
  if [[ ! -s "$TOKEN_FILE" ]]; then
    # Same generator as `ray get-auth-token --generate` (which always writes ~/.ray/auth_token).
    "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$TOKEN_FILE"
  fi
  chmod 600 "$TOKEN_FILE"

  local extra=()
  [[ -n "${KOA_RAY_NUM_CPUS:-}" ]] && extra+=(--num-cpus "$KOA_RAY_NUM_CPUS")
  [[ -n "${KOA_RAY_NUM_GPUS:-}" ]] && extra+=(--num-gpus "$KOA_RAY_NUM_GPUS")

  # setsid via Python (portable): own session/process group, then exec `ray start --block`.
  # RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner (and any State API call inside the cluster) asks
  # this dashboard, not whichever Ray instance it would auto-detect when the machine hosts more than one.
  # PATH: job entrypoints say `python ...`; make that the interpreter next to this ray CLI (the one with koa-ray's
  # dependencies), even when the caller did not activate the venv.
  env -u RAY_ADDRESS -u RAY_AUTH_TOKEN \
    PATH="$(dirname "$RAY"):$PATH" \
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" RAY_API_SERVER_ADDRESS="$URL" \
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_USAGE_STATS_ENABLED=0 \
    "$PY" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \
    "$RAY" start --head --block \
      --node-ip-address 127.0.0.1 \
      --port "$PORT" \
      --ray-client-server-port "$CLIENT_PORT" \
      --include-dashboard true \
      --dashboard-host 127.0.0.1 \
      --dashboard-port "$DASH_PORT" \
      --temp-dir "$TMP_DIR" \
      --disable-usage-stats \
      ${extra[@]+"${extra[@]}"} \
      >"$LOG_FILE" 2>&1 </dev/null &
  echo $! > "$PID_FILE"

  local i
  for i in $(seq 1 240); do
    if ! is_running; then
      echo "ray start exited; last log lines:" >&2; tail -n 30 "$LOG_FILE" >&2; rm -f "$PID_FILE"; exit 1
    fi
    # ray_current_cluster is written once `ray start` has finished starting the node.
    [[ -s "$TMP_DIR/ray_current_cluster" && "$(http_status /api/jobs/ auth)" == 200 ]] && break
    sleep 0.5
  done
  if [[ ! -s "$TMP_DIR/ray_current_cluster" || "$(http_status /api/jobs/ auth)" != 200 ]]; then
    echo "dashboard did not come up at $URL; see $LOG_FILE" >&2; exit 1
  fi
  cat <<EOF
Ray $("$RAY" --version 2>/dev/null | awk '{print $NF}') running (pid $(cat "$PID_FILE")) with token authentication.
  dashboard / Jobs API : $URL   (bound to 127.0.0.1; unauthenticated requests get HTTP 401)
  token file           : $TOKEN_FILE
  logs                 : $LOG_FILE , $TMP_DIR/session_latest/logs
Client environment (eval "\$($0 env)"):
$(print_env | sed 's/^/  /')
Submit a job:
  ray job submit --address $URL --working-dir . -- python jobs/train.py --data ... --storage-path $DIR/ray_results --name run1 --workers 2
Stop:
  $0 stop
EOF
}

cmd_stop() {
  if [[ ! -f "$PID_FILE" ]]; then
    echo "not running (no $PID_FILE)"; return 0
  fi
  local pid; pid="$(cat "$PID_FILE")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  # Anything left in this cluster's process group (pgid == pid, thanks to setsid).
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
  echo "stopped (pid $pid); token kept in $TOKEN_FILE"
}

cmd_status() {
  if is_running; then
    echo "running (pid $(cat "$PID_FILE")), dashboard $URL (HTTP $(http_status /api/jobs/ auth) with token, $(http_status /api/jobs/) without)"
    [[ -s "$TMP_DIR/ray_current_cluster" ]] && \
      RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" "$RAY" status --address "$(cat "$TMP_DIR/ray_current_cluster")" || true
  else
    echo "not running"; return 1
  fi
}

case "${1:-}" in
  start)  cmd_start ;;
  stop)   cmd_stop ;;
  status) cmd_status ;;
  env)    print_env ;;
  purge)  cmd_stop; rm -rf "$DIR"; echo "removed $DIR" ;;
  *) echo "usage: $0 {start|stop|status|env|purge}" >&2; exit 2 ;;
esac
