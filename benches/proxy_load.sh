#!/usr/bin/env bash
# Load benchmark: keygate next to nginx, measured side by side in one run.
#
#   benches/proxy_load.sh [--rounds N] [--duration 10s] [--connections 64] [--write] [--pgo]
#
# Starts nginx (1 worker) serving a static 100-byte JSON as the upstream, nginx
# (1 worker, keepalive pool >= connections) as a reverse proxy in front of it,
# and keygate (release build) in front of the same upstream, then runs
# `wrk -t1 -cC -dD --latency` against each scenario, interleaved (each round
# starting one scenario further along) for N rounds, and prints medians and
# ratios to the nginx proxy. With --write the table is appended to
# BENCHMARKS.md. Everything listens on 127.0.0.1 only.
#
# Besides the 100-byte answer: 1 KiB and 64 KiB answers (nginx proxy and keygate
# with a key), HTTP/2 with prior knowledge (`h2load -t1 -c16 -m10`; nginx and
# keygate accept h2c and speak HTTP/1.1 to the upstream), and an open-loop run
# (`oha -q R --latency-correction`, R = half the nginx proxy's median closed-loop
# rate of this run) that reports p99 and p99.9 and what each adds to direct's.
# h2 needs h2load (nghttp2-client), the open loop oha (`cargo install oha`);
# scenarios whose tool is missing are skipped with a message. Each closed-loop
# row also shows the proxy process's CPU (utime + stime from /proc) per 100k
# requests: for direct, the upstream nginx worker's.
#
# With --pgo, benches/pgo_build.sh first builds keygate profile-guided, and
# the scenarios pgo_open and pgo_key run it with the defaults, beside the
# plain perf build.
#
# Environment: KEYGATE_WORKERS (proxy worker threads, each a single-threaded
# runtime on SO_REUSEPORT; default: one per CPU), KEYGATE_BIN (use this binary
# instead of building), KEYGATE_PGO_BIN (use this profile-guided binary for
# pgo_open and pgo_key instead of building it), SCENARIO_FILTER
# (space-separated scenario names).
# Scenarios: direct, nginx (access_log off), nginx_log (nginx's default
# access log, buffered), nginx_fwd, nginx_fwd_log (the same two sending the
# fields keygate adds: X-Forwarded-Proto/-Host, X-Request-Id), keygate_open,
# keygate_key (defaults: access log and metrics on), quiet_open, quiet_key
# (both off), pgo_open, pgo_key (defaults, profile-guided build; with --pgo
# or KEYGATE_PGO_BIN), hyper_open, hyper_key
# (defaults, keygate's own HTTP/1 path off), hclient_open, hclient_key
# (defaults, keygate's own upstream client off), redis_key (Redis store and
# Redis rate limit; needs redis-server), nginx_1k, keygate_1k, nginx_64k,
# keygate_64k, h2_nginx, h2_keygate, ol_direct, ol_nginx, ol_keygate_open,
# ol_keygate_key.
set -euo pipefail

ROUNDS=5
DURATION=10s
CONNS=64
WRITE=0
PGO=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --write) WRITE=1; shift ;;
    --pgo) PGO=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)

# shellcheck source=benches/lib.sh
. benches/lib.sh
install_load_tools
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
[ -x "$OHA" ] || { echo "oha not found (cargo install oha): open-loop scenarios skipped" >&2; OHA=""; }

if [ -n "${KEYGATE_BIN:-}" ]; then
  KEYGATE=$KEYGATE_BIN
else
  echo "building keygate (profile perf: fat LTO, one codegen unit)..." >&2
  cargo build --profile perf -q
  KEYGATE="$ROOT/target/perf/keygate"
fi

# The profile-guided build (pgo_open, pgo_key): built with --pgo, or given.
if [ "$PGO" = 1 ] && [ -z "${KEYGATE_PGO_BIN:-}" ]; then
  KEYGATE_PGO_BIN=$(benches/pgo_build.sh)
fi

WORK=$(mktemp -d)
PIDS=()
trap cleanup EXIT

UP_PORT=$(free_port); NGX_PORT=$(free_port); NGX_H2_PORT=$(free_port); NGX_LOG_PORT=$(free_port)
NGX_FWD_PORT=$(free_port); NGX_FWD_LOG_PORT=$(free_port)
# Idle upstream connections each proxy keeps (nginx's keepalive, keygate's
# upstream_pool_max_idle_per_host): at least one per client connection.
POOL=$((CONNS > 256 ? CONNS : 256))

