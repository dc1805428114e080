#!/usr/bin/env bash
# Cluster suite: three pullthrough replicas sharing one Garage node (the S3 tier) and one
# redis-server (leases), in front of a real registry (CNCF distribution) behind front.py,
# which counts every upstream body and its bytes, notes the time of its first byte, and caps
# the bandwidth so a 256 MiB transfer takes several seconds. All on loopback.
#
#   tests/cluster/run.sh            (as root: the clients phase runs private dockerd/containerd)
#   tests/cluster/run.sh --install  only install redis-server (apt) and Garage $GARAGE_VERSION
#                                   (cargo install into $GARAGE_ROOT, reused when present)
#
# Phases, each on a fresh Garage, Redis, front and replicas (empty disks):
#   fanout    24 clients (8 per replica) GET one cold 256 MiB blob at once: the upstream sends
#             one body and answers no HEAD for it; every body verifies; clients of the
#             non-leader replicas get their first byte within 50 ms of the upstream's first byte.
#   takeover  the lease holder is killed (kill -9) once the upstream has sent 40 % of the blob:
#             every client of the other replicas still gets the whole, correct blob, and the
#             upstream sent at most 2 x the blob's size.
#   fourth    a fourth replica with an empty disk serves an image pulled earlier through the
#             others (skopeo) with zero upstream requests.
#   redis     redis-server stopped mid-download: pulls keep succeeding, and new ones too;
#             restarted: coordinator_up is 1 again within 20 s, and coordination resumes (the
#             next cold blob, and the one after, are fetched once each).
#   clients   dockerd through replica 1, containerd through replica 2 and skopeo through
#             replica 3 pull one cold multi-arch image at once: one upstream body per blob,
#             the upstream's digests.
# PHASES="fanout takeover" runs only those. Ends with a pass/fail table and exits non-zero if
# a check failed. Everything lives under one mktemp dir and every process started is stopped
# on exit. KEEP_TMP=1 keeps the dir; on failure its logs/ are kept.
# Env: PT_BIN (a pullthrough binary; default: cargo build --release), RATE (the upstream's
# cap per body, default 32MiB per second), GARAGE_ROOT.
set -euo pipefail

CLUSTER=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$CLUSTER/../.." && pwd)
# tests/clients' helpers (services.sh, clients.sh) find their own files through HERE.
HERE=$ROOT/tests/clients
RATE=${RATE:-32MiB}
FANOUT_CLIENTS=8     # per replica
BIG=big:v1           # one 256 MiB layer
SMALL=multi-oci:v1   # two platforms, two small layers each
REDIS_IMAGES=(redis-a:v1 redis-b:v1 redis-c:v1 redis-d:v1)

# shellcheck source=tests/clients/services.sh
. "$HERE/services.sh"
# shellcheck source=tests/clients/clients.sh
. "$HERE/clients.sh"
# shellcheck source=tests/cluster/components.sh
. "$CLUSTER/components.sh"

cluster_spawn() { spawn "$@"; }
cluster_alive() { kill -0 "${PID[$1]:-0}" 2>/dev/null; }
util() { python3 "$HERE/util.py" "$@"; }
check() { python3 "$CLUSTER/check.py" "$@"; }

