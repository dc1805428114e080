#!/usr/bin/env bash
# Real-client end-to-end suite: dockerd, containerd, podman and skopeo pull docker.io images
# through pullthrough from real CNCF distribution registries, all on loopback.
#
#   tests/clients/run.sh            (as root: it runs private dockerd / containerd instances)
#   tests/clients/run.sh --install  only install the Debian packages it (and the Rust
#                                   e2e tests) need, then exit
#
# Phases, each with a fresh mirror cache:
#   auth         upstream = registry with Bearer token auth (our token server); every client
#                pulls every image; the digest must be the upstream's, and a second pull with
#                fresh client state must cost zero upstream blob GETs.
#   registries   docker.io (that registry), ghcr.io (anonymous Bearer through its own token
#                server) and a private registry (htpasswd Basic) behind one mirror; each client
#                reaches all three the way examples/ shows (see registries.sh).
#   faults       upstream = front.py cutting every blob body once after 1 MiB in front of an
#                anonymous registry; every client must still pull (pullthrough resumes).
#   concurrency  8 clients pull one cold image at once: one whole upstream body per blob (a
#                large blob's other parts besides).
#   referrers    an SBOM attached to an image upstream (referrers.py, as oras attach does) is
#                listed through the mirror, filtered by artifactType, and pulled by digest.
# PHASES="registries referrers" runs only those phases. Ends with a pass/fail table and exits
# non-zero if any check failed. Everything lives under
# one mktemp dir and every process started is stopped on exit. KEEP_TMP=1 keeps the dir;
# on failure its logs/ are kept. Nothing leaves 127.0.0.0/8.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# cargo's own target dir (CARGO_TARGET_DIR may put it outside the tree); main copies the
# binary into the work dir, so another build into a shared target dir cannot swap it mid-run.
PT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pullthrough
PACKAGES=(docker-registry skopeo podman containerd docker.io runc busybox-static openssl curl python3 procps apache2-utils)
IMAGES=(multi-oci:v1 multi-docker:v1 hello:v1 single-oci:v1 big:v1)
FAULT_IMAGES=(multi-oci:v1 big:v1)
CONCURRENT_IMAGE=big:v1
CLIENTS=(docker containerd podman skopeo)
UP_USER=pullthrough-ci
UP_TOKEN=dckr_pat_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')

# shellcheck source=tests/clients/services.sh
. "$HERE/services.sh"
# shellcheck source=tests/clients/clients.sh
. "$HERE/clients.sh"
# shellcheck source=tests/clients/registries.sh
. "$HERE/registries.sh"
# shellcheck source=tests/clients/clientauth.sh
. "$HERE/clientauth.sh"

# --- setup ------------------------------------------------------------------------------
ensure_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
}

build_pullthrough() { (cd "$ROOT" && cargo build --release --quiet); }

print_versions() {
  {
    echo "dockerd:         $(/usr/sbin/dockerd --version)"
    echo "docker client:   $(/usr/bin/docker --version)"
    echo "containerd:      $(containerd --version)"
    echo "podman:          $(podman --version)"
    echo "skopeo:          $(skopeo --version)"
    echo "docker-registry: $(docker-registry --version)"
    echo "runc:            $(runc --version | head -1)"
    echo "pullthrough:     $("$PT_BIN" --version)"
  } | tee "$T/versions.txt"
}

# The clients' fallback to Docker Hub goes to 127.0.0.1:9; it must refuse connections.
assert_closed_port() {
  if curl -s -o /dev/null --max-time 2 "http://$CLOSED/"; then
    log "something listens on $CLOSED; the Hub fallback would not be closed"; exit 1
  fi
}

start_upstreams() {
  read -r TOKEN_PORT AUTH_PORT ANON_PORT FRONT_PORT MIRROR_PORT < <(python3 "$HERE/util.py" ports 5)
  MIRROR=127.0.0.1:$MIRROR_PORT
  make_signing_key
  start_tokenserver "$TOKEN_PORT"
  start_registry auth-registry "$AUTH_PORT" "$TOKEN_PORT"
  start_registry anon-registry "$ANON_PORT"
}