# proxy_location [EXTRA]: nginx's location block for the proxy, with EXTRA
# directives inside it.
proxy_location() {
  cat <<NGX
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
${1:-}
    }
NGX
}
# What keygate adds to every forwarded request (DESIGN.md section 4), as
# nginx directives: X-Forwarded-Proto and -Host, and an X-Request-Id kept
# from the client or generated, returned to the client as well. Each field
# costs the upstream something to parse: under callgrind the upstream nginx
# runs 7.9k instructions per request with nginx's one field and 10.3k with
# keygate's four. The generated id is made as keygate makes it, a random
# prefix per process and a counter (here 24 random hex digits, then
# $connection-$connection_requests: about keygate's 32 characters), and Host
# is the upstream's address as keygate sends it, so the upstream parses as
# many bytes from either proxy. (nginx's own $request_id, 16 bytes from
# OpenSSL's RAND_bytes, costs the nginx proxy 8k more instructions per
# request under callgrind: 30.0k against 21.8k with a fixed id. It would
# compare keygate's id with a slower one, not the same work.)
FWD_ID_PREFIX=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
FWD_FIELDS="      proxy_set_header Host 127.0.0.1:$UP_PORT;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$http_host;
      proxy_set_header X-Request-Id \$kg_request_id;
      add_header X-Request-Id \$kg_request_id always;"
# The same with nginx's default access log (combined format), written in
# 16 KiB buffers as keygate writes its lines: like for like with keygate's
# defaults.
ACCESS_LOG="access_log $WORK/px-access.log combined buffer=16k flush=1s;"

{ nginx_prelude px; cat <<NGX
  upstream up { server 127.0.0.1:$UP_PORT; keepalive $POOL; keepalive_requests 1000000; }
  map \$http_x_request_id \$kg_request_id { default \$http_x_request_id; "" "$FWD_ID_PREFIX\$connection-\$connection_requests"; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    listen 127.0.0.1:$NGX_H2_PORT http2;
$(proxy_location)
  }
  server {
    listen 127.0.0.1:$NGX_LOG_PORT;
    $ACCESS_LOG
$(proxy_location)
  }
  # nginx doing keygate's forwarding: the same fields to the upstream.
  server {
    listen 127.0.0.1:$NGX_FWD_PORT;
$(proxy_location "$FWD_FIELDS")
  }
  server {
    listen 127.0.0.1:$NGX_FWD_LOG_PORT;
    $ACCESS_LOG
$(proxy_location "$FWD_FIELDS")
  }
}
NGX
} > "$WORK/px.conf"
start_upstream
"$NGINX" -c "$WORK/px.conf" -e "$WORK/px.err"

ADMIN_TOKEN="bench-admin-token-$(date +%s%N)"
ADMIN_SHA=$(printf %s "$ADMIN_TOKEN" | "$KEYGATE" hash-token)

# A redis-server of our own (free port, temp dir) for the Redis scenario.
REDIS_PORT=""
if command -v redis-server >/dev/null 2>&1; then
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save '' --appendonly no \
    --daemonize yes --pidfile "$WORK/redis.pid" --logfile "$WORK/redis.log"
  PIDS+=("$(sleep 0.3; cat "$WORK/redis.pid")")
fi

EMBEDDED="  backend: embedded
  path: $WORK/PLACEHOLDER.redb"
# Defaults: access log (text, to a file here) and metrics on.
start_keygate kg "${EMBEDDED/PLACEHOLDER/kg}" ""
# The same with the record stage switched off (what logs and metrics cost).
start_keygate quiet "${EMBEDDED/PLACEHOLDER/quiet}" "logging:
  access_log: false
metrics:
  enabled: false"
# The defaults, from the profile-guided build.
if [ -n "${KEYGATE_PGO_BIN:-}" ]; then
  KEYGATE=$KEYGATE_PGO_BIN start_keygate pgo "${EMBEDDED/PLACEHOLDER/pgo}" ""
fi
# The defaults with every HTTP/1 request served by hyper (keygate's own
# HTTP/1 path switched off), to show what that path gains.
start_keygate hyper "${EMBEDDED/PLACEHOLDER/hyper}" "" KEYGATE_H1_FAST_PATH=0
# The defaults with keygate's own HTTP/1 path but hyper's upstream client
# (keygate's own client switched off), to show what that client gains.
start_keygate hclient "${EMBEDDED/PLACEHOLDER/hclient}" "" KEYGATE_H1_CLIENT=0
if [ -n "$REDIS_PORT" ]; then
  start_keygate redis "  backend: redis
  redis:
    url: redis://127.0.0.1:$REDIS_PORT/" "rate_limit:
  backend: redis"
