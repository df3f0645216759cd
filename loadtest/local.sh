#!/usr/bin/env bash
# Local runtimes, measured: the first call of a newly created python function, warm hello-py
# runs per second, and the gateway's added latency over calling the runtime directly.
#
# Env: DISPATCH_BIN=path (skip `cargo build`), DURATION=10, CONNECTIONS=8, FIRST_CALLS=5;
#      DISPATCH_LOCAL_START=first-call measures that mode (the gateway inherits it).
# Needs python3, node, wrk (apt-get install wrk, as loadtest/run.sh does). Writes a markdown
# report on stdout and in loadtest/results/local.md. See loadtest/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-8}
FIRST_CALLS=${FIRST_CALLS:-5}
DISPATCH_BIN=${DISPATCH_BIN:-}

log() { printf '[local] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 not found"
command -v node >/dev/null || die "node not found"
if ! command -v wrk >/dev/null; then
  [[ $(id -u) -eq 0 ]] || die "wrk missing; run as root or install it"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null || die "cannot install wrk"
fi
if [[ -z $DISPATCH_BIN ]]; then
  (cd "$REPO_ROOT" && cargo build --release --bin dispatch) >&2 || die "build failed"
  DISPATCH_BIN="$REPO_ROOT/target/release/dispatch"
fi

TMP=$(mktemp -d)
GW_PID=""
cleanup() { [[ -n $GW_PID ]] && kill "$GW_PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
# The control API's token (a token of our own: nothing is written into ~/.dispatch).
export DISPATCH_AUTH_TOKEN="loadtest-$RANDOM$RANDOM$RANDOM"
RUST_LOG=info "$DISPATCH_BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" --log-format json \
  >"$TMP/gw.log" 2>&1 &
GW_PID=$!
for _ in $(seq 100); do curl -sf "$BASE/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "$BASE/healthz" >/dev/null || die "gateway did not start: $(tail -20 "$TMP/gw.log")"

# The first call of new functions, and their registration, timed from outside as a user sees them.
FIRST=$(python3 - "$BASE" "$REPO_ROOT/examples/python3/hello.py" "$FIRST_CALLS" <<'PY'
import base64, io, json, os, sys, tarfile, time, urllib.request
base, hello, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
auth = "Bearer " + os.environ["DISPATCH_AUTH_TOKEN"]
def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": auth})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
call("POST", "/v1/baseimage", {"name": "python3-base", "language": "python3"})
call("POST", "/v1/image", {"name": "python3", "baseImageName": "python3-base"})
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    tar.add(hello, arcname="hello.py")
source = base64.b64encode(buf.getvalue()).decode()
ready, first = [], []
for i in range(n):
    name = f"first-{i}"
    t0 = time.perf_counter()
    call("POST", "/v1/function", {"name": name, "image": "python3", "handler": "hello.handle", "source": source})
    while call("GET", f"/v1/function/{name}")["status"] == "CREATING":
        time.sleep(0.002)
    t1 = time.perf_counter()
    run = call("POST", f"/v1/runs?functionName={name}", {"blocking": True, "input": {"name": "Jon"}})
    t2 = time.perf_counter()
    assert run["status"] == "READY", run
    ready.append((t1 - t0) * 1e3)
    first.append((t2 - t1) * 1e3)
med = lambda xs: sorted(xs)[len(xs) // 2]
print(f"{med(ready):.0f} {min(ready):.0f} {max(ready):.0f} {med(first):.0f} {min(first):.0f} {max(first):.0f}")
PY
)
read -r READY_MED READY_MIN READY_MAX FIRST_MED FIRST_MIN FIRST_MAX <<<"$FIRST"
log "create -> READY: median $READY_MED ms; first call: median $FIRST_MED ms"

# Warm runs: through the gateway (POST /v1/runs, blocking), and straight to the runtime
# process (POST / with the pod envelope), same load.
cat >"$TMP/run.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("DISPATCH_AUTH_TOKEN")
wrk.body = os.getenv("BODY")
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %.0f %d %d %d\n", summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read))
end
LUA
RUN_BODY='{"blocking":true,"input":{"name":"Jon","place":"Winterfell"}}'
ENVELOPE='{"context":{"secrets":{},"deadline":null},"payload":{"name":"Jon","place":"Winterfell"}}'
measure() { # URL BODY -> "requests rps p50 p99 errors"
  BODY=$2 wrk -t1 -c"$CONNECTIONS" -d2s -s "$TMP/run.lua" "$1" >/dev/null 2>&1
  BODY=$2 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$TMP/run.lua" "$1" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}'
}
read -r GW_REQ GW_RPS GW_P50 GW_P99 GW_ERR <<<"$(measure "$BASE/v1/runs?functionName=first-0" "$RUN_BODY")"
ADDR=$(grep 'runtime started' "$TMP/gw.log" | grep '"first-0"' | grep -o '"addr":"[0-9.:]*"' | head -1 | cut -d'"' -f4 || true)
[[ -n $ADDR ]] || die "runtime address of first-0 not found in the gateway log"
read -r RT_REQ RT_RPS RT_P50 RT_P99 RT_ERR <<<"$(measure "http://$ADDR/" "$ENVELOPE")"

OUT="$SCRIPT_DIR/results/local.md"
mkdir -p "$SCRIPT_DIR/results"
{
  echo "# Local runtimes"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc $(nproc), $(python3 --version), node $(node --version)"
  echo "- command: \`DURATION=$DURATION CONNECTIONS=$CONNECTIONS FIRST_CALLS=$FIRST_CALLS loadtest/local.sh\`, local.start = ${DISPATCH_LOCAL_START:-registration (default)}"
  echo
  echo "| measure | median | min | max |"
  echo "| --- | ---: | ---: | ---: |"
  echo "| POST /v1/function -> READY (unpack, handler check) | $READY_MED ms | $READY_MIN ms | $READY_MAX ms |"
  echo "| first run of a new python function (starts its runtime) | $FIRST_MED ms | $FIRST_MIN ms | $FIRST_MAX ms |"
  echo
  echo "| warm hello-py, $CONNECTIONS connections, ${DURATION}s | runs/s | p50 | p99 | errors |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  echo "| through the gateway (POST /v1/runs, blocking, recorded) | $GW_RPS | $GW_P50 us | $GW_P99 us | $GW_ERR |"
  echo "| straight to the runtime process (POST /, envelope) | $RT_RPS | $RT_P50 us | $RT_P99 us | $RT_ERR |"
} | tee "$OUT"