# --- images -----------------------------------------------------------------------------
declare -A DIGEST=()   # "registry/image" -> manifest digest as the upstream serves it
declare -A NBLOBS=()   # image -> distinct blobs (configs + layers), all platforms

build_images() {
  local layout=$T/oci mk=("python3" "$HERE/mkimage.py" "$T/oci")
  "${mk[@]}" multi-oci --arch amd64 --arch arm64 >"$T/img-multi-oci.json"
  "${mk[@]}" multi-docker --arch amd64 --arch arm64 >"$T/img-multi-docker.json"
  "${mk[@]}" hello --busybox /bin/busybox --layers 1 >"$T/img-hello.json"
  "${mk[@]}" single-oci >"$T/img-single-oci.json"
  "${mk[@]}" big --layers 1 --layer-size 256MiB --gzip-level 0 >"$T/img-big.json"
  local name
  for name in multi-oci multi-docker hello single-oci big; do
    NBLOBS[$name:v1]=$(python3 -c 'import json,sys; print(len(set(json.load(sys.stdin)["blobs"])))' <"$T/img-$name.json")
  done
  log "built OCI layout $layout"
}

# push IMAGE FORMAT: to both registries. FORMAT v2s2 makes skopeo convert the OCI index or
# manifest into a Docker manifest list or Docker v2 manifest on the way.
push() {
  local image=$1 format=$2 name=${1%%:*} args=(copy -q --all --dest-tls-verify=false)
  [ "$format" = oci ] || args+=(--format "$format")
  "${SKOPEO[@]}" "${args[@]}" --dest-creds "$UP_USER:$UP_TOKEN" "oci:$T/oci:$name" "docker://127.0.0.1:$AUTH_PORT/library/$image"
  "${SKOPEO[@]}" "${args[@]}" "oci:$T/oci:$name" "docker://127.0.0.1:$ANON_PORT/library/$image"
  DIGEST[auth/$image]=$(upstream_digest "$AUTH_PORT" "$image" --creds "$UP_USER:$UP_TOKEN")
  DIGEST[anon/$image]=$(upstream_digest "$ANON_PORT" "$image")
  log "pushed library/$image ($format) ${DIGEST[auth/$image]}"
}

# upstream_digest PORT IMAGE [skopeo args]: sha256 of the exact manifest bytes served.
upstream_digest() {
  local port=$1 image=$2; shift 2
  echo "sha256:$("${SKOPEO[@]}" inspect --raw --tls-verify=false "$@" "docker://127.0.0.1:$port/library/$image" | sha256sum | cut -d' ' -f1)"
}

seed_images() {
  build_images
  push multi-oci:v1 oci
  push multi-docker:v1 v2s2
  push hello:v1 v2s2
  push single-oci:v1 oci
  push big:v1 oci
}

# --- results ----------------------------------------------------------------------------
# record CLIENT IMAGE CHECK PASS|FAIL|SKIP DETAIL
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$T/results.tsv"
  log "$4  $1 $2: $3 ${5:+($5)}"
}

short() { echo "${1:7:12}"; }   # sha256:0123456789ab... -> 0123456789ab

# try_pull CLIENT IMAGE: sets GOT (digest) and ERR (last error line); fails if the pull did.
try_pull() {
  local started=$SECONDS
  GOT= ERR=
  if GOT=$("pull_$1" "$2" 2>"$T/err"); then TOOK=$((SECONDS - started)); return 0; fi
  ERR=$(grep -v '^\s*$' "$T/err" | tail -1 | cut -c1-160)
  return 1
}

upstream_blob_gets() { python3 "$HERE/util.py" registry-blob-gets "$T/logs/$1.log"; }

