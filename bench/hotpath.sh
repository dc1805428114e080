#!/usr/bin/env bash
# Hot-path benchmark: what a warm cache costs per request. The same load, driven by wrk, against
# pullthrough (cache warmed from a plain docker-registry upstream), nginx serving the same blob
# and manifest files as static files with sendfile at the same /v2/... paths, and registry:2
# proxy mode (docker-registry with proxy.remoteurl) warmed with the same content.
#
#   bench/hotpath.sh [--quick] [--duration 5] [--repeat 3] [--systems "pullthrough nginx registry"]
#
# Rows: cached 64 MiB blob at 1 and 16 connections (MB/s); cached 1 MiB blob at 64 connections
# (req/s, p99); manifest by tag within the tag TTL and by digest at 64 connections (req/s, p99),
# each measured again with a single wrk thread;
# manifest by digest with "Connection: close" (req/s, a new connection per request as dockerd
# and podman do); the server's peak RSS (VmHWM) over those rows; and its peak RSS while 256
# clients read a 256 MiB blob at 64 KiB/s each (tools/slowreaders.py) on a freshly started
# process. HTTPS rows, with pullthrough (server.tls_cert/tls_key) and nginx (listen ... ssl
# http2) serving the same files with the same self-signed ECDSA P-256 certificate (made with
# openssl in the temp dir): HTTP/1.1 over TLS with wrk (cached 64 MiB blob at 16 connections,
# MB/s; manifest by digest at 64 connections, req/s) and HTTP/2 with h2load (64 connections,
# 8 streams each: manifest by digest and the 1 MiB blob, req/s). All systems run side by side, and each row is measured --repeat times, the
# systems taking turns (A B C A B C ...), so that drift in the machine's speed (this is a VM:
# ±15 % between runs of the same row is common) lands on every system alike; the table shows
# each row's median. Every measurement runs --duration seconds after a 1 s warm-up; wrk shares
# the CPUs with the server, so each row also reports the server's own CPU time per GB or per
# request (from /proc/PID/stat), which other load on the machine barely moves.
# --quick: 2 s rows, 2 repeats, 8 s of slow readers.
# Env: PULLTHROUGH_BIN (skip cargo build), BENCH_KEEP=1 (keep the temp dir with all logs).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DURATION=5
REPEAT=3
SLOW_SECONDS=20
SLOW_CLIENTS=256
SYSTEMS="pullthrough nginx registry"
REPO=library/bench
ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --quick) DURATION=2; REPEAT=2; SLOW_SECONDS=8 ;;
      --duration) DURATION=$2; shift ;;
      --repeat) REPEAT=$2; shift ;;
      --systems) SYSTEMS=$2; shift ;;
      -h|--help) usage 0 ;;
      *) log "unknown argument $1"; usage 2 >&2 ;;
    esac
    shift
  done
}

available() {
  case $1 in
    pullthrough) return 0 ;;
    nginx) have nginx ;;
    registry) have "${REGISTRY_BIN:-docker-registry}" ;;
    *) die "unknown system $1" ;;
  esac
}

# The image as static files at the registry paths, for nginx.
static_root() {
  local root=$1 name
  mkdir -p "$root/v2/$REPO/blobs" "$root/v2/$REPO/manifests"
  for name in small mid big; do
    ln -f "$(seed_get "blobs.$name.path")" "$root/v2/$REPO/blobs/$(seed_get "blobs.$name.digest")" 2>/dev/null ||
      cp "$(seed_get "blobs.$name.path")" "$root/v2/$REPO/blobs/$(seed_get "blobs.$name.digest")"
  done
  cp "$(seed_get manifest.path)" "$root/v2/$REPO/manifests/v1"
  cp "$(seed_get manifest.path)" "$root/v2/$REPO/manifests/$(seed_get manifest.digest)"
}

nginx_static_conf() { # ROOT
  cat <<CONF
    root $1;
    types { }
    default_type application/octet-stream;
    location /v2/$REPO/manifests/ { default_type $(seed_get manifest.media_type); }
CONF
}

