#!/usr/bin/env bash
# Where a cached hit spends its instructions: a release pullthrough under callgrind serving one
# hot path, then the instructions per request and the functions that cost most.
#
#   bench/profile.sh [--path h2-manifest|h1-manifest|http-manifest|close-manifest|h2-blob]
#                    [--requests 20000] [--top 25] [--access-log]
#
# h2-manifest: the manifest by digest over HTTPS with HTTP/2 (h2load, 16 connections x 8
# streams); h1-manifest: the same over HTTPS with HTTP/1.1 (h2load --h1); http-manifest: the
# same over plain HTTP/1.1 (no TLS: what bench/hotpath.sh's manifest rows serve);
# close-manifest: that with `Connection: close`, a new connection per request (as dockerd and
# podman ask); h2-blob: a 1 MiB blob over HTTP/2. 2000 requests warm the cache and the connections up with instrumentation off,
# then --requests are counted. Instruction counts do not depend on what else the machine runs,
# unlike the throughput rows of bench/hotpath.sh, so this can compare two builds on a busy
# machine: PULLTHROUGH_BIN=old bench/profile.sh, then with the new binary. The totals include
# the 16 TLS handshakes, whose share shrinks as --requests grows.
# --access-log keeps the access log on (written to a file), as bench/hotpath.sh has it.
# Env: PULLTHROUGH_BIN (skip cargo build), BENCH_KEEP=1 (keep the callgrind output).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

PROFILE=h2-manifest
REQUESTS=20000
TOP=25
LOG_LEVEL=warn

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case $1 in
    --path) PROFILE=$2; shift ;;
    --requests) REQUESTS=$2; shift ;;
    --top) TOP=$2; shift ;;
    --access-log) LOG_LEVEL=info ;;
    -h|--help) usage 0 ;;
    *) log "unknown argument $1"; usage 2 >&2 ;;
  esac
  shift
done

# per_request N: the first N function lines of callgrind_annotate, as instructions per request.
per_request() {
  awk -v n="$REQUESTS" -v top="$1" '/^ *[0-9,]+ +\( *[0-9.]+%\) / && !/PROGRAM TOTALS/ && shown < top {
    c = $1; gsub(",", "", c); line = $0; sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, "", line)
    printf "%8d  %s\n", c / n, substr(line, 1, 150); shown++ }'
}

main() {
  need_pkgs valgrind nghttp2-client docker-registry openssl python3
  build_pullthrough
  setup_run
  seed_upstream "$RUN/upstream" "$(free_port)" small=1MiB
  make_cert "$RUN/tls"
  local port dir=$RUN/pullthrough out=$RUN/callgrind.out path load=(h2load) vg scheme=https tls streams=8
  port=$(free_port)
  mkdir -p "$dir"
  case $PROFILE in
    h2-manifest) path="/v2/$(seed_get repo)/manifests/$(seed_get manifest.digest)" ;;
    h1-manifest) path="/v2/$(seed_get repo)/manifests/$(seed_get manifest.digest)"; load+=(--h1) ;;
    http-manifest) path="/v2/$(seed_get repo)/manifests/$(seed_get manifest.digest)"; load+=(--h1); scheme=http ;;
    close-manifest) path="/v2/$(seed_get repo)/manifests/$(seed_get manifest.digest)"
                    load+=(--h1 -H "Connection: close"); scheme=http; streams=1 ;;
    h2-blob) path="/v2/$(seed_get repo)/blobs/$(seed_get blobs.small.digest)" ;;
    *) die "unknown --path $PROFILE" ;;
  esac
  tls=$(printf 'tls_cert = "%s"\ntls_key = "%s"' "$RUN/tls/cert.pem" "$RUN/tls/key.pem")
  [ "$scheme" = http ] && tls=""
  printf '[server]\nlisten = "127.0.0.1:%s"\n%s\n[storage]\ndir = "%s"\n[cache]\ntag_ttl = "1h"\n[upstreams."docker.io"]\nurl = "http://127.0.0.1:%s"\n' \
    "$port" "$tls" "$dir/data" "$UP_PORT" >"$dir/mirror.toml"
  # HTTP/1.1 pipelines up to -m requests on a connection; one that closes takes one.
  load+=(-t 1 -c 16 -m "$streams" -H "Accept: application/vnd.oci.image.manifest.v1+json")
  # Without --access-log, the access log is off: a large share of the profile, and not always
  # the part under study.
  PULLTHROUGH_LOG=$LOG_LEVEL spawn "$dir.log" valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$out" "$PT_BIN" --config "$dir/mirror.toml"
  vg=$LAST_PID
  wait_http "$scheme://127.0.0.1:$port/v2/" 120
  log "warming up (2000 requests, not counted)"
  "${load[@]}" -n 2000 "$scheme://127.0.0.1:$port$path" >"$RUN/warmup.txt" 2>&1 || die "warm-up failed: $(tail -3 "$RUN/warmup.txt")"
  callgrind_control -i on "$vg" >/dev/null
  log "measuring $REQUESTS requests ($PROFILE)"
  "${load[@]}" -n "$REQUESTS" "$scheme://127.0.0.1:$port$path" >"$RUN/load.txt" 2>&1 || true
  callgrind_control -i off "$vg" >/dev/null
  callgrind_control -d "$vg" >/dev/null
  grep -E '^requests:|^status codes:' "$RUN/load.txt" >&2
  grep -q "$REQUESTS succeeded" "$RUN/load.txt" || die "not every request succeeded: $(grep -E '^requests:' "$RUN/load.txt")"
  local dump total
  for _ in $(seq 50); do dump=$(ls "$out".* 2>/dev/null | head -1); [ -n "$dump" ] && break; sleep 0.2; done
  [ -n "$dump" ] || die "callgrind wrote no dump"
  total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }')
  echo "$PROFILE: $((total / REQUESTS)) instructions per request ($total over $REQUESTS requests)"
  echo
  echo "self cost (instructions per request, function):"
  callgrind_annotate --inclusive=no "$dump" 2>/dev/null | per_request "$TOP"
  echo
  echo "inclusive cost of pullthrough's own functions (per request):"
  callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | grep 'pullthrough::' | per_request "$TOP"
}

main
