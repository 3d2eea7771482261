#!/usr/bin/env bash
# Load benchmark: keygate next to nginx, measured side by side in one run.
#
#   benches/proxy_load.sh [--rounds N] [--duration 10s] [--connections 64] [--write]
#
# Starts nginx (1 worker) serving a static 100-byte JSON as the upstream, nginx
# (1 worker, keepalive pool >= connections) as a reverse proxy in front of it,
# and keygate (release build) in front of the same upstream, then runs
# `wrk -t1 -cC -dD --latency` against each scenario, interleaved, for N rounds,
# and prints medians and ratios to the nginx proxy. With --write the table is
# appended to BENCHMARKS.md. Everything listens on 127.0.0.1 only.
#
# Environment: KEYGATE_WORKERS (proxy worker threads on SO_REUSEPORT; default:
# one multi-threaded runtime), KEYGATE_BIN (use this binary instead of building).
set -euo pipefail

ROUNDS=5
DURATION=10s
CONNS=64
WRITE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --write) WRITE=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  echo "installing wrk and nginx with apt-get..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -n "${KEYGATE_BIN:-}" ]; then
  KEYGATE=$KEYGATE_BIN
else
  echo "building keygate (profile perf: fat LTO, one codegen unit)..." >&2
  cargo build --profile perf -q
  KEYGATE="$ROOT/target/perf/keygate"
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/up.pid" ] && kill "$(cat "$WORK/up.pid")" 2>/dev/null || true
  [ -f "$WORK/px.pid" ] && kill "$(cat "$WORK/px.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
UP_PORT=$(free_port); NGX_PORT=$(free_port); KG_PORT=$(free_port); KG_ADMIN=$(free_port)

BODY='{"status":"ok","service":"upstream","items":[1,2,3,4,5],"message":"hello from the upstream!!"}'
BODY=${BODY:0:100}

mkdir -p "$WORK/up" "$WORK/px"
cat > "$WORK/up.conf" <<NGX
worker_processes 1;
pid $WORK/up.pid;
error_log $WORK/up.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/up; proxy_temp_path $WORK/up; fastcgi_temp_path $WORK/up; uwsgi_temp_path $WORK/up; scgi_temp_path $WORK/up;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP_PORT;
    location / { default_type application/json; return 200 '$BODY'; }
  }
}
NGX
cat > "$WORK/px.conf" <<NGX
worker_processes 1;
pid $WORK/px.pid;
error_log $WORK/px.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/px; proxy_temp_path $WORK/px; fastcgi_temp_path $WORK/px; uwsgi_temp_path $WORK/px; scgi_temp_path $WORK/px;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive $((CONNS > 64 ? CONNS : 64)); keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
NGX
"$NGINX" -c "$WORK/up.conf" -e "$WORK/up.err"
"$NGINX" -c "$WORK/px.conf" -e "$WORK/px.err"

ADMIN_TOKEN="bench-admin-token-$(date +%s%N)"
ADMIN_SHA=$(printf %s "$ADMIN_TOKEN" | "$KEYGATE" hash-token)
cat > "$WORK/keygate.yaml" <<YAML
listen: 127.0.0.1:$KG_PORT
admin:
  listen: 127.0.0.1:$KG_ADMIN
  tokens:
    - { name: bench, role: admin, sha256: "$ADMIN_SHA" }
store:
  backend: embedded
  path: $WORK/keygate.redb
limits:
  upstream_pool_max_idle_per_host: $((CONNS > 64 ? CONNS : 64))
routes:
  - name: open
    match: { path_prefix: /open/ }
    upstream: http://127.0.0.1:$UP_PORT
    auth: none
  - name: keyed
    match: { path_prefix: /keyed/ }
    upstream: http://127.0.0.1:$UP_PORT
    scopes: [bench]
YAML
KEYGATE_LOG=warn "$KEYGATE" serve --config "$WORK/keygate.yaml" > "$WORK/keygate.out" 2> "$WORK/keygate.err" &
PIDS+=($!)
for _ in $(seq 100); do
  grep -q "keygate listening" "$WORK/keygate.out" 2>/dev/null && break
  sleep 0.1
done
grep -q "keygate listening" "$WORK/keygate.out" || { echo "keygate did not start:" >&2; cat "$WORK/keygate.err" >&2; exit 1; }

