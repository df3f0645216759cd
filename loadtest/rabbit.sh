#!/usr/bin/env bash
# Async runs on RabbitMQ, measured beside their ceiling in the same run:
#  1. the ceiling: a bare lapin loop publishing persistent messages with pipelined
#     publisher confirms (loadtest/confirm_ceiling.rs), for DURATION seconds;
#  2. the gateway (queue.backend = "rabbitmq", its consumers running a fast function, an
#     nginx answering 200): wrk submitting POST /async-function/fast for DURATION seconds,
#     each 202 after the broker's confirm; then waiting until every run has finished;
#  3. a submit-only gateway (queue.workers = 0, its own queues; the runs are left to
#     whoever consumes, here nobody): wrk submitting the same for DURATION seconds. Like
#     the bare loop it only publishes, so this row is the accept path's cost alone.
#
# Env: DISPATCH_BIN=path and CEILING_BIN=path (skip `cargo build`), DURATION=10,
#      CONNECTIONS=16, AMQP_URL (default the machine's broker, guest/guest).
# Needs nginx and wrk (installed with apt-get when missing) and rabbitmqctl (to delete its
# queues afterwards).
# Writes a markdown report on stdout and in loadtest/results/rabbit.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
DISPATCH_BIN=${DISPATCH_BIN:-}
CEILING_BIN=${CEILING_BIN:-}

NAME=rabbit
PREFIX="dispatch-load-$$"
delete_queues() {
  command -v rabbitmqctl >/dev/null || return 0
  for q in $(rabbitmqctl list_queues name -q --no-table-headers 2>/dev/null | grep "^$PREFIX\." || true); do
    rabbitmqctl delete_queue "$q" >/dev/null 2>&1 || true
  done
}
EXTRA_CLEANUP=delete_queues
# shellcheck source=loadtest/async_common.sh
source "$SCRIPT_DIR/async_common.sh"
if [[ -z $CEILING_BIN ]]; then
  (cd "$REPO_ROOT" && cargo build --release --example confirm_ceiling) >&2 || die "build failed"
  CEILING_BIN="$REPO_ROOT/target/release/examples/confirm_ceiling"
fi

# The ceiling twice: with the gateway's own confirm window (1024 in flight), and with as
# many in flight as wrk keeps requests open (CONNECTIONS), the same concurrency the
# gateway's submits have.
ceiling() {
  log "ceiling: bare lapin publish loop with confirms, window $1, ${DURATION}s"
  AMQP_URL=$AMQP_URL DURATION=$DURATION WINDOW=$1 "$CEILING_BIN" | awk '/^CEILING/ {print $2, $3, $4, $5}'
}
read -r CEIL_N CEIL_RPS CEIL_P50 CEIL_P99 <<<"$(ceiling 1024)"
read -r SAME_N SAME_RPS SAME_P50 SAME_P99 <<<"$(ceiling "$CONNECTIONS")"
[[ -n ${CEIL_RPS:-} && -n ${SAME_RPS:-} ]] || die "the ceiling loop printed nothing"

start_fast_upstream
start_gateway_with_fast DISPATCH_QUEUE_BACKEND=rabbitmq DISPATCH_QUEUE_URL="$AMQP_URL" DISPATCH_QUEUE_NAME_PREFIX="$PREFIX"
metric() { curl -sf "$BASE/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $2} END {print s + 0}'; }

log "gateway: submits for ${DURATION}s on $CONNECTIONS connections"
T0=$(date +%s.%N)
read -r REQ RPS P50 P99 ERR <<<"$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$TMP/post.lua" "$BASE/async-function/fast" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}')"
ACCEPTED=$(metric dispatch_queue_submitted_total)
log "accepted $ACCEPTED runs ($RPS requests/s, $ERR errors); waiting for them to finish"
for _ in $(seq 3000); do (( $(metric dispatch_queue_finished_total) >= ACCEPTED )) && break; sleep 0.2; done
T1=$(date +%s.%N)
DONE=$(metric dispatch_queue_finished_total)
COMPLETE_RPS=$(awk -v n="$DONE" -v a="$T0" -v b="$T1" 'BEGIN { printf "%.0f", n / (b - a) }')
ERRORS=$(metric 'dispatch_queue_finished_total[{]status="ERROR"[}]')
ratio() { awk -v a="$1" -v c="$2" 'BEGIN { printf "%.2f", a / c }'; }
RATIO=$(ratio "$RPS" "$CEIL_RPS")
SAME_RATIO=$(ratio "$RPS" "$SAME_RPS")
kill "$GW_PID" 2>/dev/null || true
wait "$GW_PID" 2>/dev/null || true

log "submit-only gateway (queue.workers = 0): submits for ${DURATION}s on $CONNECTIONS connections"
GW_DATA="$TMP/data-submit" start_gateway_with_fast DISPATCH_QUEUE_BACKEND=rabbitmq DISPATCH_QUEUE_URL="$AMQP_URL" \
  DISPATCH_QUEUE_NAME_PREFIX="$PREFIX.submit" DISPATCH_QUEUE_WORKERS=0
read -r S_REQ S_RPS S_P50 S_P99 S_ERR <<<"$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$TMP/post.lua" "$BASE/async-function/fast" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}')"
S_CONFIRMED=$(metric dispatch_queue_confirmed_total)
S_RATIO=$(ratio "$S_RPS" "$CEIL_RPS")
S_SAME_RATIO=$(ratio "$S_RPS" "$SAME_RPS")

OUT="$SCRIPT_DIR/results/rabbit.md"
mkdir -p "$SCRIPT_DIR/results"
{
  echo "# Async runs on RabbitMQ"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc $(nproc), broker: $(rabbitmqctl version 2>/dev/null || echo unknown), store: SQLite (default)"
  echo "- command: \`DURATION=$DURATION CONNECTIONS=$CONNECTIONS loadtest/rabbit.sh\`"
  echo
  echo "| measure | value |"
  echo "| --- | ---: |"
  echo "| ceiling: bare lapin publish loop, persistent, confirms pipelined (window 1024), ${DURATION}s | $CEIL_N confirmed ($CEIL_RPS/s, publish to confirm p50 $CEIL_P50 us, p99 $CEIL_P99 us) |"
  echo "| ceiling at the gateway's concurrency: the same loop, window $CONNECTIONS | $SAME_N confirmed ($SAME_RPS/s, publish to confirm p50 $SAME_P50 us, p99 $SAME_P99 us) |"
  echo "| gateway: runs accepted (202 after record and confirm), $CONNECTIONS connections, ${DURATION}s, its consumers running meanwhile | $REQ ($RPS/s, p50 $P50 us, p99 $P99 us, $ERR errors) = ${RATIO}x the window-1024 ceiling, ${SAME_RATIO}x the same-concurrency one |"
  echo "| runs completed (fast function), from the first submit to the last finish | $DONE at $COMPLETE_RPS/s (${ERRORS:-0} ERROR) |"
  echo "| submit-only gateway (queue.workers = 0): runs accepted, $CONNECTIONS connections, ${DURATION}s, no consumers | $S_REQ ($S_RPS/s, p50 $S_P50 us, p99 $S_P99 us, $S_ERR errors, $S_CONFIRMED confirmed) = ${S_RATIO}x the window-1024 ceiling, ${S_SAME_RATIO}x the same-concurrency one |"
} | tee "$OUT"
