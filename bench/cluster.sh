#!/usr/bin/env bash
# Cluster benchmark: R replicas sharing one Garage node and one Redis (configs rendered from
# examples/cluster/, as tests/cluster/run.sh does) against a single node, both cold, in one run.
#
#   bench/cluster.sh [--quick] [--size 256MiB] [--rate 32MiB] [--replicas 3]
#                    [--clients "3 24"] [--hit-clients 8]
#
# For each N in --clients: a single pullthrough (no shared tier) with N cold clients, then a
# fresh cluster (Garage, Redis, R replicas with empty disks) with the same N clients spread
# evenly over the replicas. The upstream is a plain docker-registry behind tests/clients/
# front.py, capped at --rate per body, which counts every body's bytes and notes the time of
# its first byte; tools/fetch.py verifies every client's sha256. Per row: upstream bodies and
# bytes / blob, the slowest client against the single node's with the same N, and, for the
# cluster, the peer followers' first byte against the upstream's own. After the largest N: hit
# throughput of --hit-clients clients reading the blob from a replica's local tier, and from a
# fresh replica whose disk is empty (the shared tier); and every replica's peak RSS.
# Targets: upstream bytes 1.00 x; slowest client <= 1.15 x the single node's; peak RSS per
# replica < 64 MiB. --quick: a 64 MiB blob.
# Needs Garage 2.5.0 and redis-server (tests/cluster/run.sh --install).
# Env: PULLTHROUGH_BIN (skip cargo build), BENCH_KEEP=1 (keep the temp dir with all logs).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/cluster/components.sh
source "$ROOT/tests/cluster/components.sh"

SIZE=256MiB
RATE=32MiB
REPLICAS=3
CLIENTS="3 24"
HIT_CLIENTS=8
FRONT=$ROOT/tests/clients/front.py
declare -A CPID=()   # component name -> pid

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --quick) SIZE=64MiB ;;
      --size) SIZE=$2; shift ;;
      --rate) RATE=$2; shift ;;
      --replicas) REPLICAS=$2; shift ;;
      --clients) CLIENTS=$2; shift ;;
      --hit-clients) HIT_CLIENTS=$2; shift ;;
      -h|--help) usage 0 ;;
      *) log "unknown argument $1"; usage 2 >&2 ;;
    esac
    shift
  done
  local n
  for n in $CLIENTS; do
    [ $((n % REPLICAS)) -eq 0 ] || die "--clients: $n is not a multiple of --replicas $REPLICAS"
  done
}

cluster_spawn() { local name=$1; shift; spawn "$RUN/$name.log" "$@"; CPID[$name]=$LAST_PID; }
cluster_alive() { kill -0 "${CPID[$1]:-0}" 2>/dev/null; }
stop_component() { [ -z "${CPID[$1]:-}" ] || stop_pid "${CPID[$1]}"; unset "CPID[$1]"; }

start_front() { # NAME PORT: the counting, capped front of the upstream; its log in $RES/NAME.jsonl
  : >"$RES/$1.jsonl"
  cluster_spawn "$1" python3 "$FRONT" --port "$2" --upstream "http://127.0.0.1:$UP_PORT" --log "$RES/$1.jsonl" --rate "$RATE"
  wait_http "http://127.0.0.1:$2/v2/"
}

# fetch URL N OUT [AT]: N clients at once (at Unix time AT if given), every body verified.
fetch() {
  run_child python3 "$TOOLS/fetch.py" "$1$BLOB_PATH" -n "$2" --sha256 "${DIGEST#sha256:}" --size "$BYTES" \
    --deadline "$DEADLINE" ${4:+--at "$4"} >"$3" || true
}

single_row() { # N
  local n=$1 fport port
  fport=$(free_port); port=$(free_port)
  start_front "single-$n-front" "$fport"
  start_pullthrough "$RUN/single-$n" "$port" "http://127.0.0.1:$fport"
  local pid=$LAST_PID
  log "single node: $n cold clients"
  fetch "http://127.0.0.1:$port" "$n" "$RES/single-$n.fetch.json"
  sleep 0.5   # the front logs a body when it ends
  echo "{\"rss_kib\": $(peak_rss_kib "$pid")}" >"$RES/single-$n.rss.json"
  stop_pid "$pid"
  stop_component "single-$n-front"
  rm -rf "$RUN/single-$n"
}