fi

declare -A URL HDR TOOL
# add NAME URL HEADER TOOL
add() { URL[$1]=$2; HDR[$1]=$3; TOOL[$1]=$4; }
KEYHDR="Authorization: Bearer $KEY_kg"
add direct "http://127.0.0.1:$UP_PORT/open/x" "" wrk
add nginx "http://127.0.0.1:$NGX_PORT/open/x" "" wrk
add nginx_log "http://127.0.0.1:$NGX_LOG_PORT/open/x" "" wrk
add nginx_fwd "http://127.0.0.1:$NGX_FWD_PORT/open/x" "" wrk
add nginx_fwd_log "http://127.0.0.1:$NGX_FWD_LOG_PORT/open/x" "" wrk
add keygate_open "$KG_URL_kg/open/x" "" wrk
add keygate_key "$KG_URL_kg/keyed/x" "$KEYHDR" wrk
add quiet_open "$KG_URL_quiet/open/x" "" wrk
if [ -n "${KEYGATE_PGO_BIN:-}" ]; then
  add pgo_open "$KG_URL_pgo/open/x" "" wrk
  add pgo_key "$KG_URL_pgo/keyed/x" "Authorization: Bearer $KEY_pgo" wrk
fi
add hyper_open "$KG_URL_hyper/open/x" "" wrk
add hyper_key "$KG_URL_hyper/keyed/x" "Authorization: Bearer $KEY_hyper" wrk
add hclient_open "$KG_URL_hclient/open/x" "" wrk
add hclient_key "$KG_URL_hclient/keyed/x" "Authorization: Bearer $KEY_hclient" wrk
add quiet_key "$KG_URL_quiet/keyed/x" "Authorization: Bearer $KEY_quiet" wrk
[ -n "$REDIS_PORT" ] && add redis_key "$KG_URL_redis/keyed/x" "Authorization: Bearer $KEY_redis" wrk
add nginx_1k "http://127.0.0.1:$NGX_PORT/open/b1k" "" wrk
add keygate_1k "$KG_URL_kg/keyed/b1k" "$KEYHDR" wrk
add nginx_64k "http://127.0.0.1:$NGX_PORT/open/b64k" "" wrk
add keygate_64k "$KG_URL_kg/keyed/b64k" "$KEYHDR" wrk
add h2_nginx "http://127.0.0.1:$NGX_H2_PORT/open/x" "" h2load
add h2_keygate "$KG_URL_kg/keyed/x" "$KEYHDR" h2load
if [ -n "$OHA" ]; then
  add ol_direct "${URL[direct]}" "" oha
  add ol_nginx "${URL[nginx]}" "" oha
  add ol_keygate_open "${URL[keygate_open]}" "" oha
  add ol_keygate_key "${URL[keygate_key]}" "$KEYHDR" oha
fi
ALL=(direct nginx nginx_log nginx_fwd nginx_fwd_log keygate_open keygate_key quiet_open quiet_key pgo_open pgo_key hyper_open hyper_key hclient_open hclient_key redis_key nginx_1k keygate_1k
  nginx_64k keygate_64k h2_nginx h2_keygate ol_direct ol_nginx ol_keygate_open ol_keygate_key)
# The process whose CPU each scenario charges (the proxy under test; for
# direct, the upstream's worker): utime + stime from /proc, per 100k requests.
worker_of() { pgrep -P "$(cat "$1")" | head -1; }
UP_WORKER=$(worker_of "$WORK/up.pid"); PX_WORKER=$(worker_of "$WORK/px.pid")
declare -A CPUPID
for s in "${ALL[@]}"; do
  case "$s" in
    *direct) CPUPID[$s]=$UP_WORKER ;;
    *nginx*) CPUPID[$s]=$PX_WORKER ;;
    quiet_*) CPUPID[$s]=$PID_quiet ;;
    pgo_*) CPUPID[$s]=${PID_pgo:-} ;;
    hyper_*) CPUPID[$s]=$PID_hyper ;;
    hclient_*) CPUPID[$s]=$PID_hclient ;;
    redis_*) CPUPID[$s]=${PID_redis:-} ;;
    *) CPUPID[$s]=$PID_kg ;;
  esac
