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
# Environment: KEYGATE_WORKERS (proxy worker threads, each a single-threaded
# runtime on SO_REUSEPORT; default: one per CPU), KEYGATE_BIN (use this binary
# instead of building), SCENARIO_FILTER (space-separated scenario names).
# Scenarios: direct, nginx, keygate_open, keygate_key (defaults: access log
# and metrics on), quiet_open, quiet_key (both off), redis_key (Redis store and
# Redis rate limit; needs redis-server).
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
POOL=$((CONNS > 64 ? CONNS : 64))

# A redis-server of our own (free port, temp dir) for the Redis scenario.
REDIS_PORT=""
if command -v redis-server >/dev/null 2>&1; then
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save '' --appendonly no \
    --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
  PIDS+=("$(sleep 0.3; cat "$WORK/redis.pid")")
fi

# start_keygate NAME STORE_YAML EXTRA_YAML: a keygate in front of the upstream
# with an open route and a keyed one; sets KG_URL_<NAME> and KEY_<NAME>.
start_keygate() {
  local name=$1 store=$2 extra=$3
  local port admin
  port=$(free_port); admin=$(free_port)
  cat > "$WORK/$name.yaml" <<YAML
listen: 127.0.0.1:$port
admin:
  listen: 127.0.0.1:$admin
  tokens:
    - { name: bench, role: admin, sha256: "$ADMIN_SHA" }
store:
$store
limits:
  upstream_pool_max_idle_per_host: $POOL
$extra
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
  KEYGATE_LOG=warn "$KEYGATE" serve --config "$WORK/$name.yaml" > "$WORK/$name.out" 2> "$WORK/$name.err" &
  PIDS+=($!)
  for _ in $(seq 100); do
    grep -q "keygate listening" "$WORK/$name.out" 2>/dev/null && break
    sleep 0.1
  done
  grep -q "keygate listening" "$WORK/$name.out" || { echo "keygate $name did not start:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
  # A key for the keyed scenarios, created through the admin API; its rate
  # limit is far above what the bench reaches, so every request is checked
  # against it and none is refused.
  local key
  key=$(curl -sf -X POST -H "Authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    -d '{"name":"bench","scopes":["bench"],"access":"full","rate_limit":{"per_second":10000000,"burst":10000000}}' \
    "http://127.0.0.1:$admin/v1/keys" | python3 -c 'import sys,json; print(json.load(sys.stdin)["secret"])')
  printf -v "KG_URL_$name" '%s' "http://127.0.0.1:$port"
  printf -v "KEY_$name" '%s' "$key"
}

EMBEDDED="  backend: embedded
  path: $WORK/PLACEHOLDER.redb"
# Defaults: access log (text, to a file here) and metrics on.
start_keygate kg "${EMBEDDED/PLACEHOLDER/kg}" ""
# The same with the record stage switched off (what logs and metrics cost).
start_keygate quiet "${EMBEDDED/PLACEHOLDER/quiet}" "logging:
  access_log: false
metrics:
  enabled: false"
if [ -n "$REDIS_PORT" ]; then
  start_keygate redis "  backend: redis
  redis:
    url: redis://127.0.0.1:$REDIS_PORT/" "rate_limit:
  backend: redis"
fi

declare -A URL HDR
URL[direct]="http://127.0.0.1:$UP_PORT/open/x"; HDR[direct]=""
URL[nginx]="http://127.0.0.1:$NGX_PORT/open/x"; HDR[nginx]=""
URL[keygate_open]="$KG_URL_kg/open/x"; HDR[keygate_open]=""
URL[keygate_key]="$KG_URL_kg/keyed/x"; HDR[keygate_key]="Authorization: Bearer $KEY_kg"
URL[quiet_open]="$KG_URL_quiet/open/x"; HDR[quiet_open]=""
URL[quiet_key]="$KG_URL_quiet/keyed/x"; HDR[quiet_key]="Authorization: Bearer $KEY_quiet"
SCENARIOS=(direct nginx keygate_open keygate_key quiet_open quiet_key)
if [ -n "$REDIS_PORT" ]; then
  URL[redis_key]="$KG_URL_redis/keyed/x"; HDR[redis_key]="Authorization: Bearer $KEY_redis"
  SCENARIOS+=(redis_key)
fi
if [ -n "${SCENARIO_FILTER:-}" ]; then
  read -r -a SCENARIOS <<< "$SCENARIO_FILTER"
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

TABLE=$(python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$CONNS" "${KEYGATE_WORKERS:-one per CPU}" <<'PY'
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
    'keygate_key': 'keygate, key check + local rate limit, cache hit',
    'quiet_open': 'keygate, auth: none, access log and metrics off',
    'quiet_key': 'keygate, key check + local rate limit, access log and metrics off',
    'redis_key': 'keygate, key check + rate limit, Redis store and Redis rate limit',
}
base = statistics.median(x[0] for x in rows['nginx']) if 'nginx' in rows else None
print(f"wrk -t1 -c{conns} -d{dur} --latency, {rounds} interleaved rounds, medians; keygate proxy workers: {workers}")
print()
print("| scenario | req/s | ratio to nginx proxy | p50 ms | p99 ms | non-2xx |")
print("|---|---|---|---|---|---|")
for s in names:
    if s not in rows: continue
    v = rows[s]
    rps = statistics.median(x[0] for x in v)
    ratio = f"{rps/base:.2f}" if base else "-"
    print(f"| {names[s]} | {rps:,.0f} | {ratio} | {statistics.median(x[1] for x in v):.2f} | {statistics.median(x[2] for x in v):.2f} | {sum(x[3] for x in v)} |")
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
