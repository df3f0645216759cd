#!/usr/bin/env bash
# Async runs on the embedded queue, measured: how many runs per second the gateway accepts
# (POST /async-function/{name}, each 202 after its run is written to the store), and how
# many per second it then completes through a fast function (an nginx answering 200).
#
# Env: DISPATCH_BIN=path (skip `cargo build`), DURATION=10, CONNECTIONS=16,
#      DISPATCH_STORE_URL=postgres://... to measure on PostgreSQL (the gateway inherits it).
# Needs nginx and wrk (installed with apt-get when missing, as loadtest/run.sh does).
# Writes a markdown report on stdout and in loadtest/results/async.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
DISPATCH_BIN=${DISPATCH_BIN:-}

NAME=async
# shellcheck source=loadtest/async_common.sh
source "$SCRIPT_DIR/async_common.sh"
start_fast_upstream
start_gateway_with_fast
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