done
TICK=$(getconf CLK_TCK)
# cpu_ticks PID: "utime stime" in clock ticks, all threads.
cpu_ticks() { awk '{sub(/.*\) /, ""); print $12, $13}' "/proc/$1/stat"; }

SCENARIOS=()
for s in "${ALL[@]}"; do [ -n "${TOOL[$s]:-}" ] && SCENARIOS+=("$s"); done
if [ -n "${SCENARIO_FILTER:-}" ]; then
  read -r -a SCENARIOS <<< "$SCENARIO_FILTER"
fi
CLOSED=(); OPEN=()
for s in "${SCENARIOS[@]}"; do
  [ -n "${TOOL[$s]:-}" ] || { echo "unknown or unavailable scenario: $s" >&2; exit 2; }
  if [ "${TOOL[$s]}" = oha ]; then OPEN+=("$s"); else CLOSED+=("$s"); fi
  proto=(); [ "${TOOL[$s]}" = h2load ] && proto=(--http2-prior-knowledge)
  expect_200 "$s" "${proto[@]}" ${HDR[$s]:+-H "${HDR[$s]}"} "${URL[$s]}"
done

# The 40-byte key header of the anchors for scenarios without a key.
PAD="X-Api-Pad: kg_0123456789abcdefghijklmnopqrstuvw"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
SECS=${DURATION%s}
RATE=0

# run_one ROUND SCENARIO: one measurement, appended to $RESULTS as
# round, scenario, req/s, p50 ms, p99 ms, p99.9 ms, non-2xx ("-" where the
# tool does not report it).
run_one() {
  local r=$1 s=$2 out rps p50 p99 p999 bad
  local hdr=${HDR[$s]:-$PAD}
  local pid=${CPUPID[$s]:-} u0=0 s0=0 u1=0 s1=0
  [ -n "$pid" ] && read -r u0 s0 < <(cpu_ticks "$pid")
  case "${TOOL[$s]}" in
    wrk)
      out=$(wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "$hdr" "${URL[$s]}")
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      p50=$(echo "$out" | awk '$1=="50%" {print $2}')
      p99=$(echo "$out" | awk '$1=="99%" {print $2}')
      p999=-
      bad=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
      ;;
    h2load)
      out=$(h2load -t1 -c16 -m10 -D "$SECS" --warm-up-time=1 -H "$hdr" "${URL[$s]}")
      rps=$(echo "$out" | awk '/^finished in/ {gsub(",", "", $4); print $4}')
      p50=-; p99=-; p999=-
      # non-2xx answers plus failed and errored requests
      bad=$(echo "$out" | awk '/^status codes:/ {n += $5 + $7 + $9} /^requests:/ {n += $10 + $12} END {print n + 0}')
      ;;
    oha)
      out=$("$OHA" -z "$DURATION" -q "$RATE" -c "$CONNS" --latency-correction --no-tui \
        --output-format json -H "$hdr" "${URL[$s]}")
      read -r rps p50 p99 p999 bad < <(echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
# requests still in flight when -z ends are "aborted due to deadline": not failures
errs = {e: n for e, n in d.get("errorDistribution", {}).items() if e != "aborted due to deadline"}
bad = sum(n for c, n in codes.items() if not c.startswith("2")) + sum(errs.values())
print(d["summary"]["requestsPerSec"], *(f"{p[k] * 1000:.3f}ms" for k in ("p50", "p99", "p99.9")), bad)')
      ;;
  esac
  [ -n "$pid" ] && read -r u1 s1 < <(cpu_ticks "$pid")
  # CPU seconds per 100k requests (user, system); requests = rate x duration.
  local cu cs
  read -r cu cs < <(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$TICK" -v r="$rps" -v d="$SECS" \
    'BEGIN { n = r * d; if (n > 0) printf "%.3f %.3f\n", u / t * 1e5 / n, s / t * 1e5 / n; else print "- -" }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$s" "$rps" "$p50" "$p99" "$p999" "${bad:-0}" "$cu" "$cs" >> "$RESULTS"
  echo "round $r $s: $rps req/s p99 $p99 p99.9 $p999 non2xx ${bad:-0} cpu/100k ${cu}u ${cs}s" >&2
}

echo "warm-up..." >&2
for s in "${CLOSED[@]}"; do
  case "${TOOL[$s]}" in
    wrk) wrk -t1 -c"$CONNS" -d2s -H "${HDR[$s]:-$PAD}" "${URL[$s]}" >/dev/null ;;
    h2load) h2load -t1 -c16 -m10 -D 2 -H "${HDR[$s]:-$PAD}" "${URL[$s]}" >/dev/null ;;
  esac
