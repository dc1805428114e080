#!/usr/bin/env bash
# Cold-path benchmark: what a client waits for when the mirror does not have the blob yet,
# against the same client action straight at the upstream ("direct"), measured in the same run.
#
#   bench/coldpath.sh [--quick] [--runs 3] [--systems "pullthrough previous"] [--crowd 16]
#                     [--conn-rate 24MiB] [--latency-ms 30] [--rows "tail stargz quarters stream image"]
#                     [--save DIR]
#
# The upstream is a plain docker-registry behind tools/throttle.py, which emulates a remote
# registry: each connection's response bodies capped at --conn-rate, every request delayed by
# --latency-ms (one round trip before the response headers). Rows (tools/coldclient.py does
# the client side and checks every byte against the seeded content):
#   tail      64 KiB at the end of a cold 128 MiB blob, time to last byte       target <= 1.5
#   stargz    probe bytes=0-1, the last 64 KiB, 20 chunks of ~50 KB at scattered offsets and
#             2 multi-range GETs, one after the other, on a cold 128 MiB blob   target <= 1.5
#   quarters  4 parallel ranges of a cold 128 MiB blob, a quarter each         target <= 1.1
#   stream    one GET of a cold 256 MiB blob (as skopeo or dockerd read it)     target <= 0.5
#   image     a 12-layer image (154 MiB): the manifest by tag, the config, then the layers
#             3 at a time (dockerd's max-concurrent-downloads)                  target <= 0.6
# Targets are the mirror's time over the direct time (medians of --runs runs, interleaved:
# direct, then each system, for every row of every run). Every mirror measurement starts a
# fresh mirror process on an empty cache dir. After each, the upstream's counters give its body
# bytes for the row's blobs (once it is quiet: background downloads included), target
# <= 1.1 x the blobs' size + the ranges the client asked (served early). Then --crowd clients
# (default 16, 0: none) do each row's action at once through a cold mirror: the upstream should
# send one full body per blob.
#
# Systems: "pullthrough" is this checkout's release build (or PULLTHROUGH_BIN); "previous" is
# PREVIOUS_BIN, else a release build of PREVIOUS_REF (default main) made from `git archive`
# with its own cargo target dir (target/previous/, the binary kept there by commit).
# --quick: 64 MiB blobs for the range and stream rows, layers a quarter of the size, 1 run.
# --save DIR: copies the results and the report to DIR. Env: BENCH_KEEP=1 keeps the temp dir
# with all logs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUNS=""
SYSTEMS="pullthrough previous"
CROWD=16
CONN_RATE=24MiB
LATENCY_MS=30
ROWS="tail stargz quarters stream image"
QUICK=""
SAVE=""
RANGE_SIZE=128MiB
STREAM_SIZE=256MiB
LAYERS="48MiB 12MiB 256KiB 32MiB 4MiB 1MiB 24MiB 8MiB 512KiB 16MiB 2MiB 6MiB"
QUIET_S=1.5  # the upstream is done with a row once nothing moved for this long

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --quick) QUICK=1 ;;
      --runs) RUNS=$2; shift ;;
      --systems) SYSTEMS=$2; shift ;;
      --crowd) CROWD=$2; shift ;;
      --conn-rate) CONN_RATE=$2; shift ;;
      --latency-ms) LATENCY_MS=$2; shift ;;
      --rows) ROWS=$2; shift ;;
      --save) SAVE=$2; shift ;;
      -h|--help) usage 0 ;;
      *) log "unknown argument $1"; usage 2 >&2 ;;
    esac
    shift
  done
  if [ -n "$QUICK" ]; then
    RANGE_SIZE=64MiB STREAM_SIZE=64MiB
    LAYERS="12MiB 3MiB 64KiB 8MiB 1MiB 256KiB 6MiB 2MiB 128KiB 4MiB 512KiB 1536KiB"
  fi
  RUNS=${RUNS:-$([ -n "$QUICK" ] && echo 1 || echo 3)}
  local r s
  for r in $ROWS; do
    case $r in tail|stargz|quarters|stream|image) ;; *) die "unknown row $r" ;; esac
  done
  for s in $SYSTEMS; do
    case $s in pullthrough|previous) ;; *) die "unknown system $s (pullthrough, previous)" ;; esac
  done
}