# A key for the keyed scenario, created through the admin API.
KEY=$(curl -sf -X POST -H "Authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
  -d '{"name":"bench","scopes":["bench"],"access":"full","rate_limit":{"per_second":10000000,"burst":10000000}}' \
  "http://127.0.0.1:$KG_ADMIN/v1/keys" | python3 -c 'import sys,json; print(json.load(sys.stdin)["secret"])') || KEY=""

declare -A URL HDR
URL[direct]="http://127.0.0.1:$UP_PORT/open/x"; HDR[direct]=""
URL[nginx]="http://127.0.0.1:$NGX_PORT/open/x"; HDR[nginx]=""
URL[keygate_open]="http://127.0.0.1:$KG_PORT/open/x"; HDR[keygate_open]=""
SCENARIOS=(direct nginx keygate_open)
if [ -n "$KEY" ]; then
  URL[keygate_key]="http://127.0.0.1:$KG_PORT/keyed/x"; HDR[keygate_key]="Authorization: Bearer $KEY"
  SCENARIOS+=(keygate_key)
  # Sanity: the key is accepted.
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "${HDR[keygate_key]}" "${URL[keygate_key]}")
  [ "$code" = 200 ] || { echo "keyed sanity request got $code" >&2; exit 1; }
fi
for s in "${SCENARIOS[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' ${HDR[$s]:+-H "${HDR[$s]}"} "${URL[$s]}")
  [ "$code" = 200 ] || { echo "$s sanity request got $code" >&2; exit 1; }
done

# The 40-byte key header of the anchors for scenarios without a key.
PAD="X-Api-Pad: kg_0123456789abcdefghijklmnopqrstuvw"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
echo "warm-up..." >&2
for s in "${SCENARIOS[@]}"; do wrk -t1 -c"$CONNS" -d2s -H "${HDR[$s]:-$PAD}" "${URL[$s]}" >/dev/null; done
for r in $(seq "$ROUNDS"); do
  for s in "${SCENARIOS[@]}"; do
    out=$(wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "${HDR[$s]:-$PAD}" "${URL[$s]}")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$s" "$rps" "$p50" "$p99" "${non2xx:-0}" >> "$RESULTS"
    echo "round $r $s: $rps req/s p99 $p99 non2xx ${non2xx:-0}" >&2
  done
done

TABLE=$(python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$CONNS" "${KEYGATE_WORKERS:-all}" <<'PY'
import sys, statistics
path, rounds, dur, conns, workers = sys.argv[1:]
def ms(v):
    if v.endswith('us'): return float(v[:-2]) / 1000
    if v.endswith('ms'): return float(v[:-2])
    if v.endswith('s'): return float(v[:-1]) * 1000
    return float(v)
rows = {}
for line in open(path):
    r, s, rps, p50, p99, bad = line.rstrip('\n').split('\t')
    rows.setdefault(s, []).append((float(rps), ms(p50), ms(p99), int(bad or 0)))
names = {
    'direct': 'upstream direct (nginx return 200)',
    'nginx': 'nginx reverse proxy (1 worker, keepalive pool)',
    'keygate_open': 'keygate, auth: none',
    'keygate_key': 'keygate, key check (cache hit)',
}
base = statistics.median(x[0] for x in rows['nginx'])
print(f"wrk -t1 -c{conns} -d{dur} --latency, {rounds} interleaved rounds, medians; keygate workers: {workers}")
print()
print("| scenario | req/s | ratio to nginx proxy | p50 ms | p99 ms | non-2xx |")
print("|---|---|---|---|---|---|")
for s in ['direct', 'nginx', 'keygate_open', 'keygate_key']:
    if s not in rows: continue
    v = rows[s]
    rps = statistics.median(x[0] for x in v)
    print(f"| {names[s]} | {rps:,.0f} | {rps/base:.2f} | {statistics.median(x[1] for x in v):.2f} | {statistics.median(x[2] for x in v):.2f} | {sum(x[3] for x in v)} |")
PY
)
echo
echo "$TABLE"
if [ "$WRITE" = 1 ]; then
  {
    echo
    echo "### proxy_load.sh, $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r)"
    echo
    echo "Command: \`benches/proxy_load.sh --rounds $ROUNDS --duration $DURATION --connections $CONNS\`"
    echo
    echo "$TABLE"
  } >> BENCHMARKS.md
  echo "appended to BENCHMARKS.md" >&2
fi
