# Shared by the load scripts (proxy_load.sh, pgo_build.sh): their tools, the
# nginx upstream, and keygate instances in front of it. Source it; it defines
# functions only. The functions use these globals: WORK (a private temp dir),
# PIDS (processes to stop on exit), KEYGATE (the binary), UP_PORT, POOL,
# ADMIN_TOKEN and ADMIN_SHA.

need() { command -v "$1" >/dev/null 2>&1; }

# install_load_tools: wrk, nginx and h2load, with apt-get when one is missing.
install_load_tools() {
  if ! need wrk || ! need nginx || ! need h2load; then
    echo "installing wrk, nginx and h2load with apt-get..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light nghttp2-client >/dev/null
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# expect_200 LABEL CURL_ARGS...: one request with curl; ends the script unless
# the answer is 200 (a bench or a training run must not measure refusals).
expect_200() {
  local label=$1 code
  shift
  code=$(curl -s -o /dev/null -w '%{http_code}' "$@")
  [ "$code" = 200 ] || { echo "$label: sanity request got $code, not 200" >&2; exit 1; }
}

# nginx_prelude NAME: the start of an nginx config, up to inside `http {`:
# 1 worker, pid and error log $WORK/NAME.pid and .err, temp files in
# $WORK/NAME, no access log, unlimited keep-alive requests.
nginx_prelude() {
  local n=$1
  mkdir -p "$WORK/$n"
  cat <<NGX
worker_processes 1;
pid $WORK/$n.pid;
error_log $WORK/$n.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$n; proxy_temp_path $WORK/$n; fastcgi_temp_path $WORK/$n; uwsgi_temp_path $WORK/$n; scgi_temp_path $WORK/$n;
  keepalive_requests 1000000;
NGX
}

# start_upstream: nginx (1 worker) on 127.0.0.1:$UP_PORT answering every path
# with a static 100-byte JSON, and /b1k and /b64k with 1 KiB and 64 KiB of it.
start_upstream() {
  local body='{"status":"ok","service":"upstream","items":[1,2,3,4,5],"message":"hello from the upstream!!"}'
  body=${body:0:100}
  mkdir -p "$WORK/files"
  # (readable by nginx's worker user: mktemp makes the dir private)
  chmod 755 "$WORK" "$WORK/files"
  python3 -c 'import sys; [open(f"{sys.argv[1]}/{n}", "w").write("[" + "1," * ((size - 3) // 2) + "1]" + " " * ((size - 3) % 2)) for n, size in (("b1k.json", 1024), ("b64k.json", 65536))]' "$WORK/files"
  { nginx_prelude up; cat <<NGX
  server {
    listen 127.0.0.1:$UP_PORT;
    location / { default_type application/json; return 200 '$body'; }
    location ~ /(b1k|b64k)\$ { default_type application/json; root $WORK/files; try_files /\$1.json =404; }
  }
}
NGX
  } > "$WORK/up.conf"
  "$NGINX" -c "$WORK/up.conf" -e "$WORK/up.err"
}

# cleanup: stops what the script started (PIDS, and the nginx instances whose
# pid files are $WORK/up.pid and $WORK/px.pid) and removes WORK; for trap EXIT.
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in up px; do
    [ -f "$WORK/$n.pid" ] && kill "$(cat "$WORK/$n.pid")" 2>/dev/null || true
  done
  sleep 0.3
  rm -rf "$WORK"
}

# start_keygate NAME STORE_YAML EXTRA_YAML [VAR=VALUE]: a keygate in front of
# the upstream with an open route and a keyed one, with VAR=VALUE in its
# environment; sets KG_URL_<NAME>, KEY_<NAME> and PID_<NAME>.
start_keygate() {
  local name=$1 store=$2 extra=$3 envvar=${4:-KEYGATE_BENCH=1}
  local port admin
  port=$(free_port); admin=$(free_port)
  # Each config in a directory of its own: keygate watches its config's
  # directory, and every write there (an access log, a store) wakes the
  # watcher. With the configs beside the logs, each log write woke every
  # keygate's watcher (3.5% of the machine's CPU during a run), which no
  # deployment does.
  mkdir -p "$WORK/cfg-$name"
  cat > "$WORK/cfg-$name/$name.yaml" <<YAML
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
  env KEYGATE_LOG=warn "$envvar" "$KEYGATE" serve --config "$WORK/cfg-$name/$name.yaml" > "$WORK/$name.out" 2> "$WORK/$name.err" &
  PIDS+=($!)
  printf -v "PID_$name" '%s' "$!"
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
