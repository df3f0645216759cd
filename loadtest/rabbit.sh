#!/usr/bin/env bash
# Async runs on RabbitMQ, measured beside their ceiling in the same run:
#  1. the ceiling: a bare lapin loop publishing persistent messages with pipelined
#     publisher confirms (loadtest/confirm_ceiling.rs), for DURATION seconds;
#  2. the gateway (queue.backend = "rabbitmq", its consumers running a fast function, an
#     nginx answering 200): wrk submitting POST /async-function/fast for DURATION seconds,
#     each 202 after the broker's confirm; then waiting until every run has finished;
#  3. ROUNDS times, each round a pair run back to back (in turn which goes first): the
#     bare loop with CONNECTIONS in flight, and a new submit-only gateway (queue.workers = 0, queues of its own, left
#     to whoever consumes, here nobody) with wrk submitting the same for DURATION
#     seconds. Like the bare loop it only publishes, so this row is the accept path's cost
#     alone; each round's ratio is against its own ceiling (the machine is shared and its
#     speed drifts within a minute), and the median of the rounds is the figure.
# Once, beside them: the bare loop publishing the gateway's own messages (MESSAGE=gateway:
# mandatory, message id, timestamp), to tell the broker's cost of those from ours.
# The submit-only gateway runs one scheduler thread (GATEWAY_WORKERS=1, server.workers;
# the one with consumers keeps its default, a thread per core): the broker,
# wrk and the gateway share this machine's cores, and a second thread only added wake-ups
# between threads (docs/performance.md).
#
# Env: DISPATCH_BIN=path and CEILING_BIN=path (skip `cargo build`), DURATION=10,
#      CONNECTIONS=16, ROUNDS=3, GATEWAY_WORKERS=1, AMQP_URL (default the machine's
#      broker, guest/guest).
# Needs nginx and wrk (installed with apt-get when missing) and rabbitmqctl (to delete its
# queues afterwards).
# Writes a markdown report on stdout and in loadtest/results/rabbit.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-16}
ROUNDS=${ROUNDS:-3}
GATEWAY_WORKERS=${GATEWAY_WORKERS:-1}
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

# The ceiling: with the gateway's own confirm window (1024 in flight), and with as many
# in flight as wrk keeps requests open (CONNECTIONS), the same concurrency the gateway's
# submits have, plain and with the gateway's messages (MESSAGE=gateway).
ceiling() {
  log "ceiling: bare lapin publish loop with confirms, window $1, ${MESSAGE:-plain} messages, ${DURATION}s"
  AMQP_URL=$AMQP_URL DURATION=$DURATION WINDOW=$1 MESSAGE=${MESSAGE:-plain} "$CEILING_BIN" | awk '/^CEILING/ {print $2, $3, $4, $5}'
}
read -r CEIL_N CEIL_RPS CEIL_P50 CEIL_P99 <<<"$(ceiling 1024)"
read -r SAME_N SAME_RPS SAME_P50 SAME_P99 <<<"$(ceiling "$CONNECTIONS")"
read -r SHAPED_N SHAPED_RPS SHAPED_P50 SHAPED_P99 <<<"$(MESSAGE=gateway ceiling "$CONNECTIONS")"
[[ -n ${CEIL_RPS:-} && -n ${SAME_RPS:-} && -n ${SHAPED_RPS:-} ]] || die "the ceiling loop printed nothing"

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