bytes_of() { python3 -c 'import sys; sys.path.insert(0,sys.argv[1]); import throttle; print(throttle.parse_size(sys.argv[2]))' "$TOOLS" "$1"; }

# The previous binary: PREVIOUS_BIN, else a release build of PREVIOUS_REF from `git archive`.
build_previous() {
  if [ -n "${PREVIOUS_BIN:-}" ]; then PREV_BIN=$PREVIOUS_BIN; return; fi
  local ref=${PREVIOUS_REF:-main} sha
  sha=$(git -C "$ROOT" rev-parse --short=7 "$ref^{commit}" 2>/dev/null) ||
    die "no commit $ref to build 'previous' from: set PREVIOUS_BIN or PREVIOUS_REF"
  PREV_BIN=$ROOT/target/previous/pullthrough-$sha
  [ -x "$PREV_BIN" ] && { log "previous: $PREV_BIN"; return; }
  log "previous: building $ref ($sha) from git archive, cargo target dir target/previous"
  mkdir -p "$RUN/previous-src"
  git -C "$ROOT" archive "$sha" | tar -x -m -C "$RUN/previous-src"  # -m: newer than any build
  (cd "$RUN/previous-src" && cargo build --release --quiet --target-dir "$ROOT/target/previous") >&2 ||
    die "cargo build of $ref failed"
  cp "$ROOT/target/previous/release/pullthrough" "$PREV_BIN"
}

# The upstream: docker-registry seeded with the row blobs (image tag "blobs") and the 12-layer
# image (tag "v12"), behind throttle.py with the per-connection cap and the round trip.
start_upstream() {
  local i=0 l layers=()
  UP_PORT=$(free_port)
  start_registry "$RUN/upstream" "$UP_PORT"
  log "seeding the upstream: range=$RANGE_SIZE stream=$STREAM_SIZE, 12 layers ($LAYERS)"
  run_child timeout 600 python3 "$TOOLS/seed.py" --registry "127.0.0.1:$UP_PORT" --tag blobs --dir "$RUN/blobs" \
    "range=$RANGE_SIZE" "stream=$STREAM_SIZE" >"$RUN/seed-blobs.json" || die "seeding failed"
  for l in $LAYERS; do i=$((i + 1)); layers+=("$(printf 'layer%02d=%s' "$i" "$l")"); done
  run_child timeout 600 python3 "$TOOLS/seed.py" --registry "127.0.0.1:$UP_PORT" --tag v12 --dir "$RUN/image" \
    "${layers[@]}" >"$RUN/seed-image.json" || die "seeding failed"
  TPORT=$(free_port)
  spawn "$RUN/throttle.log" python3 "$TOOLS/throttle.py" --listen "127.0.0.1:$TPORT" \
    --upstream "127.0.0.1:$UP_PORT" --conn-rate "$CONN_RATE" --latency-ms "$LATENCY_MS"
  wait_http "http://127.0.0.1:$TPORT/_throttle/stats"
  cp "$RUN/seed-blobs.json" "$RUN/seed-image.json" "$RES/"
  cp "$RUN/image/manifest.json" "$RES/image-manifest.json"
}

# Until the upstream emulation has had nothing in flight for QUIET_S seconds, at most SECONDS;
# prints "quiet" or "busy".
upstream_quiet() {
  python3 - "http://127.0.0.1:$TPORT/_throttle/stats" "$1" "$QUIET_S" <<'PY'
import json, sys, time, urllib.request
url, limit, quiet = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
end, since = time.monotonic() + limit, None
while time.monotonic() < end:
    try:
        s = json.load(urllib.request.urlopen(url, timeout=2))
        idle = s["active"] == 0 and s["inflight"] == 0
    except OSError:
        idle = False
    now = time.monotonic()
    since = (since or now) if idle else None
    if since is not None and now - since >= quiet:
        print("quiet"); sys.exit(0)
    time.sleep(0.1)
print("busy")
PY
}

seed_of() { [ "$1" = image ] && echo "$RUN/seed-image.json" || echo "$RUN/seed-blobs.json"; }
blob_of() { case $1 in image) echo "" ;; stream) echo stream ;; *) echo range ;; esac; }