start_system() { # SYSTEM PORT; server pid in LAST_PID; the cache dirs survive restarts
  case $1 in
    pullthrough) start_pullthrough "$RUN/pullthrough" "$2" "http://127.0.0.1:$UP_PORT" --tag-ttl 1h ;;
    nginx) [ -d "$RUN/www" ] || static_root "$RUN/www"
           start_nginx "$RUN/nginx" "$2" "$(nginx_static_conf "$RUN/www")" ;;
    registry) start_registry "$RUN/registry" "$2" "http://127.0.0.1:$UP_PORT" ;;
  esac
}

server_pids() { # SYSTEM PID: the processes whose memory counts
  if [ "$1" = nginx ]; then nginx_pids "$2"; else echo "$2"; fi
}

# GETs everything once (verifying each blob's sha256), so the next GETs are cache hits.
warm() {
  local sys=$1 port=$2 name
  for name in small mid big; do
    run_child python3 "$TOOLS/fetch.py" "http://127.0.0.1:$port/v2/$REPO/blobs/$(seed_get "blobs.$name.digest")" \
      --sha256 "$(seed_get "blobs.$name.digest" | cut -d: -f2)" >"$RES/$sys-warm-$name.json" ||
      die "$sys: warming blob $name failed: $(head -c 300 "$RES/$sys-warm-$name.json")"
  done
  for name in v1 "$(seed_get manifest.digest)"; do
    curl -sf -o /dev/null -H "$ACCEPT" "http://127.0.0.1:$port/v2/$REPO/manifests/$name" ||
      die "$sys: manifest $name is not served"
  done
  [ "$sys" = registry ] && wait_registry_cache
  return 0
}

# registry:2 proxy mode fills its cache in the background: wait for every blob file.
wait_registry_cache() {
  local name hex size f _
  for name in small mid big; do
    hex=$(seed_get "blobs.$name.digest" | cut -d: -f2)
    size=$(seed_get "blobs.$name.size")
    f=$RUN/registry/data/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data
    for _ in $(seq 600); do
      [ -f "$f" ] && [ "$(stat -c %s "$f")" = "$size" ] && break
      sleep 0.2
    done
    [ -f "$f" ] || die "registry:2 proxy did not cache blob $name within 120 s"
  done
}

# wrk_row SYSTEM KEY REP CONNS PATH [wrk -H args]: 1 s warm-up, then DURATION s measured, with
# the CPU time the server's processes used meanwhile. SCHEME=https for the TLS servers.
wrk_row() {
  local sys=$1 key=$2 rep=$3 conns=$4 path=$5; shift 5
  local threads=${WRK_THREADS:-$(( conns < 2 ? conns : 2 ))} url="${SCHEME:-http}://127.0.0.1:${PORTS[$sys]}$path"
  local pids out=$RES/$sys-$key.$rep
  read -ra pids <<<"${SPIDS[$sys]}"
  run_child wrk -t "$threads" -c "$conns" -d 1s --timeout 30s "$@" "$url" >/dev/null 2>&1 || true
  log "$sys: $key ($rep/$REPEAT)"
  local cpu0 cpu1
  cpu0=$(cpu_seconds "${pids[@]}")
  run_child wrk -t "$threads" -c "$conns" -d "${DURATION}s" --timeout 30s --latency -s "$TOOLS/wrk-json.lua" \
    "$@" "$url" >"$out.wrk.txt" 2>&1 || true
  cpu1=$(cpu_seconds "${pids[@]}")
  sed -n 's/^WRKJSON //p' "$out.wrk.txt" |
    sed "s/}\$/, \"server_cpu_s\": $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { print b - a }')}/" >"$out.json"
  [ -s "$out.json" ] || log "warning: wrk gave no result for $sys $key (see $out.wrk.txt)"
}

