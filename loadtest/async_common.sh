# Shared by loadtest/async.sh and loadtest/rabbit.sh (sourced, not run): the tools they
# need, a temp dir and the processes to stop at exit, a fast function (an nginx answering
# 200), a gateway serving it, and wrk's POST script. Expects NAME (the log prefix),
# REPO_ROOT and DISPATCH_BIN from the sourcing script; builds the gateway when DISPATCH_BIN
# is empty. The sourcing script may set EXTRA_CLEANUP to a function run at exit.

log() { printf '[%s] %s\n' "$NAME" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
missing=()
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root or install them first"
  log "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || die "cannot install ${missing[*]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [[ -z $DISPATCH_BIN ]]; then
  (cd "$REPO_ROOT" && cargo build --release --bin dispatch) >&2 || die "build failed"
  DISPATCH_BIN="$REPO_ROOT/target/release/dispatch"
fi

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n ${EXTRA_CLEANUP:-} ]]; then "$EXTRA_CLEANUP"; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The control API's token (a token of our own: nothing is written into ~/.dispatch).
export DISPATCH_AUTH_TOKEN="loadtest-$RANDOM$RANDOM$RANDOM"

# Starts the upstream nginx on a free port (under a command prefix given as arguments,
# e.g. `taskset -c 1`): sets UP. It answers UPSTREAM_BODY (an nginx string, quoted),
# by default "done\n".
start_fast_upstream() {
  UP=$(port)
  local body=${UPSTREAM_BODY:-'"done\n"'}
  mkdir -p "$TMP/up"
  cat >"$TMP/up/nginx.conf" <<C
daemon off; worker_processes 1; pid $TMP/up/pid; error_log $TMP/up/err warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $TMP/up; proxy_temp_path $TMP/up; fastcgi_temp_path $TMP/up;
       uwsgi_temp_path $TMP/up; scgi_temp_path $TMP/up;
       server { listen 127.0.0.1:$UP; location / { return 200 $body; } } }
C
  "$@" "$NGINX" -p "$TMP/up" -e "$TMP/up/err" -c "$TMP/up/nginx.conf" & PIDS+=($!)
}

# Starts the gateway (with `env` assignments given as arguments; its data in GW_DATA,
# by default $TMP/data), registers the raw function `fast` on the upstream and writes
# wrk's script: sets GW, BASE and GW_PID.
start_gateway_with_fast() {
  GW=$(port)
  BASE="http://127.0.0.1:$GW"
  env RUST_LOG=warn "$@" "$DISPATCH_BIN" serve --listen "127.0.0.1:$GW" --data-dir "${GW_DATA:-$TMP/data}" >"$TMP/gw.log" 2>&1 & GW_PID=$!
  PIDS+=("$GW_PID")
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
}