ROWS=()
RATIOS=()
S_CONFIRMED_ALL=0
S_REQ_ALL=0
# One submit-only gateway, new each time (its own data and queues): sets S_REQ S_RPS S_P50
# S_P99 S_ERR S_CONFIRMED.
submit_only() {
  log "round $1: submit-only gateway (queue.workers = 0): submits for ${DURATION}s on $CONNECTIONS connections"
  GW_DATA="$TMP/data-submit-$1" start_gateway_with_fast DISPATCH_QUEUE_BACKEND=rabbitmq DISPATCH_QUEUE_URL="$AMQP_URL" \
    DISPATCH_QUEUE_NAME_PREFIX="$PREFIX.submit$1" DISPATCH_QUEUE_WORKERS=0 DISPATCH_SERVER_WORKERS="$GATEWAY_WORKERS"
  read -r S_REQ S_RPS S_P50 S_P99 S_ERR <<<"$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$TMP/post.lua" "$BASE/async-function/fast" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}')"
  S_CONFIRMED=$(metric dispatch_queue_confirmed_total)
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
}
# The pair's order alternates (loop first in odd rounds), so that a machine slowing down
# or speeding up favours neither.
for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then
    read -r R_N R_RPS R_P50 R_P99 <<<"$(ceiling "$CONNECTIONS")"
    submit_only "$round"
  else
    submit_only "$round"
    read -r R_N R_RPS R_P50 R_P99 <<<"$(ceiling "$CONNECTIONS")"
  fi
  [[ -n ${R_RPS:-} && -n ${S_RPS:-} ]] || die "round $round measured nothing"
  R_RATIO=$(ratio "$S_RPS" "$R_RPS")
  RATIOS+=("$R_RATIO")
  S_REQ_ALL=$((S_REQ_ALL + S_REQ))
  S_CONFIRMED_ALL=$((S_CONFIRMED_ALL + S_CONFIRMED))
  ROWS+=("| round $round: the bare loop, window $CONNECTIONS, and a submit-only gateway (queue.workers = 0, no consumers), $CONNECTIONS connections, ${DURATION}s each, back to back | loop $R_RPS/s (p50 $R_P50 us, p99 $R_P99 us); gateway $S_REQ accepted ($S_RPS/s, p50 $S_P50 us, p99 $S_P99 us, $S_ERR errors, $S_CONFIRMED confirmed) = **${R_RATIO}x** |")
done
MEDIAN=$(printf '%s\n' "${RATIOS[@]}" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')

OUT="$SCRIPT_DIR/results/rabbit.md"
mkdir -p "$SCRIPT_DIR/results"
{
  echo "# Async runs on RabbitMQ"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc $(nproc), broker: $(rabbitmqctl version 2>/dev/null || echo unknown), store: SQLite (default)"
  echo "- command: \`DURATION=$DURATION CONNECTIONS=$CONNECTIONS ROUNDS=$ROUNDS GATEWAY_WORKERS=$GATEWAY_WORKERS loadtest/rabbit.sh\`"
  echo
  echo "| measure | value |"
  echo "| --- | ---: |"
  echo "| ceiling: bare lapin publish loop, persistent, confirms pipelined (window 1024), ${DURATION}s | $CEIL_N confirmed ($CEIL_RPS/s, publish to confirm p50 $CEIL_P50 us, p99 $CEIL_P99 us) |"
  echo "| ceiling at the gateway's concurrency: the same loop, window $CONNECTIONS | $SAME_N confirmed ($SAME_RPS/s, publish to confirm p50 $SAME_P50 us, p99 $SAME_P99 us) |"
  echo "| the same loop, window $CONNECTIONS, publishing the gateway's messages (mandatory, message id, timestamp) | $SHAPED_N confirmed ($SHAPED_RPS/s, p50 $SHAPED_P50 us, p99 $SHAPED_P99 us) = $(ratio "$SHAPED_RPS" "$SAME_RPS")x the plain one |"
  echo "| gateway: runs accepted (202 after record and confirm), $CONNECTIONS connections, ${DURATION}s, its consumers running meanwhile | $REQ ($RPS/s, p50 $P50 us, p99 $P99 us, $ERR errors) = ${RATIO}x the window-1024 ceiling, ${SAME_RATIO}x the same-concurrency one |"
  echo "| runs completed (fast function), from the first submit to the last finish | $DONE at $COMPLETE_RPS/s (${ERRORS:-0} ERROR) |"
  printf '%s\n' "${ROWS[@]}"
  echo "| submit-only accepts against the bare loop of the same round, median of $ROUNDS rounds | **${MEDIAN}x** ($S_REQ_ALL accepted, $S_CONFIRMED_ALL confirmed) |"
} | tee "$OUT"
