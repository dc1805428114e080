#!/usr/bin/env bash
# Soak benchmark: a release pullthrough under --minutes of mixed load and upstream faults, its
# resources sampled every 10 s, every body it serves for verification checked by sha256.
#
#   bench/soak.sh [--minutes 30] [--cut 0.1] [--r429 0.1] [--no-attack]
#
# The upstream is a plain docker-registry behind tools/throttle.py, which injects faults into
# GETs of blobs and manifests: with probability --r429 an answer 429 (Retry-After: 1) that is
# never forwarded, with probability --cut a response cut after half its body. The mirror runs
# with a 5 s tag TTL, so cached tags are revalidated through the faults too. The load runs in
# rounds (about 25 s each) until --minutes have passed:
#   - cold misses: each round pushes a new image (a new 1 MiB or 8 MiB blob, alternately) to
#     the upstream; 3 clients GET its blob at once (two over HTTP/1.1, one over h2c) and one
#     GETs its manifest by tag; every client retries a failed GET up to 8 times, 1 s apart,
#     as dockerd would;
#   - cached hits over HTTP/1.1: wrk, 16 connections, 6 s on the manifest by digest and on the
#     1 MiB blob (statuses and socket errors counted; wrk does not check bodies), then 4 curl
#     GETs of the cached blobs with their sha256 checked;
#   - cached hits over HTTP/2 (h2c, prior knowledge): h2load, 8 connections x 8 streams, 4 s on
#     the manifest by digest, then curl --http2-prior-knowledge GETs of the blobs, checked;
#   - every third round, 32 slow readers (tools/slowreaders.py, 64 KiB/s) of the 64 MiB blob
#     for 15 s in the background;
#   - once, at a third of the time and between rounds, the HTTP/2 memory attack of
#     bench/h2flood.sh (tools/h2flood.py: 1,000 h2c connections from 4 loopback addresses, 100
#     never-read GETs of the 64 MiB blob each, held 30 s), while an HTTP/1.1 client keeps
#     GETting the 1 MiB blob (checked); RSS and open files are sampled every 0.5 s meanwhile
#     (--no-attack leaves it out);
#   - once, at half time and between rounds, the mirror is stopped (SIGTERM) and started again
#     on the same cache.
# Every 10 s a sampler records the mirror's RSS (VmRSS), open files (/proc/PID/fd) and threads
# (/proc/PID/status; pullthrough exposes no task count). At the end tools/report.py prints the
# summary: for each process lifetime, RSS/fds/threads at the end of warm-up (the first 20 % of
# the run, at most 2 minutes after the start) and at the end, with the growth between; every
# failed attempt with the injected fault (or the restart) that explains it, or "unexplained";
# the faults the proxy injected; and how many bodies were fetched and verified.
# The mirror runs without its access log (PULLTHROUGH_LOG=info,pullthrough::access=warn; set
# PULLTHROUGH_LOG to choose otherwise): at this load it would write about 1.4 GB per 10 minutes.
# Env: PULLTHROUGH_BIN (skip cargo build), BENCH_KEEP=1 (keep the temp dir with all logs).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

MINUTES=30
CUT=0.1
R429=0.1
ATTACK=1
REPO=library/bench  # where seed_upstream pushes the base image
ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --minutes) MINUTES=$2; shift ;;
      --cut) CUT=$2; shift ;;
      --r429) R429=$2; shift ;;
      --no-attack) ATTACK=0 ;;
      -h|--help) usage 0 ;;
      *) log "unknown argument $1"; usage 2 >&2 ;;
    esac
    shift
  done
}

now() { date +%s.%N; }

# event JSON: one line in events.jsonl
event() { echo "$1" >>"$RES/events.jsonl"; }

start_mirror() {
  PT_PORT=${PT_PORT:-$(free_port)}
  # No access log: a line per request is about 1.4 GB per 10 minutes of this load.
  PULLTHROUGH_LOG=${PULLTHROUGH_LOG:-info,pullthrough::access=warn} start_pullthrough "$RUN/cache" "$PT_PORT" "http://127.0.0.1:$PROXY_PORT" --tag-ttl 5s
  MIRROR_PID=$LAST_PID
  echo "$MIRROR_PID" >"$RUN/mirror.pid"
  mv "$RUN/cache.log" "$RES/mirror.$MIRROR_PID.log"
  event "{\"t\": $(now), \"kind\": \"start\", \"pid\": $MIRROR_PID}"
}

