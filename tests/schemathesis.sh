#!/usr/bin/env bash
# Fuzzes the admin API against its own OpenAPI document with schemathesis
# (https://schemathesis.readthedocs.io): every operation of /v1/openapi.json
# gets generated valid and invalid requests, and every answer is checked (no
# 5xx, status codes, content types, headers and bodies as documented, requests
# that break the schema refused, auth enforced, deleted keys gone). A failure
# exits non-zero.
#
# Every check runs but positive_data_acceptance ("every request the schema
# allows gets a 2xx"): some rules cannot be written in JSON Schema, so a
# schema-valid request can rightly be refused with 422: an opaque cursor that
# keygate did not issue, an `expires_at` in the past, `expires_in` together with
# `expires_at`, a `grace` over 30 days, `reason` on a bulk action other than
# revoke, metadata over 16 KiB.
#
# Starts its own keygate (`serve`) with a temp config: both listeners on free
# ports of 127.0.0.1, an embedded store in a temp dir, one random admin token.
# Stops it and removes the temp dir on exit.
#
#   pip install schemathesis                 # once (tested with 4.32)
#   tests/schemathesis.sh                    # builds target/debug/keygate if needed
#   KEYGATE_BIN=target/release/keygate MAX_EXAMPLES=200 MAX_TIME=600 tests/schemathesis.sh
#
# Extra arguments go to `schemathesis run` (e.g. `--seed 1`, `--phases fuzzing`).
set -euo pipefail
cd "$(dirname "$0")/.."

max_examples=${MAX_EXAMPLES:-25}
max_time=${MAX_TIME:-240}

if ! command -v schemathesis >/dev/null 2>&1; then
  echo "schemathesis is not installed: pip install schemathesis" >&2
  exit 2
fi
bin=${KEYGATE_BIN:-}
if [[ -z $bin ]]; then
  cargo build --quiet --bin keygate
  bin=target/debug/keygate
fi

dir=$(mktemp -d)
pid=
cleanup() {
  if [[ -n $pid ]]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

token=kgadm_$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)
sha=$(printf '%s' "$token" | "$bin" hash-token)
cat >"$dir/keygate.yaml" <<EOF
listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  tokens:
    - {name: ops, role: admin, sha256: "$sha"}
store:
  backend: embedded
  path: "$dir/data/keygate.redb"
routes: []
EOF

"$bin" serve --config "$dir/keygate.yaml" >"$dir/stdout.log" 2>"$dir/stderr.log" &
pid=$!
admin=
for _ in $(seq 1 150); do
  admin=$(sed -n 's|^keygate listening: proxy .* admin \(http://[0-9.:]*\)$|\1|p' "$dir/stdout.log")
  [[ -n $admin ]] && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "keygate exited before listening:" >&2
    cat "$dir/stdout.log" "$dir/stderr.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [[ -z $admin ]]; then
  echo "keygate did not announce its admin address within 15 s" >&2
  cat "$dir/stdout.log" "$dir/stderr.log" >&2
  exit 1
fi
echo "keygate admin API on $admin (pid $pid); schemathesis: $max_examples examples per operation, at most ${max_time}s"

status=0
# From the temp dir, so hypothesis' cache files go there too.
cd "$dir"
schemathesis --no-color run "$admin/v1/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --exclude-checks positive_data_acceptance \
  --max-examples "$max_examples" \
  --max-time "$max_time" \
  --request-timeout 10 \
  --workers 1 \
  --generation-database :memory: \
  "$@" || status=$?

if grep -E ' (ERROR|WARN) .*panicked' "$dir/stderr.log" "$dir/stdout.log" >/dev/null; then
  echo "keygate logged a panic:" >&2
  grep -E 'panicked' "$dir/stderr.log" "$dir/stdout.log" >&2
  status=1
fi
exit "$status"