# h2_row SYSTEM KEY REP PATH [h2load -H args]: HTTP/2 over TLS (ALPN h2), 64 connections with 8
# streams each from 2 h2load threads; a 1 s run to warm up, then DURATION s measured, with the
# server's CPU time meanwhile.
h2_row() {
  local sys=$1 key=$2 rep=$3 path=$4; shift 4
  local url="https://127.0.0.1:${PORTS[$sys]}$path" out=$RES/$sys-$key.$rep pids cpu0 cpu1
  # h2load has no overall deadline (-T bounds a connection's idle time only): a run that
  # stalls is stopped well after its DURATION and the row reports no result.
  local load=(timeout "$((DURATION + 60))" h2load -t 2 -c 64 -m 8 -T 30 "$@")
  read -ra pids <<<"${SPIDS[$sys]}"
  run_child "${load[@]}" -D 1 "$url" >/dev/null 2>&1 || true
  log "$sys: $key ($rep/$REPEAT)"
  cpu0=$(cpu_seconds "${pids[@]}")
  run_child "${load[@]}" -D "$DURATION" "$url" >"$out.h2load.txt" 2>&1 || true
  cpu1=$(cpu_seconds "${pids[@]}")
  python3 "$TOOLS/h2load-json.py" <"$out.h2load.txt" 2>/dev/null |
    sed "s/}\$/, \"server_cpu_s\": $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { print b - a }')}/" >"$out.json" || true
  [ -s "$out.json" ] || log "warning: h2load gave no result for $sys $key (see $out.h2load.txt)"
  grep -q '"protocol": "h2"' "$out.json" 2>/dev/null || log "warning: $sys $key did not negotiate h2"
}

rss_json() { # SYSTEM PID KEY [extra json]
  local kib pids
  read -ra pids <<<"$(server_pids "$1" "$2")"
  kib=$(peak_rss_kib "${pids[@]}")
  echo "{\"rss_kib\": $kib${4:+, $4}}" >"$RES/$1-$3.json"
}

# row KEY CONNS PATH [wrk args]: every system in turn, REPEAT times.
row() {
  local rep sys
  for rep in $(seq "$REPEAT"); do
    for sys in "${RUNNING[@]}"; do wrk_row "$sys" "$1" "$rep" "${@:2}"; done
  done
}

# h2row KEY PATH [h2load args]: the same with h2load.
h2row() {
  local rep sys
  for rep in $(seq "$REPEAT"); do
    for sys in "${RUNNING[@]}"; do h2_row "$sys" "$1" "$rep" "${@:2}"; done
  done
}

bench_rows() {
  local sys
  declare -gA PORTS=() SPIDS=() MAIN_PID=()
  RUNNING=()
  for sys in $SYSTEMS; do
    available "$sys" || { log "$sys is not installed: skipped"; continue; }
    PORTS[$sys]=$(free_port)
    log "$sys: starting and warming"
    start_system "$sys" "${PORTS[$sys]}"
    MAIN_PID[$sys]=$LAST_PID
    warm "$sys" "${PORTS[$sys]}"
    SPIDS[$sys]=$(server_pids "$sys" "${MAIN_PID[$sys]}")
    RUNNING+=("$sys")
  done
  row blob64_c1 1 "/v2/$REPO/blobs/$(seed_get blobs.mid.digest)"
  row blob64_c16 16 "/v2/$REPO/blobs/$(seed_get blobs.mid.digest)"
  row blob1_c64 64 "/v2/$REPO/blobs/$(seed_get blobs.small.digest)"
  row tag_c64 64 "/v2/$REPO/manifests/v1" -H "$ACCEPT"
  row digest_c64 64 "/v2/$REPO/manifests/$(seed_get manifest.digest)" -H "$ACCEPT"
  # The same two loads from one wrk thread: with two, wrk and a server wanting both CPUs
  # preempt each other, and p99 measures that more than the server.
  WRK_THREADS=1 row tag_c64_t1 64 "/v2/$REPO/manifests/v1" -H "$ACCEPT"
  WRK_THREADS=1 row digest_c64_t1 64 "/v2/$REPO/manifests/$(seed_get manifest.digest)" -H "$ACCEPT"
  row close_c64 64 "/v2/$REPO/manifests/$(seed_get manifest.digest)" -H "$ACCEPT" -H "Connection: close"
  for sys in "${RUNNING[@]}"; do
    rss_json "$sys" "${MAIN_PID[$sys]}" rss_run
    stop_pid "${MAIN_PID[$sys]}"
  done
}