# --- setup ------------------------------------------------------------------------------
need_commands() {
  local c missing=()
  for c in docker-registry skopeo redis-server redis-cli curl python3 dockerd containerd ctr; do
    command -v "$c" >/dev/null || missing+=("$c")
  done
  [ ${#missing[@]} -eq 0 ] || { log "missing ${missing[*]}: run tests/clients/run.sh --install and $0 --install"; exit 2; }
  find_garage || { log "no garage $GARAGE_VERSION: run $0 --install"; exit 2; }
}

build_pullthrough() {
  if [ -n "${PT_BIN:-}" ]; then return; fi
  (cd "$ROOT" && cargo build --release --quiet)
  PT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pullthrough
}

print_versions() {
  {
    echo "garage:          $("$GARAGE_BIN" --version | head -1)"
    echo "redis-server:    $(redis-server --version)"
    echo "docker-registry: $(docker-registry --version)"
    echo "skopeo:          $(skopeo --version)"
    echo "pullthrough:     $("$PT_BIN" --version)"
  } | tee "$T/versions.txt"
}

# record CLIENT IMAGE CHECK PASS|FAIL|SKIP DETAIL (the table of tests/clients/util.py)
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$T/results.tsv"
  log "$4  $1 $2: $3 ${5:+($5)}"
}

# --- the upstream and its images -----------------------------------------------------------
declare -A DIGEST=()   # image -> manifest digest as the upstream serves it
declare -A LAYER=()    # image -> "digest size" of its largest blob

seed_upstream() {
  local ports
  read -r -a ports < <(util ports 9)
  UP_PORT=${ports[0]} FRONT_PORT=${ports[1]} S3_PORT=${ports[2]} RPC_PORT=${ports[3]} REDIS_PORT=${ports[4]}
  RPORTS=("${ports[@]:5}")   # the replicas'; the same ports in every phase
  start_registry upstream "$UP_PORT"
  setup_skopeo
  local mk=(python3 "$HERE/mkimage.py" "$T/oci") image
  "${mk[@]}" big --layers 1 --layer-size 256MiB --gzip-level 0 >/dev/null
  "${mk[@]}" multi-oci --arch amd64 --arch arm64 >/dev/null
  for image in "${REDIS_IMAGES[@]}"; do "${mk[@]}" "${image%%:*}" --layers 1 --layer-size 64MiB --gzip-level 0 >/dev/null; done
  for image in "$BIG" "$SMALL" "${REDIS_IMAGES[@]}"; do
    "${SKOPEO[@]}" copy -q --all --dest-tls-verify=false "oci:$T/oci:${image%%:*}" "docker://127.0.0.1:$UP_PORT/library/$image"
    DIGEST[$image]="sha256:$("${SKOPEO[@]}" inspect --raw --tls-verify=false "docker://127.0.0.1:$UP_PORT/library/$image" | sha256sum | cut -d' ' -f1)"
    LAYER[$image]=$(check largest-blob "$T/oci" "${DIGEST[$image]}")
    log "upstream has library/$image ${DIGEST[$image]}"
  done
}

# --- the cluster, fresh for each phase ----------------------------------------------------------
REPLICAS=()   # names of the replicas running, in order

# start_cluster PHASE: fresh Garage, Redis, front (its log in logs/PHASE-front-requests.jsonl)
# and three replicas PHASE-r1..3 with empty disks; replica i listens on RPORTS[i-1].
start_cluster() {
  PHASE=$1
  local i
  start_garage "$PHASE-garage" "$T/$PHASE/garage" "$S3_PORT" "$RPC_PORT"
  start_redis "$PHASE-redis" "$REDIS_PORT"
  FRONT_LOG=$T/logs/$PHASE-front-requests.jsonl
  start_front "$PHASE-front" "$FRONT_PORT" "$UP_PORT" --rate "$RATE"
  REPLICAS=()
  for i in 1 2 3; do add_replica "$i"; done
}

add_replica() {
  local i=$1
  start_replica "$PHASE-r$i" "$T/$PHASE/r$i" "${RPORTS[$((i - 1))]}" "http://127.0.0.1:$FRONT_PORT"
  REPLICAS+=("$PHASE-r$i")
}

stop_cluster() {
  local name
  for name in "${REPLICAS[@]}" "$PHASE-front" "$PHASE-redis" "$PHASE-garage"; do stop "$name"; done
  rm -rf "${T:?}/$PHASE"
}

replica_url() { echo "http://127.0.0.1:${RPORTS[$(($1 - 1))]}"; }
replica_metric() { util metric "$(replica_url "$1")/metrics" "${@:2}"; }

# fetch_blob IMAGE REPLICA N OUT AT: N clients GET the image's largest blob from replica
# REPLICA at Unix time AT, each body hashed (bench/tools/fetch.py); the JSON result goes to OUT.
fetch_blob() {
  local image=$1 r=$2 n=$3 out=$4 at=$5 digest size
  read -r digest size <<<"${LAYER[$image]}"
  python3 "$ROOT/bench/tools/fetch.py" "$(replica_url "$r")/v2/library/${image%%:*}/blobs/$digest" -n "$n" \
    --sha256 "${digest#sha256:}" --size "$size" --deadline 240 --at "$at" >"$out" 2>>"$T/logs/fetch.log" || true
}

# fetch_everywhere IMAGE N TAG: fetch_blob on every running replica, N clients each, all
# released at the same moment (2 s from now, time for every fetch.py to start and connect), in
# the background (stopped on exit like every other process); results in $T/TAG-rI.json.
fetch_everywhere() {
  local image=$1 n=$2 tag=$3 i at
  at=$(python3 -c 'import time; print(time.time() + 2)')
  FETCHES=()
  for i in $(seq ${#REPLICAS[@]}); do
    fetch_blob "$image" "$i" "$n" "$T/$tag-r$i.json" "$at" &
    PID[fetch-$tag-r$i]=$!
    FETCHES+=("fetch-$tag-r$i")
  done
}

wait_fetches() {
  local name
  for name in "${FETCHES[@]}"; do wait "${PID[$name]}" || true; unset "PID[$name]"; done
}

# leader: the index of the one replica that asked the upstream for the blob ("" if none, or
# several), from the replicas' own counters.
leader() {
  local i found=
  for i in $(seq ${#REPLICAS[@]}); do
    cluster_alive "${REPLICAS[$((i - 1))]}" || continue
    if [ "$(replica_metric "$i" pullthrough_upstream_requests_total kind=blob_get)" != 0 ]; then
      [ -z "$found" ] || { echo ""; return; }
      found=$i
    fi
  done
  echo "$found"
}

# --- phase: fan-out ------------------------------------------------------------------------
phase_fanout() {
  log "== phase fanout: $((3 * FANOUT_CLIENTS)) clients, one cold 256 MiB blob, 3 replicas"
  start_cluster fanout
  fetch_everywhere "$BIG" "$FANOUT_CLIENTS" fanout
  wait_fetches
  sleep 0.5   # the front writes its log line when a body ends
  check fanout "$T/results.tsv" "$BIG" "$FRONT_LOG" "${LAYER[$BIG]}" "$(leader)" "$T"/fanout-r{1,2,3}.json
  # Heartbeats every 5 s: within three periods every replica knows the other two.
  check members "$T/results.tsv" 3 15 "$(replica_url 1)" "$(replica_url 2)" "$(replica_url 3)"
  stop_cluster
}

# --- phase: the lease holder dies ------------------------------------------------------------
phase_takeover() {
  log "== phase takeover: the lease holder is killed at 40 % of the blob"
  # One stream: the kill waits for one upstream body to reach 40 % (a download in parts
  # would spread the blob over four bodies).
  REPLICA_PARTS=1 start_cluster takeover
  local size lead= victim at=
  size=${LAYER[$BIG]#* }
  fetch_everywhere "$BIG" "$FANOUT_CLIENTS" takeover
  local pids=() i
  for i in 1 2 3; do pids+=("${PID[${REPLICAS[$((i - 1))]}]}=$(replica_url "$i")"); done
  if ! read -r lead at < <(check kill-leader-at "http://127.0.0.1:$FRONT_PORT" $((size * 4 / 10)) 120 "${pids[@]}"); then
    record cluster "$BIG" "lease holder killed at 40 %" FAIL "no single lease holder, or the upstream never reached 40 %"
    wait_fetches; stop_cluster; return
  fi
  victim=${REPLICAS[$((lead - 1))]}
  record cluster "$BIG" "lease holder killed at 40 %" PASS "r$lead (kill -9) at $((at * 100 / size)) % of the upstream body"
  wait "${PID[$victim]}" 2>/dev/null || true
  unset "PID[$victim]"
  wait_fetches
  sleep 0.5
  check takeover "$T/results.tsv" "$BIG" "$FRONT_LOG" "${LAYER[$BIG]}" "$lead" "$T"/takeover-r{1,2,3}.json
  stop_cluster
}

# --- phase: a fourth replica with an empty disk ---------------------------------------------
phase_fourth() {
  log "== phase fourth: an empty fourth replica serves an image pulled through the others"
  start_cluster fourth
  local i got before after
  for i in 1 2 3; do
    MIRROR=127.0.0.1:${RPORTS[$((i - 1))]}
    if ! got=$(pull_skopeo "$SMALL" "$T/skopeo/fourth-$i" 2>"$T/err"); then
      record skopeo "$SMALL" "pull through replica $i" FAIL "$(tail -1 "$T/err")"
    elif [ "$got" = "${DIGEST[$SMALL]}" ]; then
      record skopeo "$SMALL" "pull through replica $i" PASS "$(short "$got")"
    else
      record skopeo "$SMALL" "pull through replica $i" FAIL "got $got, upstream has ${DIGEST[$SMALL]}"
    fi
  done
  # Publication to the shared tier follows the verified download; give it a moment to land.
  wait_until 10 check front-idle "http://127.0.0.1:$FRONT_PORT"
  sleep 2
  add_replica 4
  before=$(util front "$FRONT_LOG" requests)
  MIRROR=127.0.0.1:${RPORTS[3]}
  if ! got=$(pull_skopeo "$SMALL" "$T/skopeo/fourth-4" 2>"$T/err"); then
    record skopeo "$SMALL" "pull through the fourth replica" FAIL "$(tail -1 "$T/err")"
  elif [ "$got" = "${DIGEST[$SMALL]}" ]; then
    record skopeo "$SMALL" "pull through the fourth replica" PASS "$(short "$got")"
  else
    record skopeo "$SMALL" "pull through the fourth replica" FAIL "got $got, upstream has ${DIGEST[$SMALL]}"
  fi
  sleep 0.5
  after=$(util front "$FRONT_LOG" requests)
  local shared peer
  shared=$(replica_metric 4 pullthrough_blob_source_total source=shared)
  peer=$(replica_metric 4 pullthrough_blob_source_total source=peer)
  local detail="upstream requests +$((after - before)) ($(check front-paths "$FRONT_LOG" "$before")); replica 4 blob sources: shared $shared, peer $peer"
  if [ "$after" -eq "$before" ] && [ "$shared" -gt 0 ]; then
    record cluster "$SMALL" "fourth replica: 0 upstream requests" PASS "$detail"
  else
    record cluster "$SMALL" "fourth replica: 0 upstream requests" FAIL "$detail"
  fi
  stop_cluster
}

# --- phase: Redis goes away and comes back ---------------------------------------------------
phase_redis() {
  log "== phase redis: redis-server stopped mid-download, then restarted"
  start_cluster redis
  local a=${REDIS_IMAGES[0]} b=${REDIS_IMAGES[1]} c=${REDIS_IMAGES[2]} d=${REDIS_IMAGES[3]} size i up at
  size=${LAYER[$a]#* }
  fetch_everywhere "$a" 2 redis-a
  at=$(check wait-progress "http://127.0.0.1:$FRONT_PORT" $((size / 4)) 60 || true)
  log "stopping redis-server once the upstream had sent $at of $size bytes"
  stop "$PHASE-redis"
  wait_fetches
  check clients-ok "$T/results.tsv" "$a" "pull while Redis stops" "$T"/redis-a-r{1,2,3}.json

  fetch_everywhere "$b" 2 redis-b
  wait_fetches
  check clients-ok "$T/results.tsv" "$b" "cold pull with Redis down" "$T"/redis-b-r{1,2,3}.json
  up=$(for i in 1 2 3; do replica_metric "$i" pullthrough_cluster_coordinator_up; done | tr '\n' ' ')
  if [ "$up" = "0 0 0 " ]; then
    record cluster - "coordinator_up = 0 while Redis is down" PASS "replicas: $up"
  else
    record cluster - "coordinator_up = 0 while Redis is down" FAIL "replicas: $up"
  fi

  start_redis "$PHASE-redis" "$REDIS_PORT"
  # Heartbeats (every 5 s) find Redis again without any client traffic.
  if wait_until 20 all_coordinators_up; then
    record cluster - "coordinator_up = 1 within 20 s of the restart" PASS "on all 3 replicas"
  else
    record cluster - "coordinator_up = 1 within 20 s of the restart" FAIL "coordinator_up: $(for i in 1 2 3; do replica_metric "$i" pullthrough_cluster_coordinator_up; done | tr '\n' ' ')"
  fi
  sleep 0.5
  local mark
  mark=$(util front "$FRONT_LOG" requests)
  fetch_everywhere "$c" 2 redis-c
  wait_fetches
  sleep 0.5
  check clients-ok "$T/results.tsv" "$c" "cold pull after Redis is back" "$T"/redis-c-r{1,2,3}.json
  check one-body "$T/results.tsv" "$FRONT_LOG" "$mark" "${LAYER[$c]}" "$c" "after Redis is back: 1 upstream body"
  # A second one tells a first request that finds the reconnection apart from no coordination.
  mark=$(util front "$FRONT_LOG" requests)
  fetch_everywhere "$d" 2 redis-d
  wait_fetches
  sleep 0.5
  check clients-ok "$T/results.tsv" "$d" "second cold pull after Redis is back" "$T"/redis-d-r{1,2,3}.json
  check one-body "$T/results.tsv" "$FRONT_LOG" "$mark" "${LAYER[$d]}" "$d" "second blob after Redis is back: 1 upstream body"
  stop_cluster
}

# blob_sources: per replica, its responses' pullthrough_blob_source_total by tier.
blob_sources() {
  local i t out=()
  for i in $(seq ${#REPLICAS[@]}); do
    local line="r$i"
    for t in local shared peer upstream; do line+=" $t $(replica_metric "$i" pullthrough_blob_source_total "source=$t")"; done
    out+=("$line")
  done
  local IFS=';'; echo "${out[*]}"
}

all_coordinators_up() {
  local i
  for i in 1 2 3; do [ "$(replica_metric "$i" pullthrough_cluster_coordinator_up)" = 1 ] || return 1; done
}

# --- phase: real clients through different replicas -------------------------------------------
phase_clients() {
  log "== phase clients: dockerd via r1, containerd via r2, skopeo via r3, one cold image at once"
  start_cluster clients
  # clients.sh renders each client's config with $MIRROR at the time it starts.
  MIRROR=127.0.0.1:${RPORTS[0]} start_dockerd
  MIRROR=127.0.0.1:${RPORTS[1]} start_containerd
  local client p=()
  mkdir -p "$T/conc"
  for client in docker containerd skopeo; do
    (
      case $client in docker) MIRROR=127.0.0.1:${RPORTS[0]} ;; containerd) MIRROR=127.0.0.1:${RPORTS[1]} ;; *) MIRROR=127.0.0.1:${RPORTS[2]} ;; esac
      "pull_$client" "$SMALL" >"$T/conc/$client.digest" 2>"$T/conc/$client.err"
    ) &
    p+=($!)
  done
  for client in "${p[@]}"; do wait "$client" || true; done
  for client in docker containerd skopeo; do
    local got
    got=$(cat "$T/conc/$client.digest" 2>/dev/null || true)
    if [ "$got" = "${DIGEST[$SMALL]}" ]; then
      record "$client" "$SMALL" "concurrent cold pull" PASS "$(short "$got")"
    else
      record "$client" "$SMALL" "concurrent cold pull" FAIL "got '${got}': $(grep -v '^\s*$' "$T/conc/$client.err" | tail -1 | cut -c1-160)"
    fi
  done
  sleep 0.5
  check one-body-per-blob "$T/results.tsv" "$FRONT_LOG" "$SMALL" "blob sources: $(blob_sources)"
  stop dockerd; stop docker-containerd; stop containerd
  stop_cluster
}

short() { echo "${1:7:12}"; }

# --- main -------------------------------------------------------------------------------
main() {
  local started=$SECONDS
  if [ "${1:-}" = --install ]; then install_cluster_components; return; fi
  [ "$(id -u)" = 0 ] || { echo "run.sh needs root (private dockerd/containerd)" >&2; exit 2; }
  need_commands
  build_pullthrough
  make_workdir ptcluster
  print_versions
  seed_upstream
  local phase
  for phase in ${PHASES:-fanout takeover fourth redis clients}; do "phase_$phase"; done
  stop_all
  local status=0
  util table "$T/results.tsv" || status=1
  cat "$T/versions.txt"
  echo "total time: $((SECONDS - started))s ($(nproc) cores)"
  [ "$status" -eq 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
  return "$status"
}

main "$@"
