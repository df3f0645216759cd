#!/usr/bin/env bash
# Async runs on the embedded queue, measured: how many runs per second the gateway accepts
# (POST /async-function/{name}, each 202 after its run is written to the store), and how
# many per second it then completes through a fast function (an nginx answering 200).
#
# Env: DISPATCH_BIN=path (skip `cargo build`), DURATION=10, CONNECTIONS=16,
#      DISPATCH_STORE_URL=postgres://... to measure on PostgreSQL (the gateway inherits it).
# Needs nginx and wrk (apt-get install nginx-light wrk, as loadtest/run.sh does).
# Writes a markdown report on stdout and in loadtest/results/async.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
DISPATCH_BIN=${DISPATCH_BIN:-}

log() { printf '[async] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx not found (apt-get install nginx-light)"
command -v wrk >/dev/null || die "wrk not found (apt-get install wrk)"
if [[ -z $DISPATCH_BIN ]]; then
  (cd "$REPO_ROOT" && cargo build --release --bin dispatch) >&2 || die "build failed"
  DISPATCH_BIN="$REPO_ROOT/target/release/dispatch"
fi

TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

UP=$(port)
mkdir -p "$TMP/up"
cat >"$TMP/up/nginx.conf" <<C
daemon off; worker_processes 1; pid $TMP/up/pid; error_log $TMP/up/err warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $TMP/up; proxy_temp_path $TMP/up; fastcgi_temp_path $TMP/up;
       uwsgi_temp_path $TMP/up; scgi_temp_path $TMP/up;
       server { listen 127.0.0.1:$UP; location / { return 200 "done\n"; } } }
C
"$NGINX" -p "$TMP/up" -e "$TMP/up/err" -c "$TMP/up/nginx.conf" & PIDS+=($!)

GW=$(port)
BASE="http://127.0.0.1:$GW"
# The control API's token (a token of our own: nothing is written into ~/.dispatch).
export DISPATCH_AUTH_TOKEN="loadtest-$RANDOM$RANDOM$RANDOM"
RUST_LOG=warn "$DISPATCH_BIN" serve --listen "127.0.0.1:$GW" --data-dir "$TMP/data" >"$TMP/gw.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -sf "$BASE/healthz" >/dev/null && break; sleep 0.1; done
curl -sf -o /dev/null -X POST "$BASE/v1/function" -H 'content-type: application/json' \
  -H "Authorization: Bearer $DISPATCH_AUTH_TOKEN" \
  -d "{\"name\":\"fast\",\"upstream\":{\"driver\":\"static\",\"endpoints\":[\"http://127.0.0.1:$UP\"],\"protocol\":\"raw\"}}" \
  || die "registering the function failed: $(tail -5 "$TMP/gw.log")"

cat >"$TMP/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"n": 1}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.0f %d %d %d\n", summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read))
end
LUA
finished() { curl -sf "$BASE/metrics" | awk '/^dispatch_queue_finished_total/ {s += $2} END {print s + 0}'; }

T0=$(date +%s.%N)
read -r REQ RPS P50 P99 ERR <<<"$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$TMP/post.lua" "$BASE/async-function/fast" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}')"
log "accepted $REQ runs ($RPS/s, $ERR errors); waiting for them to finish"
while (( $(finished) < REQ )); do sleep 0.2; done
T1=$(date +%s.%N)
DONE=$(finished)
COMPLETE_RPS=$(awk -v n="$DONE" -v a="$T0" -v b="$T1" 'BEGIN { printf "%.0f", n / (b - a) }')
ERRORS=$(curl -sf "$BASE/metrics" | awk '/^dispatch_queue_finished_total\{status="ERROR"\}/ {print $2}')

OUT="$SCRIPT_DIR/results/async.md"
mkdir -p "$SCRIPT_DIR/results"
{
  echo "# Async runs (embedded queue)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc $(nproc), store: ${DISPATCH_STORE_URL:-SQLite (default)}"
  echo "- command: \`DURATION=$DURATION CONNECTIONS=$CONNECTIONS loadtest/async.sh\`"
  echo
  echo "| measure | value |"
  echo "| --- | ---: |"
  echo "| runs accepted (202 after the write), $CONNECTIONS connections, ${DURATION}s | $REQ ($RPS/s, p50 $P50 us, p99 $P99 us, $ERR errors) |"
  echo "| runs completed, from the first submit to the last finish | $DONE at $COMPLETE_RPS/s (${ERRORS:-0} ERROR) |"
} | tee "$OUT"