done
# Each round starts one scenario further along, so that no scenario always
# runs first (or right after the same neighbour) while the machine drifts.
n=${#CLOSED[@]}
for r in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((n - 1))); do run_one "$r" "${CLOSED[$(((i + r - 1) % n))]}"; done
done
if [ "${#OPEN[@]}" -gt 0 ]; then
  # Half the nginx proxy's closed-loop median of this run (or RATE from the
  # environment when nginx was filtered out).
  RATE=$(awk -F'\t' '$2=="nginx" {print $3}' "$RESULTS" | sort -n | awk '{a[NR]=$1} END {if (NR) printf "%d", a[int((NR+1)/2)] / 2}')
  RATE=${RATE:-${OPEN_LOOP_RATE:-10000}}
  [ "$RATE" -gt 0 ] 2>/dev/null || RATE=${OPEN_LOOP_RATE:-10000}
  echo "open loop at $RATE req/s..." >&2
  for s in "${OPEN[@]}"; do "$OHA" -z 2s -q "$RATE" -c "$CONNS" --no-tui -H "${HDR[$s]:-$PAD}" "${URL[$s]}" >/dev/null; done
  for r in $(seq "$ROUNDS"); do
    for s in "${OPEN[@]}"; do run_one "$r" "$s"; done
  done
fi

