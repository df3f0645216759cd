#!/usr/bin/env bash
# API endpoints over HTTPS beside the raw surface over HTTP, the same function, one run:
# a Dispatch-envelope function `fast` (an nginx answering a fixed envelope) called
#   1. raw:        POST http://GW/function/fast        (the OpenFaaS surface)
#   2. api-http:   POST http://GW-API/fast              (an API endpoint, plain HTTP)
#   3. api-https:  POST https://GW-API/fast             (the same API over TLS 1.3)
#   4. run:        POST http://GW/v1/runs?functionName=fast, blocking (the Dispatch API:
#      the same run as an API call makes, without the ingress in front)
#   5. nginx-https: POST https://NGINX/fast, nginx terminating TLS with the same
#      certificate and proxy_pass (keep-alive) to the same upstream: the reference.
# The gateway (or the reference nginx) is pinned to CPU 0, wrk (-t1 -cCONNS, keep-alive)
# and the upstream to CPU 1. Rows: requests/s, p50/p99 latency and the proxy's CPU time
# per call (utime + stime from /proc over the run, divided by the calls), which stays
# comparable when other work shares the machine. API calls are Dispatch runs (envelope
# parsed, output returned, run record written); raw calls are proxied as they are.
#
# Env: DISPATCH_BIN (default: cargo build --release), DURATION=5, CONNS=64.
# Needs nginx and wrk (installed with apt-get when missing; wrk speaks TLS through OpenSSL).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DURATION=${DURATION:-5}
CONNS=${CONNS:-64}
DISPATCH_BIN=${DISPATCH_BIN:-}
NAME=apis
# shellcheck source=loadtest/async_common.sh
source "$SCRIPT_DIR/async_common.sh"

UPSTREAM_BODY="'{\"context\":{\"logs\":{\"stdout\":[],\"stderr\":[]},\"error\":null},\"payload\":{\"done\":true}}'"
start_fast_upstream taskset -c 1

GW=$(port); API_HTTP=$(port); API_HTTPS=$(port); NGX=$(port)
RUST_LOG=warn taskset -c 0 "$DISPATCH_BIN" serve --listen "127.0.0.1:$GW" --data-dir "$TMP/data" \
  --api-http "127.0.0.1:$API_HTTP" --api-https "127.0.0.1:$API_HTTPS" >"$TMP/gw.out" 2>"$TMP/gw.log" & GPID=$!
PIDS+=($GPID)
for _ in $(seq 100); do curl -sf "127.0.0.1:$GW/healthz" >/dev/null && break; sleep 0.1; done
control() {
  curl -sf -o /dev/null -X POST "127.0.0.1:$GW$1" -H "Authorization: Bearer $DISPATCH_AUTH_TOKEN" \
    -H 'content-type: application/json' -d "$2" || die "POST $1 failed: $(tail -5 "$TMP/gw.log")"
}
control /v1/function '{"name":"fast","upstream":{"driver":"static","endpoints":["http://127.0.0.1:'$UP'"],"protocol":"dispatch"}}'
control /v1/api '{"name":"fast","function":"fast","methods":["POST"],"uris":["/fast"]}'
CERT="$TMP/data/tls/api.crt"
curl -sf --cacert "$CERT" -X POST "https://localhost:$API_HTTPS/fast" -H 'content-type: application/json' -d '{}' \
  | grep -q '"done":true' || die "the API does not answer over HTTPS"

# The reference: nginx terminating TLS (TLS 1.3, the same certificate) in front of the upstream.
mkdir -p "$TMP/ngx"
cat >"$TMP/ngx/nginx.conf" <<C
daemon off; worker_processes 1; pid $TMP/ngx/pid; error_log $TMP/ngx/err warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $TMP/ngx; proxy_temp_path $TMP/ngx; fastcgi_temp_path $TMP/ngx;
       uwsgi_temp_path $TMP/ngx; scgi_temp_path $TMP/ngx;
       upstream fn { server 127.0.0.1:$UP; keepalive 64; }
       server { listen 127.0.0.1:$NGX ssl; ssl_certificate $CERT; ssl_certificate_key $TMP/data/tls/api.key;
                ssl_protocols TLSv1.2 TLSv1.3;
                location / { proxy_pass http://fn; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
C
taskset -c 0 "$NGINX" -p "$TMP/ngx" -e "$TMP/ngx/err" -c "$TMP/ngx/nginx.conf" & NPID=$!
PIDS+=($NPID)
for _ in $(seq 50); do curl -skf -o /dev/null -X POST "https://127.0.0.1:$NGX/fast" && break; sleep 0.1; done

cat >"$TMP/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"name": "Jon", "place": "Winterfell"}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.0f %.2f %.2f %d\n", summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
sed -e "s/^wrk.body = .*/wrk.body = '{\"blocking\": true, \"input\": {\"name\": \"Jon\"}}'/" \
  -e "s/^wrk.method = .*/&\nwrk.headers[\"Authorization\"] = \"Bearer $DISPATCH_AUTH_TOKEN\"/" \
  "$TMP/post.lua" >"$TMP/run.lua"
tck=$(getconf CLK_TCK)
cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# nginx's worker is the master's child.
NWORKER=$(pgrep -P "$NPID" | head -1)

echo "| path | requests/s | p50 ms | p99 ms | proxy CPU per call | errors |"
echo "|---|---|---|---|---|---|"
row() {
  local label=$1 url=$2 pid=$3 script=${4:-$TMP/post.lua}
  taskset -c 1 wrk -t1 -c"$CONNS" -d2s -s "$script" "$url" >/dev/null
  local c0 c1 out
  c0=$(cpu_of "$pid")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$script" "$url" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}')
  c1=$(cpu_of "$pid")
  read -r n rps p50 p99 errors <<<"$out"
  echo "| $label | $rps | $p50 | $p99 | $(awk -v a="$c0" -v b="$c1" -v n="$n" -v t="$tck" 'BEGIN {printf "%.1f us", (b - a) / t * 1e6 / n}') | $errors |"
}
row "raw surface, HTTP (/function/fast)" "http://127.0.0.1:$GW/function/fast" "$GPID"
row "API endpoint, HTTP (/fast)" "http://127.0.0.1:$API_HTTP/fast" "$GPID"
row "API endpoint, HTTPS (/fast)" "https://127.0.0.1:$API_HTTPS/fast" "$GPID"
row "Dispatch run, HTTP (POST /v1/runs, blocking)" "http://127.0.0.1:$GW/v1/runs?functionName=fast" "$GPID" "$TMP/run.lua"
row "nginx 1.22, HTTPS + proxy_pass (reference)" "https://127.0.0.1:$NGX/fast" "$NWORKER"