# The HTTPS rows: pullthrough (on the cache the plain rows warmed) and nginx, same certificate.
bench_tls_rows() {
  local sys name hex digest
  declare -gA PORTS=() SPIDS=() MAIN_PID=()
  RUNNING=()
  make_cert "$RUN/tls"
  printf '[server]\ntls_cert = "%s"\ntls_key = "%s"\n' "$RUN/tls/cert.pem" "$RUN/tls/key.pem" >"$RUN/tls/pullthrough.toml"
  for sys in $SYSTEMS; do
    [ "$sys" = registry ] && continue
    available "$sys" || continue
    PORTS[$sys]=$(free_port)
    log "$sys: starting with TLS and warming"
    case $sys in
      pullthrough) PT_SCHEME=https start_pullthrough "$RUN/pullthrough" "${PORTS[$sys]}" "http://127.0.0.1:$UP_PORT" \
                     --tag-ttl 1h --config "$RUN/tls/pullthrough.toml" ;;
      nginx) start_nginx "$RUN/nginx-tls" "${PORTS[$sys]}" "$(nginx_static_conf "$RUN/www")
    ssl_certificate $RUN/tls/cert.pem;
    ssl_certificate_key $RUN/tls/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;" "" "ssl http2" ;;
    esac
    MAIN_PID[$sys]=$LAST_PID
    for name in small mid; do
      digest=$(seed_get "blobs.$name.digest"); hex=${digest#sha256:}
      [ "$(curl -sfk "https://127.0.0.1:${PORTS[$sys]}/v2/$REPO/blobs/$digest" | sha256sum | cut -d' ' -f1)" = "$hex" ] ||
        die "$sys: blob $name over HTTPS is not the right bytes"
    done
    curl -sfk --http2 -o /dev/null -H "$ACCEPT" "https://127.0.0.1:${PORTS[$sys]}/v2/$REPO/manifests/$(seed_get manifest.digest)" ||
      die "$sys: manifest over HTTP/2 is not served"
    SPIDS[$sys]=$(server_pids "$sys" "${MAIN_PID[$sys]}")
    RUNNING+=("$sys")
  done
  [ ${#RUNNING[@]} -gt 0 ] || return 0
  SCHEME=https row tls_blob64_c16 16 "/v2/$REPO/blobs/$(seed_get blobs.mid.digest)"
  SCHEME=https row tls_digest_c64 64 "/v2/$REPO/manifests/$(seed_get manifest.digest)" -H "$ACCEPT"
  if have h2load; then
    h2row h2_digest "/v2/$REPO/manifests/$(seed_get manifest.digest)" -H "$ACCEPT"
    h2row h2_blob1 "/v2/$REPO/blobs/$(seed_get blobs.small.digest)"
  else
    log "h2load (nghttp2-client) is not installed: HTTP/2 rows skipped"
  fi
  for sys in "${RUNNING[@]}"; do stop_pid "${MAIN_PID[$sys]}"; done
}

# 256 slow readers of the 256 MiB blob against a freshly started process, one system at a time.
bench_slow_readers() {
  local sys=$1 pid port slow
  port=$(free_port)
  log "$sys: restarted; $SLOW_CLIENTS slow readers of the 256 MiB blob for $SLOW_SECONDS s"
  start_system "$sys" "$port"
  pid=$LAST_PID
  run_child python3 "$TOOLS/slowreaders.py" "http://127.0.0.1:$port/v2/$REPO/blobs/$(seed_get blobs.big.digest)" \
    -n "$SLOW_CLIENTS" --seconds "$SLOW_SECONDS" >"$RES/$sys-slow.json" || log "warning: $sys: $(cat "$RES/$sys-slow.json")"
  slow=$(cat "$RES/$sys-slow.json")
  rss_json "$sys" "$pid" rss_slow "\"readers\": $slow"
  stop_pid "$pid"
}

main() {
  parse_args "$@"
  need_pkgs python3 curl wrk docker-registry nginx openssl nghttp2-client
  have wrk || die "wrk is not installed"
  have docker-registry || die "docker-registry (the upstream) is not installed"
  setup_run
  RES=$RUN/results
  mkdir -p "$RES"
  build_pullthrough
  other_load start
  seed_upstream "$RUN/upstream" "$(free_port)" small=1MiB mid=64MiB big=256MiB
  echo "{\"duration\": $DURATION, \"repeat\": $REPEAT, \"slow_seconds\": $SLOW_SECONDS, \"systems\": \"$SYSTEMS\"}" >"$RES/run.json"
  bench_rows
  have openssl && bench_tls_rows
  local sys
  for sys in $SYSTEMS; do available "$sys" && bench_slow_readers "$sys"; done
  other_load end "$RES/load.json"
  python3 "$TOOLS/report.py" hotpath "$RES"
}

main "$@"
