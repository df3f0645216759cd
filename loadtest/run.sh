#!/usr/bin/env bash
# Whole-system load test: direct upstream vs nginx proxy_pass vs the dispatch gateway.
#
# Pinning (identical for every target):
#   CPU 0: the proxy under test (nginx master+worker, or the gateway, all threads)
#   CPU 1: wrk and the upstream (a second nginx answering "hello, world\n")
#
# Env: TARGETS="direct nginx gateway"  DURATION=20  CONNECTIONS=64  THREADS=1  WARMUP=3
#      DISPATCH_BIN=path (skip `cargo build`, use this binary)  BUILD_TIMEOUT=1800
# Output: markdown table on stdout and in loadtest/results/latest.md
# See loadtest/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
RESULTS_DIR="$SCRIPT_DIR/results"
RESULTS_FILE="$RESULTS_DIR/latest.md"

TARGETS=${TARGETS:-"direct nginx gateway"}
DURATION=${DURATION:-20}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-3}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1800}
DISPATCH_BIN=${DISPATCH_BIN:-}

PROXY_CPU=0
LOAD_CPU=1

log() { printf '[loadtest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_pos() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_pos "$DURATION" || die "DURATION must be a positive integer (seconds)"
is_pos "$CONNECTIONS" || die "CONNECTIONS must be a positive integer"
is_pos "$THREADS" || die "THREADS must be a positive integer"
is_uint "$WARMUP" || die "WARMUP must be a non-negative integer (seconds)"
is_uint "$BUILD_TIMEOUT" || die "BUILD_TIMEOUT must be an integer (seconds)"
((CONNECTIONS >= THREADS)) || die "CONNECTIONS must be >= THREADS"
[[ -n ${TARGETS// /} ]] || die "TARGETS is empty"
for t in $TARGETS; do
  case $t in direct | nginx | gateway) ;; *) die "unknown target '$t' (known: direct nginx gateway)" ;; esac
done

# ---------------------------------------------------------------- dependencies
ensure_deps() {
  local missing=()
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
  command -v timeout >/dev/null 2>&1 || missing+=(coreutils)
  if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root or install them first"
    log "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
      # nginx-light does not exist everywhere; fall back to the full package.
      missing=("${missing[@]/#nginx-light/nginx}")
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  [[ -x $NGINX ]] || die "nginx not found after install"
  # -e (startup error log, nginx >= 1.19.5) keeps nginx away from the system log file
  NGINX_E=()
  if "$NGINX" -h 2>&1 | grep -qE '^ *-e '; then NGINX_E=(-e); fi
  local ncpu
  ncpu=$(nproc)
  ((ncpu >= 2)) || die "need at least 2 CPUs for the pinning (have $ncpu)"
  taskset -c "$PROXY_CPU,$LOAD_CPU" true 2>/dev/null || die "cannot pin to CPUs $PROXY_CPU and $LOAD_CPU"
}

# ---------------------------------------------------------------- processes / cleanup
TMP=""
PIDS=() # everything we start, killed on exit

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [[ -n $TMP && -d $TMP ]] && rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

forget_pid() {
  local gone=$1 p keep=()
  for p in "${PIDS[@]}"; do [[ $p == "$gone" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

stop_pid() { # graceful stop of one process we started
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

# ---------------------------------------------------------------- ports
PICKED_PORTS=" "
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # VAR: sets VAR to a free local port (no subshell, so picks are remembered)
  local p
  for ((p = 18080; p < 19000; p++)); do
    [[ $PICKED_PORTS == *" $p "* ]] && continue
    if ! port_busy "$p"; then
      PICKED_PORTS+="$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port in 18080-18999"
}

wait_http_200() { # url timeout_s
  local url=$1 deadline=$((SECONDS + $2)) code
  while ((SECONDS < deadline)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    [[ $code == 200 ]] && return 0
    sleep 0.1
  done
  return 1
}

check_body() { # url  -> must answer 200 "hello, world\n"
  local body
  body=$(curl -sf --max-time 5 "$1") || die "GET $1 failed"
  [[ $body == "hello, world" ]] || die "GET $1 returned unexpected body: $(printf %q "$body")"
}

# ---------------------------------------------------------------- CPU accounting
CLK_TCK=$(getconf CLK_TCK)

# utime+stime (clock ticks) of a pid plus its direct children (nginx master + workers).
# /proc/PID/stat already covers all threads of a process.
proc_ticks() {
  local root=$1 total=0 f line rest pid
  local -a fld
  for f in /proc/[0-9]*/stat; do
    { line=$(<"$f"); } 2>/dev/null || continue # process may have exited
    rest=${line##*) } # fields from 3 (state) on; comm may contain spaces
    read -r -a fld <<<"$rest"
    pid=${f#/proc/}
    pid=${pid%/stat}
    # fld[1]=ppid (field 4), fld[11]=utime (14), fld[12]=stime (15)
    if [[ $pid == "$root" || ${fld[1]} == "$root" ]]; then
      total=$((total + fld[11] + fld[12]))
    fi
  done
  echo "$total"
}

# "busy total" jiffies of one CPU from /proc/stat
cpu_jiffies() {
  local cpu=$1 name user nice sys idle iowait irq softirq steal rest
  while read -r name user nice sys idle iowait irq softirq steal rest; do
    if [[ $name == "cpu$cpu" ]]; then
      echo "$((user + nice + sys + irq + softirq + steal)) $((user + nice + sys + idle + iowait + irq + softirq + steal))"
      return 0
    fi
  done </proc/stat
  die "cpu$cpu not in /proc/stat"
}

# ---------------------------------------------------------------- nginx instances
nginx_temp_paths() {
  local d=$1
  cat <<EOF
    client_body_temp_path $d/client_body;
    proxy_temp_path       $d/proxy;
    fastcgi_temp_path     $d/fastcgi;
    uwsgi_temp_path       $d/uwsgi;
    scgi_temp_path        $d/scgi;
EOF
}

# start_nginx NAME CPU CONF_BODY -> sets NGINX_PID
start_nginx() {
  local name=$1 cpu=$2 http_body=$3 d="$TMP/$1"
  mkdir -p "$d"
  cat >"$d/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
user root;
pid $d/nginx.pid;
error_log $d/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
$(nginx_temp_paths "$d")
    keepalive_timeout 300s;
    keepalive_requests 1000000;
$http_body
}
EOF
  local -a elog=()
  ((${#NGINX_E[@]})) && elog=(-e "$d/error.log")
  "$NGINX" -t -q -p "$d" "${elog[@]}" -c "$d/nginx.conf" || die "nginx config for $name is invalid (see above)"
  taskset -c "$cpu" "$NGINX" -p "$d" "${elog[@]}" -c "$d/nginx.conf" &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
}

UP_PORT=""
UP_PID=""
start_upstream() {
  free_port UP_PORT
  start_nginx upstream "$LOAD_CPU" "    server {
        listen 127.0.0.1:$UP_PORT;
        location / {
            default_type text/plain;
            return 200 \"hello, world\\n\";
        }
    }"
  UP_PID=$NGINX_PID
  wait_http_200 "http://127.0.0.1:$UP_PORT/" 10 || die "upstream nginx did not come up on :$UP_PORT ($(cat "$TMP/upstream/error.log" 2>/dev/null))"
  check_body "http://127.0.0.1:$UP_PORT/"
  log "upstream nginx pid $UP_PID on 127.0.0.1:$UP_PORT (CPU $LOAD_CPU)"
}

# ---------------------------------------------------------------- wrk
WRK_LUA=""
write_wrk_lua() {
  WRK_LUA="$TMP/report.lua"
  cat >"$WRK_LUA" <<'EOF'
-- machine-readable summary; latencies in microseconds
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "LOADTEST requests=%d duration_us=%d bytes=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f p999_us=%.0f max_us=%.0f mean_us=%.1f err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
EOF
}

run_wrk() { # duration url outfile   (pinned to LOAD_CPU, bounded by timeout)
  local dur=$1 url=$2 out=$3 pid rc=0
  [[ $url == http://127.0.0.1:* ]] || die "refusing to load a non-local URL: $url"
  timeout -k 5 $((dur + 30)) taskset -c "$LOAD_CPU" \
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${dur}s" --latency -s "$WRK_LUA" "$url" >"$out" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  forget_pid "$pid"
  return "$rc"
}

# ---------------------------------------------------------------- measurement
ROWS=()
RAW_SECTIONS=""
EXTRA_NOTES=""
WRK_CMD_SHOWN=""

fmt_us() { printf '%s us' "$1"; }

# measure TARGET URL PROXY_PID(or "")
measure() {
  local target=$1 url=$2 ppid=$3 out="$TMP/wrk-$1.txt"
  local t0=0 t1=0 c0a c0b c1a c1b
  WRK_CMD_SHOWN="taskset -c $LOAD_CPU wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency -s report.lua URL"

  if ((WARMUP > 0)); then
    log "$target: warm-up ${WARMUP}s"
    run_wrk "$WARMUP" "$url" "$TMP/wrk-$target-warmup.txt" || die "$target: warm-up wrk failed: $(cat "$TMP/wrk-$target-warmup.txt")"
  fi
  if [[ -n $ppid ]]; then t0=$(proc_ticks "$ppid"); fi
  read -r c0a c0b <<<"$(cpu_jiffies "$PROXY_CPU")"
  read -r c1a c1b <<<"$(cpu_jiffies "$LOAD_CPU")"
  log "$target: measuring ${DURATION}s, $CONNECTIONS connections, $THREADS thread(s): $url"
  run_wrk "$DURATION" "$url" "$out" || die "$target: wrk failed: $(cat "$out")"
  if [[ -n $ppid ]]; then t1=$(proc_ticks "$ppid"); fi
  local c0a2 c0b2 c1a2 c1b2
  read -r c0a2 c0b2 <<<"$(cpu_jiffies "$PROXY_CPU")"
  read -r c1a2 c1b2 <<<"$(cpu_jiffies "$LOAD_CPU")"

  local line
  line=$(grep '^LOADTEST ' "$out" | tail -n1) || die "$target: no LOADTEST line in wrk output: $(cat "$out")"
  local -A m=()
  local kv
  local -a kvs
  read -r -a kvs <<<"${line#LOADTEST }"
  for kv in "${kvs[@]}"; do m[${kv%%=*}]=${kv#*=}; done

  local req=${m[requests]} dur_us=${m[duration_us]}
  ((req > 0)) || die "$target: wrk completed 0 requests: $(cat "$out")"
  local errs=$((m[err_connect] + m[err_read] + m[err_write] + m[err_status] + m[err_timeout]))
  local rps cpu_us cpu_pct busy0 busy1
  rps=$(awk -v r="$req" -v d="$dur_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  if [[ -n $ppid ]]; then
    cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$req" 'BEGIN { printf "%.2f us", t / hz * 1e6 / r }')
    cpu_pct=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v d="$dur_us" 'BEGIN { printf "%.0f%%", t / hz * 1e6 / d * 100 }')
  else
    cpu_us="n/a"
    cpu_pct="n/a"
  fi
  busy0=$(awk -v b=$((c0a2 - c0a)) -v t=$((c0b2 - c0b)) 'BEGIN { printf "%.0f%%", t ? b / t * 100 : 0 }')
  busy1=$(awk -v b=$((c1a2 - c1a)) -v t=$((c1b2 - c1b)) 'BEGIN { printf "%.0f%%", t ? b / t * 100 : 0 }')

  ROWS+=("| $target | $rps | $(fmt_us "${m[p50_us]}") | $(fmt_us "${m[p99_us]}") | $cpu_us | $req | $errs | $cpu_pct | $busy0 | $busy1 |")
  RAW_SECTIONS+=$'\n'"### $target"$'\n\n'"URL: \`$url\`"$'\n\n```\n'"$(grep -v '^LOADTEST ' "$out")"$'\n'"$line"$'\n```\n'
  if ((errs > 0)); then
    EXTRA_NOTES+="- WARNING: $target had $errs errors (connect=${m[err_connect]} read=${m[err_read]} write=${m[err_write]} non-2xx/3xx=${m[err_status]} timeout=${m[err_timeout]})"$'\n'
  fi
  log "$target: ${rps} req/s, p50 ${m[p50_us]} us, p99 ${m[p99_us]} us, proxy CPU/req: ${cpu_us}, $errs errors"
}

# ---------------------------------------------------------------- targets
target_direct() {
  measure direct "http://127.0.0.1:$UP_PORT/" ""
}

target_nginx() {
  local port
  free_port port
  start_nginx proxy "$PROXY_CPU" "    upstream hello_upstream {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://hello_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
  local pid=$NGINX_PID
  wait_http_200 "http://127.0.0.1:$port/" 10 || die "proxy nginx did not come up on :$port ($(cat "$TMP/proxy/error.log" 2>/dev/null))"
  check_body "http://127.0.0.1:$port/"
  log "proxy nginx pid $pid on 127.0.0.1:$port (CPU $PROXY_CPU)"
  measure nginx "http://127.0.0.1:$port/" "$pid"
  stop_pid "$pid"
}

build_gateway() {
  if [[ -n $DISPATCH_BIN ]]; then
    [[ -x $DISPATCH_BIN ]] || die "DISPATCH_BIN=$DISPATCH_BIN is not executable"
    return 0
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo not found (needed to build the gateway; or set DISPATCH_BIN)"
  log "building gateway: cargo build --release --bin dispatch"
  (cd "$REPO_ROOT" && timeout "$BUILD_TIMEOUT" cargo build --release --bin dispatch) >&2 || die "gateway build failed"
  DISPATCH_BIN="$REPO_ROOT/target/release/dispatch"
  [[ -x $DISPATCH_BIN ]] || die "$DISPATCH_BIN missing after build"
}

target_gateway() {
  local port pid base code
  free_port port
  base="http://127.0.0.1:$port"
  mkdir -p "$TMP/gw-data"
  # The control API's token (a token of our own: nothing is written into ~/.dispatch).
  local token="loadtest-$RANDOM$RANDOM$RANDOM"
  DISPATCH_AUTH_TOKEN=$token RUST_LOG=warn taskset -c "$PROXY_CPU" "$DISPATCH_BIN" serve --listen "127.0.0.1:$port" --data-dir "$TMP/gw-data" \
    >"$TMP/gw.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  if ! wait_http_200 "$base/healthz" 30; then
    die "gateway did not answer 200 on $base/healthz within 30s; log: $(tail -n 50 "$TMP/gw.log")"
  fi
  # Two functions on the same upstream: "echo" records nothing (the proxy alone, beside
  # nginx), "echo-rec" records every call (the default), to measure what recording costs.
  local fn record
  for fn in echo echo-rec; do
    record=none
    [[ $fn == echo-rec ]] && record=all
    code=$(curl -s -o "$TMP/gw-register.json" -w '%{http_code}' --max-time 10 -X POST "$base/v1/function" \
      -H 'Content-Type: application/json' -H "Authorization: Bearer $token" \
      -d '{"name":"'"$fn"'","record":"'"$record"'","upstream":{"driver":"static","endpoints":["http://127.0.0.1:'"$UP_PORT"'"],"protocol":"raw"}}') || true
    [[ $code == 201 ]] || die "registering function $fn: expected 201, got '$code': $(cat "$TMP/gw-register.json" 2>/dev/null)"
    check_body "$base/function/$fn"
  done
  log "gateway pid $pid on 127.0.0.1:$port (CPU $PROXY_CPU)"
  measure gateway "$base/function/echo" "$pid"
  measure gateway-recording "$base/function/echo-rec" "$pid"

  local metrics
  metrics=$(curl -sf --max-time 5 "$base/metrics" | grep -E '^dispatch_(upstream_connections_opened_total|run_records_(written|dropped)_total)' || true)
  [[ -n $metrics ]] || metrics="(dispatch_upstream_connections_opened_total not found in /metrics)"
  EXTRA_NOTES+="- gateway /metrics after the run:"$'\n\n```\n'"$metrics"$'\n```\n'
  if grep -qiE 'panic|error' "$TMP/gw.log"; then
    EXTRA_NOTES+="- gateway log had errors/panics:"$'\n\n```\n'"$(grep -iE 'panic|error' "$TMP/gw.log" | tail -n 20)"$'\n```\n'
  fi
  stop_pid "$pid"
}

# ---------------------------------------------------------------- main
main() {
  local cmd
  cmd="TARGETS=\"$TARGETS\" DURATION=$DURATION CONNECTIONS=$CONNECTIONS THREADS=$THREADS WARMUP=$WARMUP loadtest/run.sh"
  ensure_deps
  [[ " $TARGETS " == *" gateway "* ]] && build_gateway # before anything runs, so the build doesn't disturb

  TMP=$(mktemp -d "${TMPDIR:-/tmp}/loadtest.XXXXXX")
  write_wrk_lua
  start_upstream

  local t
  for t in $TARGETS; do
    "target_$t"
  done

  local nginx_ver wrk_ver gw_rev
  nginx_ver=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')
  wrk_ver=$(wrk -v 2>&1 | head -n1 | awk '{print $2}' || true)
  gw_rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo "no commit")
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    gw_rev+=" (+ uncommitted changes)"
  fi

  mkdir -p "$RESULTS_DIR"
  {
    echo "# Load test results"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- nproc: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'))"
    echo "- kernel: $(uname -sr)"
    echo "- nginx: $nginx_ver"
    echo "- wrk: $wrk_ver"
    echo "- repo: $gw_rev"
    echo "- command: \`$cmd\`"
    echo "- wrk: \`$WRK_CMD_SHOWN\` after a ${WARMUP}s warm-up with the same settings"
    echo "- pinning: proxy under test on CPU $PROXY_CPU; wrk + upstream nginx (return 200 \"hello, world\\n\") on CPU $LOAD_CPU"
    echo
    echo "| target | requests/s | p50 | p99 | proxy CPU us/request | requests | errors | proxy CPU % | CPU$PROXY_CPU busy | CPU$LOAD_CPU busy |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "proxy CPU = utime+stime from /proc/PID/stat (nginx: master+worker; gateway: the process, all threads), delta over the measured run / requests completed. CPU busy = whole-CPU busy share from /proc/stat over the same window (anything else running on the machine shows up here)."
    if [[ -n $EXTRA_NOTES ]]; then
      echo
      echo "## Notes"
      echo
      printf '%s' "$EXTRA_NOTES"
    fi
    echo
    echo "## Raw wrk output"
    printf '%s' "$RAW_SECTIONS"
  } >"$RESULTS_FILE.tmp"
  mv "$RESULTS_FILE.tmp" "$RESULTS_FILE"
  cat "$RESULTS_FILE"
  log "written $RESULTS_FILE"
}

main "$@"