# measure SYSTEM ROW TAG N: one client action (N clients at once) against SYSTEM, results in
# $RES/ROW-SYSTEM-TAG.{client,upstream}.json (+ .metrics.txt for a mirror).
measure() {
  local sys=$1 row=$2 tag=$3 n=$4 out=$RES/$2-$1-$3 dir=$RUN/m-$1-$2-$3 port pid="" url blob
  [ "$(upstream_quiet "$IDLE_LIMIT")" = quiet ] || log "warning: the upstream is still busy from the last row"
  curl -s --max-time 5 -X POST "http://127.0.0.1:$TPORT/_throttle/reset" >/dev/null
  if [ "$sys" = direct ]; then
    url="http://127.0.0.1:$TPORT"
  else
    port=$(free_port)
    if [ "$sys" = previous ]; then PT_BIN=$PREV_BIN start_pullthrough "$dir" "$port" "http://127.0.0.1:$TPORT"
    else PT_BIN=$OURS_BIN start_pullthrough "$dir" "$port" "http://127.0.0.1:$TPORT"; fi
    pid=$LAST_PID
    url="http://127.0.0.1:$port"
    curl -s --max-time 5 -X POST "http://127.0.0.1:$TPORT/_throttle/reset" >/dev/null  # not its start-up
  fi
  blob=$(blob_of "$row")
  log "$row: $sys, $tag, $n client(s)"
  run_child timeout -k 5 $((DEADLINE + 60)) python3 "$TOOLS/coldclient.py" "$row" --url "$url" \
    --seed "$(seed_of "$row")" ${blob:+--blob "$blob"} -n "$n" --deadline "$DEADLINE" >"$out.client.json" ||
    log "$row: $sys, $tag: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["summary"]["errors"])' \
      "$out.client.json" 2>/dev/null || echo "client failed")"
  local quiet
  quiet=$(upstream_quiet "$IDLE_LIMIT")
  curl -s --max-time 5 "http://127.0.0.1:$TPORT/_throttle/stats" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["quiet"]=sys.argv[1]=="quiet"; json.dump(d,sys.stdout)' \
      "$quiet" >"$out.upstream.json"
  if [ -n "$pid" ]; then
    curl -s --max-time 5 "$url/metrics" >"$out.metrics.txt" || true
    stop_pid "$pid"
    mv "$dir.log" "$out.mirror.log" 2>/dev/null || true
    rm -rf "$dir"
  fi
}

main() {
  parse_args "$@"
  need_pkgs python3 curl docker-registry
  have docker-registry || die "docker-registry (the upstream) is not installed"
  setup_run
  RES=$RUN/results
  mkdir -p "$RES"
  local t_start sys run row
  t_start=$(date +%s)
  if [[ " $SYSTEMS " == *" pullthrough "* ]]; then build_pullthrough; OURS_BIN=$PT_BIN; fi
  if [[ " $SYSTEMS " == *" previous "* ]]; then build_previous; fi
  other_load start
  start_upstream
  local rate stream
  rate=$(bytes_of "$CONN_RATE")
  stream=$(bytes_of "$STREAM_SIZE")
  DEADLINE=$(( 60 + 4 * stream / rate ))     # a client gives up after this (s)
  IDLE_LIMIT=$(( 30 + 4 * stream / rate ))   # the upstream's quiet wait gives up after this (s)
  python3 - "$RES/run.json" <<PY
import json, sys
json.dump({"runs": $RUNS, "systems": "$SYSTEMS", "rows": "$ROWS", "crowd": $CROWD, "conn_rate": $rate,
           "latency_ms": $LATENCY_MS, "deadline": $DEADLINE, "quick": bool("$QUICK"),
           "binaries": {"pullthrough": "${OURS_BIN:-}", "previous": "${PREV_BIN:-}"}}, open(sys.argv[1], "w"))
PY
  for run in $(seq "$RUNS"); do
    for row in $ROWS; do
      measure direct "$row" "run$run" 1
      for sys in $SYSTEMS; do measure "$sys" "$row" "run$run" 1; done
    done
  done
  if [ "$CROWD" -gt 0 ]; then
    for row in $ROWS; do
      for sys in $SYSTEMS; do measure "$sys" "$row" crowd "$CROWD"; done
    done
  fi
  other_load end "$RES/load.json"
  python3 "$TOOLS/report.py" coldpath "$RES" | tee "$RES/report.txt"
  log "done in $(( $(date +%s) - t_start )) s"
  if [ -n "$SAVE" ]; then
    mkdir -p "$SAVE"
    cp -r "$RES/." "$SAVE/"
    log "results saved in $SAVE"
  fi
}

main "$@"
