#!/usr/bin/env bash
# Single-flight benchmark: N concurrent cold clients pull the same big blob through a mirror
# whose upstream is bandwidth-capped, for pullthrough, nginx proxy_cache + proxy_cache_lock and
# registry:2 proxy mode (docker-registry with proxy.remoteurl), all in one run.
#
#   bench/singleflight.sh [--quick] [--size 256MiB] [--rate auto|32MiB] [--clients "1 8 32"]
#                         [--systems "pullthrough nginx registry"]
#
# For each system and each N it starts a fresh cache and a fresh capped upstream
# (tools/throttle.py in front of a plain docker-registry holding the blob), releases N
# clients at once (tools/fetch.py verifies every body's sha256), and prints per row: upstream
# GETs, upstream bytes / blob size, the slowest client's wall time, its ratio to the same
# system's 1-client time, and time to first body byte. The upstream's own TTFB is measured
# directly for reference.
#
# --rate auto (default) picks the highest cap (at most 200 MiB/s) at which this machine can
# still deliver N_max x cap with 30% headroom, measured first as nginx serving the blob as a
# static file to N_max clients ("ceiling"): above it, the N_max row would measure the machine,
# not the mirror. pullthrough's N_max clients are also run a second time from its warm cache,
# the most it can deliver on this machine. --quick: a 64 MiB blob.
# Env: PULLTHROUGH_BIN (skip cargo build), BENCH_KEEP=1 (keep the temp dir with all logs).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SIZE=256MiB
RATE=auto
CLIENTS="1 8 32"
SYSTEMS="pullthrough nginx registry"
HEADROOM=1.3
MiB=1048576

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --quick) SIZE=64MiB ;;
      --size) SIZE=$2; shift ;;
      --rate) RATE=$2; shift ;;
      --clients) CLIENTS=$2; shift ;;
      --systems) SYSTEMS=$2; shift ;;
      -h|--help) usage 0 ;;
      *) log "unknown argument $1"; usage 2 >&2 ;;
    esac
    shift
  done
}

max_clients() { tr ' ' '\n' <<<"$CLIENTS" | sort -n | tail -1; }

# The blob as a static file under ROOT at the registry path, for nginx.
static_root() {
  local root=$1
  mkdir -p "$root/v2/library/bench/blobs"
  ln -f "$(seed_get blobs.big.path)" "$root/v2/library/bench/blobs/$DIGEST" 2>/dev/null ||
    cp "$(seed_get blobs.big.path)" "$root/v2/library/bench/blobs/$DIGEST"
}

# What this machine can deliver to N_max hashing clients at best: nginx sendfile of the file
# (or warm pullthrough when nginx is missing). Sets CEILING (bytes/s) and RATE_BYTES.
calibrate() {
  local n port dir=$RUN/ceiling url
  n=$(max_clients)
  port=$(free_port)
  if have nginx; then
    static_root "$dir/www"
    start_nginx "$dir" "$port" "    root $dir/www;"
    CEILING_BY="nginx static file"
  else
    start_pullthrough "$dir/pt" "$port" "http://127.0.0.1:$UP_PORT"
    curl -s -o /dev/null "http://127.0.0.1:$port$BLOB_PATH"
    CEILING_BY="warm pullthrough"
  fi
  local pid=$LAST_PID
  url="http://127.0.0.1:$port$BLOB_PATH"
  log "ceiling: $n clients reading the blob from $CEILING_BY"
  run_child python3 "$TOOLS/fetch.py" "$url" -n "$n" --sha256 "${DIGEST#sha256:}" --size "$BYTES" >"$dir.json" ||
    die "calibration clients failed: $(head -c 300 "$dir.json")"
  stop_pid "$pid"
  CEILING=$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["summary"]["rate"]))' "$dir.json")
  if [ "$RATE" = auto ]; then
    RATE_BYTES=$(python3 -c 'import sys; c,n,h,m=map(float,sys.argv[1:]); print(int(max(1,min(200,c/n/h/m)))*int(m))' \
      "$CEILING" "$n" "$HEADROOM" "$MiB")
  else
    RATE_BYTES=$(python3 -c 'import sys; sys.path.insert(0,sys.argv[1]); import throttle; print(throttle.parse_size(sys.argv[2]))' \
      "$TOOLS" "$RATE")
  fi
  log "ceiling $((CEILING / MiB)) MiB/s for $n clients; upstream cap $((RATE_BYTES / MiB)) MiB/s"
  printf '{"ceiling": %s, "ceiling_by": "%s", "ceiling_clients": %s, "rate": %s, "rate_mode": "%s"}\n' \
    "$CEILING" "$CEILING_BY" "$n" "$RATE_BYTES" "$RATE" >"$RES/setup.json"
}

