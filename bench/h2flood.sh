#!/usr/bin/env bash
# HTTP/2 memory under clients that never read (issue 24, item 1): --connections h2c connections
# from --addresses loopback addresses, each with --streams GETs of a cached 64 MiB blob, never
# read, held for --seconds, then closed. Reports the server's resident memory before, at its
# peak under the attack (sampled every 0.2 s), and 15 s after the clients left (time for the
# periodic trim), with the response buffer metrics. The target: peak under 256 MiB.
#
#   bench/h2flood.sh [--connections 1000] [--addresses 4] [--streams 100] [--seconds 20]
#
# Env: PULLTHROUGH_BIN (skip cargo build), BENCH_KEEP=1 (keep the temp dir with all logs).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CONNECTIONS=1000
ADDRESSES=4
STREAMS=100
SECONDS_HELD=20

while [ $# -gt 0 ]; do
  case $1 in
    --connections) CONNECTIONS=$2; shift ;;
    --addresses) ADDRESSES=$2; shift ;;
    --streams) STREAMS=$2; shift ;;
    --seconds) SECONDS_HELD=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
metric() { # NAME: the sum of the series of NAME in /metrics
  curl -sf "http://127.0.0.1:$PORT/metrics" |
    awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d", s }'
}

main() {
  need_pkgs python3 curl docker-registry
  setup_run
  build_pullthrough
  seed_upstream "$RUN/upstream" "$(free_port)" mid=64MiB
  PORT=$(free_port)
  start_pullthrough "$RUN/pullthrough" "$PORT" "http://127.0.0.1:$UP_PORT"
  local pid=$LAST_PID path
  path="/v2/library/bench/blobs/$(seed_get blobs.mid.digest)"
  curl -sf -o /dev/null "http://127.0.0.1:$PORT$path" || die "warming the blob failed"
  local before peak=0 r
  before=$(rss_kib "$pid")
  log "attack: $CONNECTIONS connections from $ADDRESSES addresses x $STREAMS never-read streams, ${SECONDS_HELD}s"
  python3 "$TOOLS/h2flood.py" 127.0.0.1 "$PORT" "$path" --connections "$CONNECTIONS" \
    --addresses "$ADDRESSES" --streams "$STREAMS" --seconds "$SECONDS_HELD" >"$RUN/flood.json" &
  local flood=$!
  PIDS+=("$flood")
  local buffered=0 b
  while kill -0 "$flood" 2>/dev/null; do
    r=$(rss_kib "$pid"); [ "$r" -gt "$peak" ] && peak=$r
    b=$(metric pullthrough_response_buffer_bytes 2>/dev/null || echo 0); [ "${b:-0}" -gt "$buffered" ] && buffered=$b
    sleep 0.2
  done
  wait "$flood" || true
  forget_pid "$flood"
  sleep 15
  local after hwm
  after=$(rss_kib "$pid")
  hwm=$(peak_rss_kib "$pid")
  local ok=no; curl -sf -o /dev/null "http://127.0.0.1:$PORT$path" && ok=yes
  printf '{"rss_before_kib": %d, "rss_peak_kib": %d, "vmhwm_kib": %d, "rss_15s_after_kib": %d, "buffered_peak_bytes": %d, "refused_streams": %d, "connections_shed": %d, "served_after": "%s", "attack": %s}\n' \
    "$before" "$peak" "$hwm" "$after" "$buffered" \
    "$(metric pullthrough_client_refusals_total)" "$(metric pullthrough_connections_shed_total)" "$ok" "$(cat "$RUN/flood.json")"
}

main "$@"