# Every 10 s: time pid rss_kib fds threads.
sampler() {
  local pid rss thr fds
  while true; do
    pid=$(cat "$RUN/mirror.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
      thr=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
      fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
      [ -n "$rss" ] && echo "$(now) $pid $rss $fds $thr" >>"$RES/samples.tsv"
    fi
    sleep 10
  done
}

# get KIND PATH SHA256 [curl args]: one client's GET, retried up to 8 times 1 s apart; every
# attempt is an event, and a 200 counts only with the right sha256.
get() {
  local kind=$1 path=$2 want=$3; shift 3
  local try code rc sha bytes out
  out=$(mktemp "$RUN/body.XXXXXX")
  for try in $(seq 8); do
    rc=0
    code=$(curl -sS -o "$out" -w '%{http_code}' --max-time 120 "$@" "http://127.0.0.1:$PT_PORT$path" 2>>"$RES/curl.err") || rc=$?
    bytes=$(stat -c %s "$out" 2>/dev/null || echo 0)
    sha=$(sha256sum "$out" | cut -d' ' -f1)
    local ok=false; [ "$rc" = 0 ] && [ "$code" = 200 ] && [ "$sha" = "$want" ] && ok=true
    event "{\"t\": $(now), \"kind\": \"$kind\", \"path\": \"$path\", \"try\": $try, \"status\": ${code:-0}, \"curl_rc\": $rc, \"bytes\": $bytes, \"verified\": $ok, \"sha_mismatch\": $( [ "$rc" = 0 ] && [ "$code" = 200 ] && [ "$sha" != "$want" ] && echo true || echo false)}"
    $ok && break
    [ "$try" -lt 8 ] && sleep 1
  done
  event "{\"t\": $(now), \"kind\": \"client\", \"of\": \"$kind\", \"path\": \"$path\", \"tries\": $try, \"verified\": $ok}"
  rm -f "$out"
}

wrk_hits() { # PATH [wrk args]
  local path=$1; shift
  run_child wrk -t 1 -c 16 -d 6s --timeout 30s -s "$TOOLS/wrk-json.lua" "$@" "http://127.0.0.1:$PT_PORT$path" \
    >"$RUN/wrk.txt" 2>&1 || true
  event "{\"t\": $(now), \"kind\": \"wrk\", \"path\": \"$path\", \"result\": $(sed -n 's/^WRKJSON //p' "$RUN/wrk.txt" | grep . || echo null)}"
}

h2_hits() { # PATH [h2load args]
  local path=$1; shift
  run_child h2load -t 1 -c 8 -m 8 -D 4 -T 30 "$@" "http://127.0.0.1:$PT_PORT$path" >"$RUN/h2load.txt" 2>&1 || true
  event "{\"t\": $(now), \"kind\": \"h2load\", \"path\": \"$path\", \"result\": $(python3 "$TOOLS/h2load-json.py" <"$RUN/h2load.txt" 2>/dev/null || echo null)}"
}

slow_readers() {
  python3 "$TOOLS/slowreaders.py" "http://127.0.0.1:$PT_PORT/v2/$REPO/blobs/$(seed_get blobs.big.digest)" \
    -n 32 --seconds 15 >"$RUN/slow.json" 2>&1 || true
  event "{\"t\": $(now), \"kind\": \"slow\", \"result\": $(grep '^{' "$RUN/slow.json" || echo null)}"
}

# The HTTP/2 memory attack (see the header), with the mirror's RSS and open files sampled every
# 0.5 s and an HTTP/1.1 client's checked GETs alongside; one "attack" event with the figures.
attack() {
  local path pid flood rss fds peak_rss=0 peak_fds=0 rss0 fds0 rss1 fds1
  path="/v2/$REPO/blobs/$(seed_get blobs.big.digest)"
  pid=$MIRROR_PID
  rss0=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"); fds0=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
  log "soak: the HTTP/2 memory attack (1,000 connections x 100 never-read streams, 30 s)"
  python3 "$TOOLS/h2flood.py" 127.0.0.1 "$PT_PORT" "$path" --connections 1000 --addresses 4 \
    --streams 100 --seconds 30 >"$RES/flood.json" 2>&1 &
  flood=$!
  PIDS+=("$flood")
  while kill -0 "$flood" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    [ "${rss:-0}" -gt "$peak_rss" ] && peak_rss=$rss
    [ "$fds" -gt "$peak_fds" ] && peak_fds=$fds
    get attack_h1 "/v2/$REPO/blobs/$(seed_get blobs.small.digest)" "$(seed_get blobs.small.digest | cut -d: -f2)"
    sleep 0.5
  done
  wait "$flood" || true
  forget_pid "$flood"
  sleep 15  # the periodic trim returns freed memory within 10 s
  rss1=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"); fds1=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
  event "{\"t\": $(now), \"kind\": \"attack\", \"pid\": $pid, \"rss_before_kib\": $rss0, \"rss_peak_kib\": $peak_rss, \"rss_after_kib\": $rss1, \"fds_before\": $fds0, \"fds_peak\": $peak_fds, \"fds_after\": $fds1, \"flood\": $(grep '^{' "$RES/flood.json" || echo null)}"
}

one_round() {
  local r=$1 size name seedf digest hex mdigest pids=()
  name=cold$r; size=$(( r % 2 ? 8 : 1 ))MiB
  seedf=$RES/seed-$r.json
  python3 "$TOOLS/seed.py" --registry "127.0.0.1:$UP_PORT" --repo "$REPO" --tag "r$r" --dir "$RUN/blobs" \
    "$name=$size" >"$seedf" || die "seeding round $r failed"
  digest=$(SEED=$seedf seed_get "blobs.$name.digest"); hex=${digest#sha256:}
  mdigest=$(SEED=$seedf seed_get manifest.digest)
  # Cold: 3 clients at once on the new blob, one on the new manifest by tag.
  for _ in 1 2; do get cold_blob "/v2/$REPO/blobs/$digest" "$hex" & pids+=($!); done
  get cold_blob_h2 "/v2/$REPO/blobs/$digest" "$hex" --http2-prior-knowledge & pids+=($!)
  get cold_manifest "/v2/$REPO/manifests/r$r" "${mdigest#sha256:}" -H "$ACCEPT" & pids+=($!)
  if [ $(( r % 3 )) = 1 ]; then slow_readers & pids+=($!); fi
  # Hits over HTTP/1.1, then checked bodies.
  wrk_hits "/v2/$REPO/manifests/$(seed_get manifest.digest)" -H "$ACCEPT"
  wrk_hits "/v2/$REPO/blobs/$(seed_get blobs.small.digest)"
  get hit "/v2/$REPO/blobs/$(seed_get blobs.small.digest)" "$(seed_get blobs.small.digest | cut -d: -f2)"
  get hit "/v2/$REPO/blobs/$(seed_get blobs.mid.digest)" "$(seed_get blobs.mid.digest | cut -d: -f2)"
  get hit "/v2/$REPO/manifests/v1" "$(seed_get manifest.digest | cut -d: -f2)" -H "$ACCEPT"
  get hit "/v2/$REPO/manifests/r$(( r > 1 ? r - 1 : r ))" "$(SEED=$RES/seed-$(( r > 1 ? r - 1 : r )).json seed_get manifest.digest | cut -d: -f2)" -H "$ACCEPT"
  # Hits over HTTP/2.
  h2_hits "/v2/$REPO/manifests/$(seed_get manifest.digest)" -H "$ACCEPT"
  get h2_hit "/v2/$REPO/blobs/$(seed_get blobs.small.digest)" "$(seed_get blobs.small.digest | cut -d: -f2)" --http2-prior-knowledge
  get h2_hit "/v2/$REPO/blobs/$(seed_get blobs.mid.digest)" "$(seed_get blobs.mid.digest | cut -d: -f2)" --http2-prior-knowledge
  get h2_hit "/v2/$REPO/manifests/v1" "$(seed_get manifest.digest | cut -d: -f2)" -H "$ACCEPT" --http2-prior-knowledge
  local p; for p in "${pids[@]}"; do wait "$p" || true; done
}

main() {
  parse_args "$@"
  need_pkgs python3 curl wrk docker-registry nghttp2-client
  have wrk || die "wrk is not installed"
  have h2load || die "h2load (nghttp2-client) is not installed"
  have docker-registry || die "docker-registry (the upstream) is not installed"
  setup_run
  RES=$RUN/results
  mkdir -p "$RES"
  build_pullthrough
  cp "$PT_BIN" "$RUN/pullthrough"  # a rebuild during the run must not change the restarted binary
  PT_BIN=$RUN/pullthrough
  UP_PORT=$(free_port); PROXY_PORT=$(free_port)
  seed_upstream "$RUN/upstream" "$UP_PORT" small=1MiB mid=8MiB big=64MiB
  start_throttle "$RES/throttle.log" "$PROXY_PORT" "$UP_PORT" 0
  # start_throttle has no fault flags: restart it with them.
  stop_pid "$LAST_PID"
  spawn "$RES/throttle.log" python3 "$TOOLS/throttle.py" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$UP_PORT" \
    --cut "$CUT" --r429 "$R429" --fault-paths '/(blobs|manifests)/' --seed 18
  wait_http "http://127.0.0.1:$PROXY_PORT/_throttle/stats"
  start_mirror
  local t0 end half warmup restarted=0 r=0 name
  # Warm the cache with the base image (through the faults, so with retries).
  for name in small mid big; do
    get warm "/v2/$REPO/blobs/$(seed_get "blobs.$name.digest")" "$(seed_get "blobs.$name.digest" | cut -d: -f2)"
  done
  get warm "/v2/$REPO/manifests/v1" "$(seed_get manifest.digest | cut -d: -f2)" -H "$ACCEPT"
  get warm "/v2/$REPO/manifests/$(seed_get manifest.digest)" "$(seed_get manifest.digest | cut -d: -f2)" -H "$ACCEPT"
  cp "$SEED" "$RES/seed-0.json"
  t0=$(date +%s); end=$(( t0 + MINUTES * 60 )); half=$(( t0 + MINUTES * 30 ))
  local third=$(( t0 + MINUTES * 20 )) attacked=$(( 1 - ATTACK ))
  warmup=$(( MINUTES * 12 < 120 ? MINUTES * 12 : 120 ))
  echo "{\"minutes\": $MINUTES, \"cut\": $CUT, \"r429\": $R429, \"warmup_s\": $warmup, \"t0\": $t0}" >"$RES/run.json"
  spawn "$RES/sampler.log" sampler
  log "soak: $MINUTES minutes of mixed load on pullthrough (pid $MIRROR_PID, port $PT_PORT)"
  while [ "$(date +%s)" -lt "$end" ]; do
    r=$(( r + 1 ))
    if [ "$attacked" = 0 ] && [ "$(date +%s)" -ge "$third" ]; then
      attack
      attacked=1
    fi
    if [ "$restarted" = 0 ] && [ "$(date +%s)" -ge "$half" ]; then
      log "soak: restarting the mirror"
      event "{\"t\": $(now), \"kind\": \"stop\", \"pid\": $MIRROR_PID}"
      stop_pid "$MIRROR_PID"
      start_mirror
      restarted=1
    fi
    log "soak: round $r ($(( ($(date +%s) - t0) / 60 )) of $MINUTES min)"
    one_round "$r"
  done
  sleep 10  # one more sample after the last round
  curl -s "http://127.0.0.1:$PROXY_PORT/_throttle/stats" >"$RES/throttle.json"
  curl -s "http://127.0.0.1:$PT_PORT/metrics" >"$RES/metrics.txt" || true
  python3 "$TOOLS/report.py" soak "$RES"
}

main "$@"