# The capped upstream's own time to first body byte: 7 single GETs of the blob's first 64 KiB.
upstream_ttfb() {
  local port i
  port=$(free_port)
  start_throttle "$RUN/throttle-direct.log" "$port" "$UP_PORT" "$RATE_BYTES"
  local pid=$LAST_PID
  for i in $(seq 7); do
    run_child python3 "$TOOLS/fetch.py" "http://127.0.0.1:$port$BLOB_PATH" -H "Range: bytes=0-65535" \
      >"$RES/upstream-ttfb-$i.json" || die "upstream GET failed: $(head -c 300 "$RES/upstream-ttfb-$i.json")"
    sleep 0.2
  done
  stop_pid "$pid"
}

nginx_cache_conf() { # DIR UPSTREAM_PORT: proxy_cache, the lock held for the whole fetch
  cat <<CONF
    location /v2/ {
      proxy_pass http://127.0.0.1:$2;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache blobs;
      proxy_cache_key \$uri;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10m;
      proxy_cache_lock_age 10m;
      proxy_read_timeout 10m;
    }
CONF
}

start_system() { # SYSTEM DIR PORT UPSTREAM_PORT; the server's pid in LAST_PID
  case $1 in
    pullthrough) start_pullthrough "$2" "$3" "http://127.0.0.1:$4" ;;
    nginx) start_nginx "$2" "$3" "$(nginx_cache_conf "$2" "$4")" \
      "  proxy_cache_path $2/cache levels=1:2 keys_zone=blobs:10m max_size=20g inactive=1h use_temp_path=off;" ;;
    registry) start_registry "$2" "$3" "http://127.0.0.1:$4" ;;
  esac
}

available() {
  case $1 in
    pullthrough) return 0 ;;
    nginx) have nginx ;;
    registry) have "${REGISTRY_BIN:-docker-registry}" ;;
    *) die "unknown system $1" ;;
  esac
}

wait_upstream_idle() { # THROTTLE_PORT SECONDS: until no body is in transfer
  local _
  for _ in $(seq $(( $2 * 10 ))); do
    curl -s "http://127.0.0.1:$1/_throttle/stats" | grep -q '"active": 0' && return 0
    sleep 0.1
  done
  return 0
}

# One row: SYSTEM N with a fresh cache and fresh upstream counters.
run_one() {
  local sys=$1 n=$2 tport port tpid spid out=$RES/$1-$2 dir=$RUN/$1-$2
  tport=$(free_port)
  port=$(free_port)
  start_throttle "$RUN/throttle-$sys-$n.log" "$tport" "$UP_PORT" "$RATE_BYTES"
  tpid=$LAST_PID
  start_system "$sys" "$dir" "$port" "$tport"
  spid=$LAST_PID
  curl -s -X POST "http://127.0.0.1:$tport/_throttle/reset" >/dev/null
  log "$sys: $n cold client(s)"
  run_child python3 "$TOOLS/fetch.py" "http://127.0.0.1:$port$BLOB_PATH" -n "$n" --deadline "$DEADLINE" \
    --sha256 "${DIGEST#sha256:}" --size "$BYTES" >"$out.fetch.json" || true
  wait_upstream_idle "$tport" 5
  curl -s "http://127.0.0.1:$tport/_throttle/stats" >"$out.upstream.json"
  if [ "$sys" = pullthrough ]; then
    curl -s "http://127.0.0.1:$port/metrics" >"$out.metrics.txt"
    # The same clients again, now from the cache: the most this machine lets pullthrough deliver.
    if [ "$n" = "$(max_clients)" ]; then
      log "pullthrough: $n clients again, warm"
      run_child python3 "$TOOLS/fetch.py" "http://127.0.0.1:$port$BLOB_PATH" -n "$n" --deadline "$DEADLINE" \
        --sha256 "${DIGEST#sha256:}" --size "$BYTES" >"$RES/pullthrough-warm.fetch.json" || true
    fi
  fi
  stop_pid "$spid"
  stop_pid "$tpid"
  rm -rf "$dir/data" "$dir/cache" "$dir/blobs" "$dir/tmp"
}

main() {
  parse_args "$@"
  need_pkgs python3 curl docker-registry nginx
  have docker-registry || die "docker-registry (the upstream) is not installed"
  setup_run
  RES=$RUN/results
  mkdir -p "$RES"
  build_pullthrough
  other_load start
  seed_upstream "$RUN/upstream" "$(free_port)" "big=$SIZE"
  DIGEST=$(seed_get blobs.big.digest)
  BYTES=$(seed_get blobs.big.size)
  BLOB_PATH=/v2/library/bench/blobs/$DIGEST
  calibrate
  DEADLINE=$(( BYTES * 5 / 2 / RATE_BYTES + 5 ))
  echo "{\"size\": $BYTES, \"deadline\": $DEADLINE, \"clients\": \"$CLIENTS\", \"systems\": \"$SYSTEMS\"}" >"$RES/run.json"
  upstream_ttfb
  local sys n
  for sys in $SYSTEMS; do
    if ! available "$sys"; then log "$sys is not installed: skipped"; continue; fi
    for n in $CLIENTS; do run_one "$sys" "$n"; done
  done
  other_load end "$RES/load.json"
  python3 "$TOOLS/report.py" singleflight "$RES"
}

main "$@"