cluster_row() { # N [hits]
  local n=$1 hits=${2:-} i s3 rpc rport fport ports=() pids=()
  read -r s3 rpc rport fport <<<"$(free_port) $(free_port) $(free_port) $(free_port)"
  start_garage garage "$RUN/garage-$n" "$s3" "$rpc"
  start_redis redis "$rport"
  start_front "cluster-$n-front" "$fport"
  for i in $(seq "$REPLICAS"); do
    ports+=("$(free_port)")
    start_replica "r$i" "$RUN/cluster-$n/r$i" "${ports[-1]}" "http://127.0.0.1:$fport"
  done
  log "cluster: $n cold clients over $REPLICAS replicas"
  # One release time for the clients of every replica (one fetch.py each), 2 s from now.
  local at
  at=$(python3 -c 'import time; print(time.time() + 2)')
  for i in $(seq "$REPLICAS"); do
    fetch "http://127.0.0.1:${ports[$((i - 1))]}" $((n / REPLICAS)) "$RES/cluster-$n-r$i.fetch.json" "$at" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || true; done
  sleep 0.5
  for i in $(seq "$REPLICAS"); do
    curl -s "http://127.0.0.1:${ports[$((i - 1))]}/metrics" >"$RES/cluster-$n-r$i.metrics.txt"
  done
  if [ -n "$hits" ]; then
    log "hits: $HIT_CLIENTS clients from replica 1's local tier"
    fetch "http://127.0.0.1:${ports[0]}" "$HIT_CLIENTS" "$RES/hit-local.fetch.json"
    local p
    p=$(free_port)
    start_replica "r-empty" "$RUN/cluster-$n/r-empty" "$p" "http://127.0.0.1:$fport"
    log "hits: $HIT_CLIENTS clients from an empty replica (the shared tier)"
    fetch "http://127.0.0.1:$p" "$HIT_CLIENTS" "$RES/hit-shared.fetch.json"
    curl -s "http://127.0.0.1:$p/metrics" >"$RES/hit-shared.metrics.txt"
    stop_component r-empty
  fi
  local rss=()
  for i in $(seq "$REPLICAS"); do rss+=("$(peak_rss_kib "${CPID[r$i]}")"); done
  echo "{\"rss_kib\": [$(IFS=,; echo "${rss[*]}")]}" >"$RES/cluster-$n.rss.json"
  for i in $(seq "$REPLICAS"); do stop_component "r$i"; done
  stop_component "cluster-$n-front"; stop_component redis; stop_component garage
  rm -rf "$RUN/cluster-$n" "$RUN/garage-$n"
}

main() {
  parse_args "$@"
  need_pkgs python3 curl docker-registry redis-server
  have docker-registry || die "docker-registry (the upstream) is not installed"
  find_garage || die "no garage $GARAGE_VERSION: run tests/cluster/run.sh --install"
  setup_run
  RES=$RUN/results
  mkdir -p "$RES"
  build_pullthrough
  other_load start
  seed_upstream "$RUN/upstream" "$(free_port)" "big=$SIZE"
  DIGEST=$(seed_get blobs.big.digest)
  BYTES=$(seed_get blobs.big.size)
  BLOB_PATH=/v2/library/bench/blobs/$DIGEST
  RATE_BYTES=$(python3 -c 'import sys; sys.path.insert(0,sys.argv[1]); import throttle; print(throttle.parse_size(sys.argv[2]))' "$TOOLS" "$RATE")
  DEADLINE=$(( BYTES * 4 / RATE_BYTES + 30 ))
  printf '{"size": %s, "rate": %s, "replicas": %s, "clients": "%s", "hit_clients": %s}\n' \
    "$BYTES" "$RATE_BYTES" "$REPLICAS" "$CLIENTS" "$HIT_CLIENTS" >"$RES/run.json"
  local n nmax
  nmax=$(tr ' ' '\n' <<<"$CLIENTS" | sort -n | tail -1)
  for n in $CLIENTS; do
    single_row "$n"
    if [ "$n" = "$nmax" ]; then cluster_row "$n" hits; else cluster_row "$n"; fi
  done
  other_load end "$RES/load.json"
  python3 "$TOOLS/report.py" cluster "$RES"
}

main "$@"
