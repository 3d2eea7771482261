#!/usr/bin/env bash
# Profile-guided build of keygate: the binary the load benchmark measures
# beside the plain perf build, and the one to deploy where CPU per request
# matters.
#
#   benches/pgo_build.sh [--train-duration 5s]
#
# 1. Builds keygate instrumented (profile perf with -Cprofile-generate) into
#    target/pgo-gen.
# 2. Trains it: nginx (1 worker, static JSON) as the upstream, keygate with
#    its defaults (access log and metrics on) in front, and wrk and h2load
#    sending, one after the other: open-route requests, requests with a valid
#    key (100-byte and 1 KiB answers, HTTP/1.1 and HTTP/2), and a few
#    refusals (no route, no key, an unknown key). keygate then stops with
#    SIGTERM, which writes the profile.
# 3. Merges the profile with the toolchain's llvm-profdata (the rustup
#    component llvm-tools, added when missing) and builds keygate again with
#    -Cprofile-use into target/pgo.
#
# Prints the optimised binary's path on stdout; progress goes to stderr.
# Everything listens on 127.0.0.1 only. Needs wrk, nginx and h2load (installed
# with apt-get when missing). Takes two perf builds (about 6 minutes each on
# 2 cores) and half a minute of training.
set -euo pipefail

TRAIN=5s
while [ $# -gt 0 ]; do
  case "$1" in
    --train-duration) TRAIN=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
# shellcheck source=benches/lib.sh
. benches/lib.sh
install_load_tools

profdata() { find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -1; }
PROFDATA=$(profdata)
if [ -z "$PROFDATA" ]; then
  echo "adding the rustup component llvm-tools (for llvm-profdata)..." >&2
  rustup component add llvm-tools >&2
  PROFDATA=$(profdata)
  [ -n "$PROFDATA" ] || { echo "llvm-profdata not found after adding llvm-tools" >&2; exit 1; }
fi

WORK=$(mktemp -d)
PIDS=()
trap cleanup EXIT
# A fixed directory, so that RUSTFLAGS stays the same and a second run
# rebuilds only what changed.
PROFILES="$ROOT/target/pgo-gen/profiles"
rm -rf "$PROFILES"
mkdir -p "$PROFILES"

echo "building keygate instrumented (target/pgo-gen)..." >&2
RUSTFLAGS="-Cprofile-generate=$PROFILES" cargo build --profile perf -q --target-dir target/pgo-gen
KEYGATE="$ROOT/target/pgo-gen/perf/keygate"

UP_PORT=$(free_port)
ADMIN_TOKEN="pgo-admin-token-$(date +%s%N)"
ADMIN_SHA=$(printf %s "$ADMIN_TOKEN" | "$KEYGATE" hash-token)
POOL=256
start_upstream
start_keygate train "  backend: embedded
  path: $WORK/train.redb" ""

BEARER="Authorization: Bearer $KEY_train"
expect_200 "training, open route" "$KG_URL_train/open/x"
expect_200 "training, keyed route" -H "$BEARER" "$KG_URL_train/keyed/x"

echo "training for about 4 x $TRAIN..." >&2
# The mix of a gateway at work: proxied requests, most of them keyed, and a
# few refusals. Refusals are answered many times faster than a proxied request
# and would outnumber them in equal time, teaching the compiler that
# forwarding is the rare path; so they get 2 connections for a second each.
load() { wrk -t1 -d"$1" --latency "${@:2}" >/dev/null; }
load "$TRAIN" -c64 "$KG_URL_train/open/x"
load "$TRAIN" -c64 -H "$BEARER" "$KG_URL_train/keyed/x"
load "$TRAIN" -c64 -H "$BEARER" "$KG_URL_train/keyed/b1k"
h2load -t1 -c16 -m10 -D "${TRAIN%s}" -H "$BEARER" "$KG_URL_train/keyed/x" >/dev/null
load 1s -c2 "$KG_URL_train/nowhere"
load 1s -c2 "$KG_URL_train/keyed/x"
load 1s -c2 -H "Authorization: Bearer kg_unknownkeyunknownkeyunknownkey_000000" "$KG_URL_train/keyed/x"

# A graceful stop: the instrumented binary writes its profile on exit.
kill -TERM "$PID_train"
wait "$PID_train" || true
shopt -s nullglob
raw=("$PROFILES"/*.profraw)
[ "${#raw[@]}" -gt 0 ] || { echo "keygate wrote no profile; its stderr:" >&2; cat "$WORK/train.err" >&2; exit 1; }
"$PROFDATA" merge -o "$WORK/merged.profdata" "${raw[@]}"
# Named by its content: cargo does not watch the file RUSTFLAGS names, so a
# new profile must change RUSTFLAGS to rebuild everything with it.
sum=$(sha256sum "$WORK/merged.profdata" | cut -c1-16)
MERGED="$ROOT/target/pgo-gen/merged-$sum.profdata"
rm -f "$ROOT"/target/pgo-gen/merged-*.profdata
mv "$WORK/merged.profdata" "$MERGED"

echo "building keygate with the profile (target/pgo)..." >&2
RUSTFLAGS="-Cprofile-use=$MERGED" cargo build --profile perf -q --target-dir target/pgo
echo "$ROOT/target/pgo/perf/keygate"