# --- phase 1: authenticated upstream, every client x every image --------------------------
phase_auth() {
  log "== phase auth: token-authenticated upstream"
  check_upstream_is_private
  TOKEN_MARK=$(wc -l <"$T/logs/token-requests.jsonl")
  start_mirror mirror-auth "http://127.0.0.1:$AUTH_PORT" "$UP_USER"
  local client image
  for client in "${CLIENTS[@]}"; do
    for image in "${IMAGES[@]}"; do check_cold_then_warm "$client" "$image"; done
  done
  check_docker_run hello:v1
  check_mirror_authenticated
  stop_mirror
}

# Anonymous callers get a token without access: a pull can only work with the mirror's
# credentials.
check_upstream_is_private() {
  local token code
  token=$(curl -s "http://127.0.0.1:$TOKEN_PORT/token?service=pullthrough-test-registry&scope=repository:library/hello:pull" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$AUTH_PORT/v2/library/hello/manifests/v1")
  if [ "$code" = 401 ]; then
    record upstream - "anonymous pull refused" PASS "HTTP $code"
  else
    record upstream - "anonymous pull refused" FAIL "anonymous manifest GET answered $code"
  fi
}

# first_pull CLIENT IMAGE WANT CMD...: runs CMD (a pull that prints the digest) and records the
# "pull: digest" check; when the pull fails, records the re-pull check as skipped and returns 1.
first_pull() {
  local client=$1 image=$2 want=$3 started=$SECONDS; shift 3
  GOT= ERR=
  if ! GOT=$("$@" 2>"$T/err"); then
    ERR=$(grep -v '^\s*$' "$T/err" | tail -1 | cut -c1-160)
    record "$client" "$image" "pull: digest" FAIL "pull failed: $ERR"
    record "$client" "$image" "re-pull: 0 upstream blob GETs" SKIP "first pull failed"
    return 1
  fi
  TOOK=$((SECONDS - started))
  if [ "$GOT" = "$want" ]; then
    record "$client" "$image" "pull: digest" PASS "$(short "$GOT") ${TOOK}s"
  else
    record "$client" "$image" "pull: digest" FAIL "got ${GOT:-nothing}, upstream has $want"
  fi
}

check_cold_then_warm() {
  local client=$1 image=$2 want=${DIGEST[auth/$2]} reg0 gets0 hits0 reg gets hits
  reset_"$client" "$image" || true
  first_pull "$client" "$image" "$want" "pull_$client" "$image" || return 0
  reset_"$client" "$image" || true

  reg0=$(upstream_blob_gets auth-registry)
  gets0=$(mirror_metric pullthrough_upstream_requests_total kind=blob_get)
  hits0=$(mirror_metric pullthrough_cache_total kind=blob outcome=hit)
  if ! try_pull "$client" "$image"; then
    record "$client" "$image" "re-pull: 0 upstream blob GETs" FAIL "second pull failed: $ERR"
    return
  fi
  sleep 0.5   # the registry writes its access log line when a response completes
  reg=$(( $(upstream_blob_gets auth-registry) - reg0 ))
  gets=$(( $(mirror_metric pullthrough_upstream_requests_total kind=blob_get) - gets0 ))
  hits=$(( $(mirror_metric pullthrough_cache_total kind=blob outcome=hit) - hits0 ))
  local detail="registry log +$reg, mirror metric +$gets, mirror blob hits +$hits, ${TOOK}s"
  if [ "$GOT" != "$want" ]; then
    record "$client" "$image" "re-pull: 0 upstream blob GETs" FAIL "digest $GOT != $want"
  elif [ "$reg" -eq 0 ] && [ "$gets" -eq 0 ] && [ "$hits" -gt 0 ]; then
    record "$client" "$image" "re-pull: 0 upstream blob GETs" PASS "$detail"
  else
    record "$client" "$image" "re-pull: 0 upstream blob GETs" FAIL "$detail"
  fi
  reset_"$client" "$image" || true
}

# docker run of the busybox image pulled through the mirror. If this sandbox cannot run any
# container (runc itself fails on a bare bundle), that is a skip, not a failure.
check_docker_run() {
  local image=$1 out
  reset_docker "$image" || true
  if ! try_pull docker "$image"; then
    record docker "$image" "docker run" FAIL "pull failed: $ERR"; return
  fi
  if out=$(run_docker "$image") && [ "$(echo "$out" | tail -1)" = "hello from pullthrough" ]; then
    record docker "$image" "docker run" PASS "printed: $(echo "$out" | tail -1)"
  elif ! runc_works; then
    record docker "$image" "docker run" SKIP "no container can run here: $RUNC_ERR"
  else
    record docker "$image" "docker run" FAIL "$(echo "$out" | tail -1 | cut -c1-160)"
  fi
  reset_docker "$image" || true
}

# runc_works: whether plain runc can run busybox from a bundle (no docker, no mirror).
runc_works() {
  local b=$T/runc-probe
  mkdir -p "$b/rootfs/bin" && cp /bin/busybox "$b/rootfs/bin/"
  (cd "$b" && rm -f config.json && runc spec)
  python3 - "$b/config.json" <<'EOF'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["process"].update(terminal=False, args=["/bin/busybox", "true"])
json.dump(spec, open(sys.argv[1], "w"))
EOF
  RUNC_ERR=$(runc --root "$T/runc-state" run --bundle "$b" "probe-$$" 2>&1 | tail -1 | cut -c1-160) && return 0
  runc --root "$T/runc-state" delete -f "probe-$$" >/dev/null 2>&1 || true
  [ -n "$RUNC_ERR" ] || RUNC_ERR="runc failed"
  return 1
}

# Since the mirror started, the token server saw requests from the configured user only,
# all with the right token. (check_upstream_is_private's anonymous request comes before.)
check_mirror_authenticated() {
  local lines ok other
  lines=$(tail -n +"$((TOKEN_MARK + 1))" "$T/logs/token-requests.jsonl")
  ok=$(grep -c "\"user\": \"$UP_USER\", \"authenticated\": true" <<<"$lines" || true)
  other=$(grep -vc "\"user\": \"$UP_USER\", \"authenticated\": true" <<<"$lines" || true)
  if [ "$ok" -gt 0 ] && [ "$other" -eq 0 ]; then
    record mirror - "upstream token auth as $UP_USER" PASS "$ok token requests, all authenticated"
  else
    record mirror - "upstream token auth as $UP_USER" FAIL "$ok authenticated, $other anonymous or refused"
  fi
}

# --- phase 2: every blob cut once after 1 MiB ---------------------------------------------
phase_faults() {
  log "== phase faults: upstream cuts every blob body once after 1 MiB"
  local client
  for client in "${CLIENTS[@]}"; do check_faults "$client"; done
}

check_faults() {
  local client=$1 image front=front-cut-$1 resumes stats
  start_front "$front" "$FRONT_PORT" "$ANON_PORT" --cut-after 1MiB
  start_mirror "mirror-faults-$client" "http://127.0.0.1:$FRONT_PORT"
  for image in "${FAULT_IMAGES[@]}"; do
    reset_"$client" "$image" || true
    if ! try_pull "$client" "$image"; then
      record "$client" "$image" "pull through cut upstream" FAIL "pull failed: $ERR"
    elif [ "$GOT" = "${DIGEST[anon/$image]}" ]; then
      record "$client" "$image" "pull through cut upstream" PASS "$(short "$GOT") ${TOOK}s"
    else
      record "$client" "$image" "pull through cut upstream" FAIL "got ${GOT:-nothing}, upstream has ${DIGEST[anon/$image]}"
    fi
    reset_"$client" "$image" || true
  done
  resumes=$(mirror_metric pullthrough_upstream_resumes_total)
  local log=$T/logs/$front-requests.jsonl f=(python3 "$HERE/util.py" front "$T/logs/$front-requests.jsonl")
  local cuts ranges
  cuts=$("${f[@]}" cuts); ranges=$("${f[@]}" range-gets)
  stats="cuts $cuts, upstream Range GETs $ranges, mirror resumes $resumes"
  if [ "$cuts" -gt 0 ] && [ "$ranges" -ge "$cuts" ]; then
    record "$client" - "mirror resumed cut blobs" PASS "$stats"
  else
    record "$client" - "mirror resumed cut blobs" FAIL "$stats (see $log)"
  fi
  stop_mirror
  stop "$front"
}

# --- phase 3: 8 clients, one cold image, at once -------------------------------------------
phase_concurrency() {
  log "== phase concurrency: 8 clients pull cold $CONCURRENT_IMAGE at once"
  local image=$CONCURRENT_IMAGE front=front-conc gets0 shared0 i
  # A bandwidth cap stretches the cold download over a few seconds, so all 8 requests
  # arrive while it is still in flight.
  start_front "$front" "$FRONT_PORT" "$ANON_PORT" --rate 64MiB
  start_mirror mirror-conc "http://127.0.0.1:$FRONT_PORT"
  for i in "${CLIENTS[@]}"; do reset_"$i" "$image" || true; done
  gets0=$(mirror_metric pullthrough_upstream_requests_total kind=blob_get)
  shared0=$(mirror_metric pullthrough_cache_total kind=blob outcome=coalesced)
  for i in 1 2 3 4 5; do concurrent_pull "skopeo-$i" pull_skopeo "$image" "$T/skopeo/conc-$i" & PID[conc-$i]=$!; done
  for i in docker containerd podman; do concurrent_pull "$i" "pull_$i" "$image" & PID[conc-$i]=$!; done
  for i in 1 2 3 4 5 docker containerd podman; do wait "${PID[conc-$i]}" || true; unset "PID[conc-$i]"; done
  for i in 1 2 3 4 5 docker containerd podman; do record_concurrent "$i" "$image"; done

  local f=(python3 "$HERE/util.py" front "$T/logs/$front-requests.jsonl") gets distinct most shared
  gets=$(( $(mirror_metric pullthrough_upstream_requests_total kind=blob_get) - gets0 ))
  shared=$(( $(mirror_metric pullthrough_cache_total kind=blob outcome=coalesced) - shared0 ))
  local all
  distinct=$("${f[@]}" distinct-blobs); most=$("${f[@]}" max-full-gets-per-blob); all=$("${f[@]}" blob-gets)
  local detail="$all upstream blob GETs for $distinct blobs (image has ${NBLOBS[$image]}; a large blob comes in parts), max $most whole body per blob; metric +$gets; $shared responses joined an in-flight download"
  # shared > 0 shows the pulls really overlapped; without it the check proves less.
  if [ "$most" -eq 1 ] && [ "$distinct" -eq "${NBLOBS[$image]}" ] && [ "$gets" -eq "$all" ] && [ "$shared" -gt 0 ]; then
    record mirror "$image" "8 concurrent cold pulls: 1 full body per blob" PASS "$detail"
  else
    record mirror "$image" "8 concurrent cold pulls: 1 full body per blob" FAIL "$detail"
  fi
  for i in "${CLIENTS[@]}"; do reset_"$i" "$image" || true; done
  rm -rf "$T"/skopeo/conc-*
  stop_mirror
  stop "$front"
}

# concurrent_pull TAG FUNCTION IMAGE [ARGS]: runs in the background; leaves the digest (or
# the error) in $T/conc/TAG.
concurrent_pull() {
  local tag=$1 fn=$2; shift 2
  mkdir -p "$T/conc"
  if "$fn" "$@" >"$T/conc/$tag.digest" 2>"$T/conc/$tag.err"; then :; else echo "exit $?" >>"$T/conc/$tag.err"; fi
}

record_concurrent() {
  local tag=$1 image=$2 client=$1 got want=${DIGEST[anon/$2]}
  case $tag in [0-9]) client=skopeo tag=skopeo-$tag ;; esac
  got=$(cat "$T/conc/$tag.digest" 2>/dev/null || true)
  if [ "$got" = "$want" ]; then
    record "$client" "$image" "concurrent cold pull" PASS "$(short "$got") ($tag)"
  else
    record "$client" "$image" "concurrent cold pull" FAIL "$tag: $(grep -v '^\s*$' "$T/conc/$tag.err" | tail -1 | cut -c1-160)"
  fi
}

