#!/usr/bin/env bash
# What recording raw calls costs, two ways, on one gateway with two raw functions on the
# same upstream (an nginx answering "done"): `echo` records nothing, `echo-rec`
# every call (the default).
#
#  MODE=cpu (default): the gateway pinned to CPU 0, wrk (-t1 -c64) and the upstream on CPU 1;
#    ROUNDS rounds of DURATION s against each function in turn, the gateway's CPU time
#    (utime + stime from /proc) divided by the calls it served; prints the median of each and
#    their ratio. CPU per call, unlike requests/s, stays comparable when other work shares
#    the machine.
#  MODE=callgrind: the gateway under valgrind's callgrind (instructions, counted only while
#    wrk runs), one function per gateway start; prints instructions per call. The count is
#    the same from run to run whatever else the machine does; it leaves out the kernel.
#    The writer lingers RECORDS_LINGER_MS (default 100) so that its transactions hold about
#    as many calls (256) as under full load without valgrind.
#
# Env: DISPATCH_BIN (default: cargo build --release), MODE, ROUNDS=6, DURATION=5.
# Needs nginx and wrk (installed with apt-get when missing), valgrind for MODE=callgrind.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
MODE=${MODE:-cpu}
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-5}
DISPATCH_BIN=${DISPATCH_BIN:-}
NAME=records
# shellcheck source=loadtest/async_common.sh
source "$SCRIPT_DIR/async_common.sh"
[[ $MODE == cpu || $MODE == callgrind ]] || die "MODE is cpu or callgrind"
if [[ $MODE == callgrind ]]; then command -v valgrind >/dev/null || die "valgrind not found (apt-get install valgrind)"; fi

start_fast_upstream taskset -c 1
cat >"$TMP/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"name": "Jon", "place": "Winterfell"}'
LUA

# Starts a gateway (under $1, a command prefix) with both functions: sets GW and GPID.
start() {
  GW=$(port)
  # shellcheck disable=SC2086
  RUST_LOG=warn $1 "$DISPATCH_BIN" serve --listen "127.0.0.1:$GW" --data-dir "$TMP/data-$GW" >"$TMP/gw.log" 2>&1 & GPID=$!
  PIDS+=($GPID)
  for _ in $(seq 600); do curl -sf "127.0.0.1:$GW/healthz" >/dev/null && break; sleep 0.2; done
  local f rec
  for f in echo echo-rec; do
    rec=none; [[ $f == echo-rec ]] && rec=all
    curl -sf -o /dev/null -X POST "127.0.0.1:$GW/v1/function" -H "Authorization: Bearer $DISPATCH_AUTH_TOKEN" \
      -H 'content-type: application/json' \
      -d '{"name":"'$f'","record":"'$rec'","upstream":{"driver":"static","endpoints":["http://127.0.0.1:'$UP'"],"protocol":"raw"}}' \
      || die "registering $f failed: $(tail -5 "$TMP/gw.log")"
  done
}
calls() { taskset -c 1 wrk -t1 -c"$1" -d"$2"s -s "$TMP/post.lua" "http://127.0.0.1:$GW/function/$3" | awk '/requests in/ {print $1}'; }
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

if [[ $MODE == cpu ]]; then
  start "taskset -c 0"
  cpu() { awk '{print $14 + $15}' "/proc/$GPID/stat"; }
  tck=$(getconf CLK_TCK)
  calls 64 2 echo >/dev/null
  for fn in echo echo-rec; do : >"$TMP/$fn"; done
  for r in $(seq "$ROUNDS"); do
    for fn in echo echo-rec; do
      c0=$(cpu); n=$(calls 64 "$DURATION" "$fn"); c1=$(cpu)
      awk -v a="$c0" -v b="$c1" -v n="$n" -v t="$tck" 'BEGIN {printf "%.3f\n", (b - a) / t * 1e6 / n}' | tee -a "$TMP/$fn" | sed "s/^/[records] round $r $fn: /;s/$/ us per call/" >&2
    done
  done
  off=$(median <"$TMP/echo"); on=$(median <"$TMP/echo-rec")
  dropped=$(curl -sf "127.0.0.1:$GW/metrics" | awk '/^dispatch_run_records_dropped_total/ {print $2}')
  echo "| CPU per call, median of $ROUNDS x ${DURATION}s | $off us | $on us | $(awk -v a="$off" -v b="$on" 'BEGIN {printf "%+.2f us (%+.1f%%)", b - a, (b / a - 1) * 100}') | records dropped: ${dropped:-?} |"
else
  export DISPATCH_RECORDS_LINGER_MS=${RECORDS_LINGER_MS:-100} DISPATCH_SERVER_WORKERS=1
  declare -A per
  for fn in echo echo-rec; do
    out="$TMP/cg.$fn"
    start "valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$out"
    calls 16 3 "$fn" >/dev/null
    callgrind_control -i on "$GPID" >/dev/null 2>&1
    n=$(calls 16 "$DURATION" "$fn")
    sleep 1
    callgrind_control -i off "$GPID" >/dev/null 2>&1
    kill -INT "$GPID"; wait "$GPID" || true
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    per[$fn]=$((total / n))
    log "$fn: $n calls, $total instructions, ${per[$fn]} per call"
  done
  echo "| instructions per call (callgrind, ${DURATION}s) | ${per[echo]} | ${per[echo-rec]} | $(awk -v a="${per[echo]}" -v b="${per[echo-rec]}" 'BEGIN {printf "%+d (%+.1f%%)", b - a, (b / a - 1) * 100}') | |"
fi