TABLE=$(python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$CONNS" "${KEYGATE_WORKERS:-one per CPU}" "$RATE" <<'PY'
import sys, statistics
path, rounds, dur, conns, workers, rate = sys.argv[1:]
def ms(v):
    if v == '-': return None
    if v.endswith('us'): return float(v[:-2]) / 1000
    if v.endswith('ms'): return float(v[:-2])
    if v.endswith('s'): return float(v[:-1]) * 1000
    return float(v)
rows = {}
for line in open(path):
    r, s, rps, p50, p99, p999, bad, cu, cs = line.rstrip('\n').split('\t')
    num = lambda x: None if x == '-' else float(x)
    rows.setdefault(s, []).append((float(rps), ms(p50), ms(p99), ms(p999), int(float(bad or 0)), num(cu), num(cs)))
def med(v, i):
    xs = [x[i] for x in v if x[i] is not None]
    return statistics.median(xs) if xs else None
def f(x):
    return '-' if x is None else f"{x:.2f}"
names = {
    'direct': 'upstream direct (nginx return 200)',
    'nginx': 'nginx reverse proxy (1 worker, keepalive pool)',
    'nginx_log': 'nginx reverse proxy with its access log (combined, 16 KiB buffer)',
    'nginx_fwd': "nginx reverse proxy sending keygate's forwarded fields (X-Forwarded-Proto/-Host, X-Request-Id)",
    'nginx_fwd_log': "nginx reverse proxy sending keygate's forwarded fields, with its access log",
    'keygate_open': 'keygate, auth: none',
    'keygate_key': 'keygate, key check + local rate limit, cache hit',
    'quiet_open': 'keygate, auth: none, access log and metrics off',
    'quiet_key': 'keygate, key check + local rate limit, access log and metrics off',
    'pgo_open': 'keygate, auth: none, profile-guided build (benches/pgo_build.sh)',
    'pgo_key': 'keygate, key check + local rate limit, cache hit, profile-guided build',
    'hyper_open': 'keygate, auth: none, every request through hyper (KEYGATE_H1_FAST_PATH=0)',
    'hyper_key': 'keygate, key check + local rate limit, through hyper',
    'hclient_open': 'keygate, auth: none, own HTTP/1 path, hyper upstream client (KEYGATE_H1_CLIENT=0)',
    'hclient_key': 'keygate, key check + local rate limit, hyper upstream client',
    'redis_key': 'keygate, key check + rate limit, Redis store and Redis rate limit',
    'nginx_1k': 'nginx reverse proxy, 1 KiB answer',
    'keygate_1k': 'keygate, key check + local rate limit, 1 KiB answer',
    'nginx_64k': 'nginx reverse proxy, 64 KiB answer',
    'keygate_64k': 'keygate, key check + local rate limit, 64 KiB answer',
    'h2_nginx': 'HTTP/2 h2c: nginx reverse proxy',
    'h2_keygate': 'HTTP/2 h2c: keygate, key check + local rate limit',
}
# Each row's ratio is to its nginx counterpart in this run.
base_of = {'nginx_1k': 'nginx_1k', 'keygate_1k': 'nginx_1k', 'nginx_64k': 'nginx_64k',
           'keygate_64k': 'nginx_64k', 'h2_nginx': 'h2_nginx', 'h2_keygate': 'h2_nginx'}
print(f"wrk -t1 -c{conns} -d{dur} --latency (HTTP/2: h2load -t1 -c16 -m10 -D {dur}), {rounds} interleaved rounds, medians; keygate proxy workers: {workers}")
print()
print("| scenario | req/s | ratio to nginx proxy | per-round ratios: median (min-max) | p50 ms | p99 ms | non-2xx | proxy CPU s per 100k req (user + sys) |")
print("|---|---|---|---|---|---|---|---|")
for s in names:
    if s not in rows: continue
    v = rows[s]
    rps = med(v, 0)
    b = base_of.get(s, 'nginx')
    base = med(rows[b], 0) if b in rows else None
    ratio = f"{rps/base:.2f}" if base else "-"
    # Each round's rate over the base's in the same round (the two ran
    # seconds apart): how far the ratio moves as the machine drifts.
    per_round = [x[0] / y[0] for x, y in zip(v, rows[b])] if base and s != b else []
    spread = f"{statistics.median(per_round):.2f} ({min(per_round):.2f}-{max(per_round):.2f})" if per_round else "-"
    cu, cs = med(v, 5), med(v, 6)
    cpu = f"{cu + cs:.2f} ({cu:.2f} + {cs:.2f})" if cu is not None and cs is not None else '-'
    print(f"| {names[s]} | {rps:,.0f} | {ratio} | {spread} | {f(med(v, 1))} | {f(med(v, 2))} | {sum(x[4] for x in v)} | {cpu} |")
# Like for like: both with their access logs, and both without.
pairs = [('keygate_open', 'nginx_log', 'keygate auth: none / nginx, both with access logs'),
         ('quiet_open', 'nginx', 'keygate auth: none / nginx, both without access logs'),
         ('pgo_open', 'nginx_log', 'keygate auth: none, profile-guided / nginx, both with access logs'),
         ('keygate_open', 'nginx_fwd_log', 'keygate auth: none / nginx, same forwarded fields, both with access logs'),
         ('quiet_open', 'nginx_fwd', 'keygate auth: none / nginx, same forwarded fields, both without access logs'),
         ('pgo_open', 'nginx_fwd_log', 'keygate auth: none, profile-guided / nginx, same forwarded fields, both with access logs')]
# The ratio of the medians, and the median of the rounds' ratios (each
# round's two runs were minutes apart at most, so it follows a drifting
# machine better).
likes = [(label, med(rows[a], 0) / med(rows[b], 0),
          statistics.median(x[0] / y[0] for x, y in zip(rows[a], rows[b])))
         for a, b, label in pairs if a in rows and b in rows]
if likes:
    print()
    print('; '.join(f"{label}: {r:.2f} (per round {pr:.2f})" for label, r, pr in likes))
open_names = {
    'ol_direct': 'upstream direct',
    'ol_nginx': 'nginx reverse proxy',
    'ol_keygate_open': 'keygate, auth: none',
    'ol_keygate_key': 'keygate, key check + local rate limit, cache hit',
}
if any(s in rows for s in open_names):
    d = rows.get('ol_direct')
    d99, d999 = (med(d, 2), med(d, 3)) if d else (None, None)
    print()
    print(f"Open loop: oha -q {rate} (half the nginx proxy's closed-loop median) -c{conns} -z {dur} --latency-correction, {rounds} interleaved rounds, medians")
    print()
    print("| scenario | req/s | p50 ms | p99 ms | p99.9 ms | p99 added to direct ms | p99.9 added to direct ms | non-2xx |")
    print("|---|---|---|---|---|---|---|---|")
    for s, name in open_names.items():
        if s not in rows: continue
        v = rows[s]
        p99, p999 = med(v, 2), med(v, 3)
        a99 = f(p99 - d99) if d99 is not None and s != 'ol_direct' else '-'
        a999 = f(p999 - d999) if d999 is not None and s != 'ol_direct' else '-'
        print(f"| {name} | {med(v, 0):,.0f} | {f(med(v, 1))} | {f(p99)} | {f(p999)} | {a99} | {a999} | {sum(x[4] for x in v)} |")
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