# --- phase 4: OCI 1.1 referrers ------------------------------------------------------------
# An SBOM attached to multi-oci:v1 in the anonymous registry (distribution 2.8 has no referrers
# API, so referrers.py also writes the sha256-<hex> tag, as oras does): the mirror lists it,
# filters by artifactType, and serves the artifact manifest byte for byte.
phase_referrers() {
  log "== phase referrers: an attached SBOM listed through the mirror"
  local subject=${DIGEST[anon/multi-oci:v1]} type=application/spdx+json artifact body got
  artifact=$(python3 "$HERE/referrers.py" attach "127.0.0.1:$ANON_PORT" library/multi-oci v1 "$type")
  start_mirror mirror-referrers "http://127.0.0.1:$ANON_PORT"
  body=$(curl -s "http://$MIRROR/v2/library/multi-oci/referrers/$subject")
  got=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(" ".join(m["digest"]+"="+m.get("artifactType","") for m in d["manifests"]))' <<<"$body" 2>/dev/null || true)
  if [ "$got" = "$artifact=$type" ]; then
    record mirror multi-oci:v1 "referrers listed" PASS "$(short "$artifact") $type"
  else
    record mirror multi-oci:v1 "referrers listed" FAIL "got '${got:-$body}', want $artifact=$type"
  fi
  got=$(curl -s -D "$T/ref-headers" "http://$MIRROR/v2/library/multi-oci/referrers/$subject?artifactType=application/example" \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["manifests"]))' 2>/dev/null || echo error)
  if [ "$got" = 0 ] && grep -qi '^oci-filters-applied: artifactType' "$T/ref-headers"; then
    record mirror multi-oci:v1 "referrers filtered by artifactType" PASS "0 manifests, OCI-Filters-Applied"
  else
    record mirror multi-oci:v1 "referrers filtered by artifactType" FAIL "$got manifests; $(tr -d '\r' <"$T/ref-headers" | grep -i filters || echo no OCI-Filters-Applied)"
  fi
  got="sha256:$("${SKOPEO[@]}" inspect --raw --tls-verify=false "docker://$MIRROR/library/multi-oci@$artifact" | sha256sum | cut -d' ' -f1)"
  if [ "$got" = "$artifact" ]; then
    record skopeo multi-oci:v1 "artifact manifest through the mirror" PASS "$(short "$got")"
  else
    record skopeo multi-oci:v1 "artifact manifest through the mirror" FAIL "got $got"
  fi
  stop_mirror
}

# --- main -------------------------------------------------------------------------------
main() {
  local started=$SECONDS
  [ "$(id -u)" = 0 ] || { echo "run.sh needs root (private dockerd/containerd)" >&2; exit 2; }
  ensure_packages
  [ "${1:-}" != --install ] || return 0
  build_pullthrough
  make_workdir ptclients
  cp "$PT_BIN" "$T/pullthrough" && PT_BIN=$T/pullthrough
  print_versions
  assert_closed_port
  start_upstreams
  setup_skopeo
  seed_images
  setup_podman
  start_containerd
  start_dockerd
  local phase
  for phase in ${PHASES:-auth registries faults concurrency referrers clientauth}; do "phase_$phase"; done
  stop_all
  local status=0
  python3 "$HERE/util.py" table "$T/results.tsv" || status=1
  cat "$T/versions.txt"
  echo "total time: $((SECONDS - started))s ($(nproc) cores)"
  [ "$status" -eq 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
  return "$status"
}

main "$@"
