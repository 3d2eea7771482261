#!/usr/bin/env bash
# Soak: keygate (release build, embedded store, access log on) under a fixed-rate
# mix of valid and invalid keys, its RSS and open fds sampled throughout.
#
#   benches/soak.sh [--duration 10m] [--rate 2000] [--connections 64] [--sample 5s] [--warmup 60s]
#
# Starts an upstream on 127.0.0.1, keygate on 127.0.0.1 ports chosen by the kernel,
# creates keys, and drives an open-loop load (request i is due at i/rate, whatever
# happened to the earlier ones) with eight kinds in turn: a valid key in x-api-key,
# a valid key as a Bearer token, a bad checksum, an unknown well-formed key (a new one
# each time: a store read and a negative-cache entry), a revoked key, no key, a key
# without the route's scope, and a public route. Every few seconds it prints keygate's
# RSS (/proc/<pid>/status VmRSS) and open fds (/proc/<pid>/fd).
#
# At the end it prints the answers by kind, latency and the memory and fd figures,
# and fails (exit 1) unless: RSS after the warm-up stays within 10% of its value at
# the end of the warm-up; the fd count after the warm-up stays within 32 of its value
# then; every request got the answer its kind calls for (200, 401 invalid_key,
# key_revoked or missing_key, 403 insufficient_scope): no failure, drop or other status.
#
# The warm-up defaults to a fifth of the duration, at most 60 s. The run is the
# ignored test `soak::soak_mixed_keys_at_a_fixed_rate` (tests/it/soak.rs), built with
# `cargo test --release` (CARGO_TARGET_DIR is honoured). On a shared machine, run it
# under `nice -n 19` and read its figures as a check of correctness, not speed.
set -euo pipefail

DURATION=10m
RATE=2000
CONNS=64
SAMPLE=5s
WARMUP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --sample) SAMPLE=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# 90s, 10m, 1h or a plain number of seconds -> seconds.
secs() {
  case "$1" in
    *h) echo $(( ${1%h} * 3600 )) ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}
for v in "$DURATION" "$SAMPLE" ${WARMUP:+"$WARMUP"} "$RATE" "$CONNS"; do
  case "$(secs "$v")" in
    ''|*[!0-9]*) echo "soak.sh: not a duration or number: $v" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
export SOAK_DURATION_S=$(secs "$DURATION")
export SOAK_RATE=$RATE
export SOAK_CONNECTIONS=$CONNS
export SOAK_SAMPLE_S=$(secs "$SAMPLE")
if [ -n "$WARMUP" ]; then
  export SOAK_WARMUP_S=$(secs "$WARMUP")
fi
exec cargo test --release --test it soak::soak_mixed_keys_at_a_fixed_rate -- \
  --ignored --exact --nocapture
