#!/usr/bin/env bash
# Lazy-pull suite: nydusd, a real lazy-pull client, reads the files of a nydus image through
# the mirror over FUSE, every read a `Range` GET of the image's data blob. All on loopback:
#
#   nydusd (FUSE, registry backend) -> pullthrough -> front.py (counts) -> docker-registry
#
#   tests/lazy/run.sh             (as root: nydusd mounts FUSE; /dev/fuse must exist)
#   tests/lazy/run.sh --install   only install what it needs: Debian's docker-registry, fuse3,
#                                 cmake, curl, python3, and nydus $NYDUS_VERSION (cargo install
#                                 nydus-rs into $NYDUS_ROOT: about 19 minutes on 2 cores shared
#                                 with other builds; nydusd and nydus-image of that version,
#                                 there or on PATH, are reused)
#
# Phases:
#   image    a test tree (small files, nested dirs, an empty file, a symlink, 1-4 MiB random
#            files, 2 MiB of zeros) made into a RAFS v6 bootstrap + data blob by
#            `nydus-image create`, pushed to docker-registry as an OCI image the way nydusify
#            lays it out: the data blob (application/vnd.oci.image.layer.nydus.blob.v1,
#            annotated nydus-blob), the bootstrap as a tar.gz layer (annotated
#            nydus-bootstrap), a config and an OCI manifest.
#   cold     a fresh mirror (empty cache), nydusd with an empty blob cache: the bootstrap is
#            pulled through the mirror from the manifest, nydusd mounts it with its registry
#            backend's host = the mirror, one small file is read first (its time printed: the
#            latency of a cold range), then every file is read and compared (sha256) with the
#            source tree. nydusd's blob reads must all be Range GETs answered 206, and the
#            upstream must have been asked for the blob.
#   warm     nydusd's blob cache emptied, mounted again: the same reads and comparison, all
#            206, and no upstream request for the blob (the mirror's cache served them).
#   mirrors  nydusd's `mirrors` setting instead: host = a closed port (the "real" registry,
#            unreachable), mirrors = [the mirror, auth_through = true]; every file read and
#            compared again.
# Ends with a pass/fail table and the time of each phase; exits non-zero if a check failed or a
# tool is missing. Every wait has a deadline; every mount and process is undone on exit
# (KEEP_TMP=1 keeps the work dir; on failure its logs/ are kept).
# Env: PT_BIN (a pullthrough binary; default: cargo build --release), NYDUS_ROOT, RATE (the
# upstream's cap per response body, default 4MiB per second: the cold blob takes 1.6 s).
set -euo pipefail

LAZY=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$LAZY/../.." && pwd)
# tests/clients' helpers (services.sh) find their own files through HERE.
HERE=$ROOT/tests/clients
# The newest nydus-rs on crates.io (later nydus releases are not published there); with
# --locked it builds with rustc 1.95.
NYDUS_VERSION=2.2.0
NYDUS_ROOT=${NYDUS_ROOT:-$HOME/.local/nydus-$NYDUS_VERSION}
# cmake and perl build nydus's bundled zlib-ng and OpenSSL. nydusd (as root) mounts by itself;
# fuse3 brings fusermount3, to unmount by hand.
PACKAGES=(docker-registry fuse3 cmake perl make curl python3 procps)
REPO=library/lazy
TAG=v1
READ_DEADLINE=300   # seconds for one full read-and-compare of the mount
PROBE=etc/small-39.txt   # the file read first, alone, on each fresh mount
RATE=${RATE:-4MiB}   # the upstream's bandwidth per response (front.py), so a cold blob takes a while

# shellcheck source=tests/clients/services.sh
. "$HERE/services.sh"

# The interpreter itself, not a version manager's shim in front of it (pyenv's costs most of a
# second a call on a loaded machine, and the suite calls Python often).
PY=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || echo python3)
util() { "$PY" "$HERE/util.py" "$@"; }
img() { "$PY" "$LAZY/image.py" "$@"; }
metric() { util metric "http://$MIRROR/metrics" "$@"; }

# --- install ------------------------------------------------------------------------------------
# find_nydus: sets NYDUSD and NYDUS_IMAGE to binaries of the pinned version: those `cargo
# install` put under NYDUS_ROOT (its .crates.toml names the version: a build from crates.io
# prints "Version: unknown"), else a nydusd and nydus-image on PATH that print it (release
# builds print "Version: v2.2.0"). 1 if none.
find_nydus() {
  local root=$NYDUS_ROOT/bin dir
  if grep -qF "\"nydus-rs $NYDUS_VERSION " "$NYDUS_ROOT/.crates.toml" 2>/dev/null \
    && [ -x "$root/nydusd" ] && [ -x "$root/nydus-image" ]; then
    NYDUSD=$root/nydusd NYDUS_IMAGE=$root/nydus-image
    return 0
  fi
  dir=$(dirname "$(command -v nydusd 2>/dev/null || echo /nonexistent/nydusd)")
  if nydus_prints_pinned "$dir/nydusd" && nydus_prints_pinned "$dir/nydus-image"; then
    NYDUSD=$dir/nydusd NYDUS_IMAGE=$dir/nydus-image
    return 0
  fi
  return 1
}
nydus_prints_pinned() { [ -x "$1" ] && "$1" --version 2>/dev/null | grep -Eq "Version:[[:space:]]+v?${NYDUS_VERSION//./\\.}([[:space:]]|$)"; }

install() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
  fi
  if find_nydus; then
    log "nydus $NYDUS_VERSION: $NYDUSD, $NYDUS_IMAGE"
    return 0
  fi
  log "cargo install nydus-rs $NYDUS_VERSION into $NYDUS_ROOT (about 19 minutes on 2 cores)"
  local started=$SECONDS
  cargo install nydus-rs --locked --version "$NYDUS_VERSION" --root "$NYDUS_ROOT"
  log "nydus-rs $NYDUS_VERSION installed in $((SECONDS - started)) s"
  find_nydus || { log "nydusd / nydus-image $NYDUS_VERSION not found after the install"; return 1; }
}

# --- setup --------------------------------------------------------------------------------------
need_tools() {
  local c missing=()
  for c in docker-registry curl python3 timeout; do command -v "$c" >/dev/null || missing+=("$c"); done
  [ -e /dev/fuse ] || missing+=(/dev/fuse)
  [ ${#missing[@]} -eq 0 ] || { log "missing ${missing[*]}: run $0 --install"; exit 2; }
  find_nydus || { log "no nydusd / nydus-image $NYDUS_VERSION: run $0 --install"; exit 2; }
}

build_pullthrough() {
  if [ -n "${PT_BIN:-}" ]; then return; fi
  (cd "$ROOT" && cargo build --release --quiet)
  PT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/pullthrough
}

print_versions() {
  {
    echo "nydus:           $NYDUS_VERSION ($NYDUSD, $NYDUS_IMAGE; $("$NYDUSD" --version | grep -m1 Rustc: | tr -s '\t ' ' '))"
    echo "docker-registry: $(docker-registry --version)"
    echo "pullthrough:     $("$PT_BIN" --version)"
    echo "kernel:          $(uname -r)"
  } | tee "$T/versions.txt"
}

record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$T/results.tsv"
  log "$4  $1 $2: $3 ${5:+($5)}"
}

declare -a TIMES=()
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# timed NAME CMD...: runs CMD (a failure ends the run, as set -e does), remembers how long it
# took; the times are printed at the end.
timed() {
  local name=$1 t0 ms; shift
  t0=$(now_ms)
  "$@"
  ms=$(($(now_ms) - t0))
  TIMES+=("$(printf '%-8s %4d.%d s' "$name" $((ms / 1000)) $((ms % 1000 / 100)))")
  log "phase $name took $((ms / 1000)).$((ms % 1000 / 100)) s"
}

# wait_until SECONDS CMD...: until CMD succeeds (tried every 0.1 s); 1 when time runs out.
wait_until() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.1
  done
}

# --- the image ---------------------------------------------------------------------------------
phase_image() {
  log "== phase image: a test tree made into a nydus image, pushed to docker-registry"
  read -r UP_PORT FRONT_PORT MIRROR_PORT CLOSED_PORT < <(util ports 4)
  MIRROR=127.0.0.1:$MIRROR_PORT
  # Nothing listens on CLOSED_PORT: the "real registry" of the mirrors phase is unreachable.
  if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$CLOSED_PORT/"; then
    log "something listens on 127.0.0.1:$CLOSED_PORT"; exit 1
  fi
  start_registry upstream "$UP_PORT"
  SRC=$T/src
  log "tree: $(img tree "$SRC")"
  mkdir -p "$T/nydus/blobs"
  timeout 120 "$NYDUS_IMAGE" create --fs-version 6 --bootstrap "$T/nydus/bootstrap" \
    --blob-dir "$T/nydus/blobs" --log-level warn "$SRC" >"$T/logs/nydus-image.log" 2>&1 \
    || { tail -20 "$T/logs/nydus-image.log" >&2; record nydus-image "$REPO:$TAG" "create (RAFS v6)" FAIL "see logs/nydus-image.log"; return 1; }
  local blobs=("$T"/nydus/blobs/*)
  [ ${#blobs[@]} -eq 1 ] && [ -f "${blobs[0]}" ] || { record nydus-image "$REPO:$TAG" "create (RAFS v6)" FAIL "expected one data blob, got ${blobs[*]}"; return 1; }
  BLOB_FILE=${blobs[0]}
  BLOB=sha256:$(basename "$BLOB_FILE")
  BLOB_SIZE=$(stat -c %s "$BLOB_FILE")
  record nydus-image "$REPO:$TAG" "create (RAFS v6)" PASS "bootstrap $(stat -c %s "$T/nydus/bootstrap") B, blob $(short "$BLOB") $BLOB_SIZE B"
  local digest
  digest=$(img push "http://127.0.0.1:$UP_PORT" "$REPO" "$TAG" --bootstrap "$T/nydus/bootstrap" --blob "$BLOB_FILE" --fs-version 6)
  record upstream "$REPO:$TAG" "pushed (OCI manifest, nydus annotations)" PASS "$(short "$digest")"
  FRONT_LOG=$T/logs/front-requests.jsonl
  start_front front "$FRONT_PORT" "$UP_PORT" --rate "$RATE"
  start_mirror mirror "http://127.0.0.1:$FRONT_PORT"
}

short() { echo "${1:7:12}"; }

# --- nydusd -----------------------------------------------------------------------------------
# nydusd_config NAME HOST [MIRROR_URL]: a nydusd config (v1 JSON) for the registry backend at
# HOST (plain http), optionally with one registry mirror; blob cache in $T/NAME/cache.
# digest_validate stays off: nydusd 2.2 refuses it for RAFS v6 ("doesn't support integrity
# validation yet"); the suite compares every file's sha256 with the source instead.
nydusd_config() {
  local name=$1 host=$2 mirror=${3:-} mirrors=''
  [ -z "$mirror" ] || mirrors=", \"mirrors\": [{\"host\": \"$mirror\", \"auth_through\": true}]"
  mkdir -p "$T/$name/cache" "$T/$name/mnt"
  cat >"$T/$name/nydusd.json" <<EOF
{
  "device": {
    "backend": {
      "type": "registry",
      "config": {
        "scheme": "http",
        "host": "$host",
        "repo": "$REPO",
        "timeout": 60,
        "connect_timeout": 5,
        "retry_limit": 0$mirrors
      }
    },
    "cache": {"type": "blobcache", "config": {"work_dir": "$T/$name/cache"}}
  },
  "mode": "direct",
  "digest_validate": false,
  "iostats_files": false,
  "enable_xattr": false,
  "fs_prefetch": {"enable": false}
}
EOF
}

is_mounted() { awk -v m="$1" '$2 == m && $3 ~ /^fuse/ { found = 1 } END { exit !found }' /proc/mounts; }

# mount_nydus NAME: nydusd (FUSE) on $T/NAME/mnt from the bootstrap fetched through the mirror;
# waits (30 s at most) for the mount.
mount_nydus() {
  local name=$1
  # --rlimit-nofile 0 keeps the open-files limit: nydusd's default raises it to 1,000,000,
  # which fails (EPERM) where the limit is lower and cannot be raised, as in a container.
  spawn "nydusd-$name" "$NYDUSD" --config "$T/$name/nydusd.json" --bootstrap "$T/bootstrap" \
    --mountpoint "$T/$name/mnt" --apisock "$T/$name/api.sock" --log-level info --rlimit-nofile 0
  local end=$((SECONDS + 30))
  until is_mounted "$T/$name/mnt"; do
    kill -0 "${PID[nydusd-$name]}" 2>/dev/null || { log "nydusd-$name exited; see logs/nydusd-$name.log"; tail -20 "$T/logs/nydusd-$name.log" >&2; return 1; }
    [ "$SECONDS" -lt "$end" ] || { log "nydusd-$name did not mount within 30 s"; return 1; }
    sleep 0.1
  done
}

# umount_nydus NAME: unmounts (nydusd then exits by itself; stopped after 20 s otherwise).
umount_nydus() {
  local name=$1 mnt=$T/$1/mnt
  if is_mounted "$mnt"; then
    timeout 30 umount "$mnt" 2>/dev/null || timeout 10 umount -l "$mnt" 2>/dev/null || true
  fi
  local end=$((SECONDS + 20))
  while kill -0 "${PID[nydusd-$name]:-0}" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.1; done
  stop "nydusd-$name"
}

# read_all NAME CLIENT PHASE: reads and compares every file of the mount; records the result.
read_all() {
  local name=$1 client=$2 phase=$3 out=$T/logs/compare-$name
  if interruptible timeout -k 10 "$READ_DEADLINE" "$PY" "$LAZY/image.py" compare "$SRC" "$T/$name/mnt" >"$out.out" 2>"$out.err"; then
    record "$client" "$REPO:$TAG" "$phase: every file's content" PASS "$(cat "$out.out")"
  else
    local status=$? why
    why=$(cat "$out.out")
    [ "$status" -ne 124 ] && [ "$status" -ne 137 ] || why="no answer within ${READ_DEADLINE} s"
    record "$client" "$REPO:$TAG" "$phase: every file's content" FAIL "$why; $(head -3 "$out.err" | tr '\n' ' ' | cut -c1-200)"
  fi
}

# interruptible CMD...: CMD in the background, waited for, so that a TERM or INT reaches the
# traps at once (bash runs them only after a foreground command ends, and a read on a stuck
# FUSE mount may not end before its deadline).
interruptible() { "$@" & wait $!; }

# probe NAME PHASE: the time to read one small file first, on a fresh mount (the latency a
# container's first file access sees), and the range GETs the mirror answered for it.
probe() {
  local name=$1 phase=$2 t0 ms before after
  before=$(metric pullthrough_requests_total kind=blob code=206)
  t0=$(now_ms)
  if interruptible timeout -k 5 "$READ_DEADLINE" cmp -s "$SRC/$PROBE" "$T/$name/mnt/$PROBE"; then
    ms=$(($(now_ms) - t0))
    after=$(metric pullthrough_requests_total kind=blob code=206)
    record nydusd "$REPO:$TAG" "$phase: first read ($PROBE)" PASS "$ms ms, $((after - before)) range GETs"
    echo "$phase: first read of $PROBE: $ms ms, $((after - before)) range GETs answered 206" >>"$T/counts.txt"
  else
    record nydusd "$REPO:$TAG" "$phase: first read ($PROBE)" FAIL "content differs, or no answer within $READ_DEADLINE s"
  fi
}

# --- counting ---------------------------------------------------------------------------------
mirror_log() { echo "$T/logs/$MIRROR_NAME.log"; }

# access_settled: the mirror's access log has a line for every blob request its metrics count
# (lines are written within 50 ms of a response's end).
access_settled() {
  local want got
  want=$(metric pullthrough_requests_total kind=blob)
  got=$("$PY" - "$(mirror_log)" <<'EOF'
import json, sys
n = 0
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("{"):
        try:
            f = json.loads(line).get("fields", {})
        except ValueError:
            continue
        n += f.get("kind") == "blob"
print(n)
EOF
)
  [ "$want" = "$got" ]
}

# front_idle: no upstream transfer in progress (the mirror's download of the blob is over).
front_idle() { [ "$(curl -s --max-time 2 "http://127.0.0.1:$FRONT_PORT/_front/active")" = "[]" ]; }

# upstream_blob NAME START: the upstream requests for the data blob after front log line START:
# "GETS BYTES RANGES".
upstream_blob() {
  "$PY" - "$FRONT_LOG" "$1" "$BLOB" <<'EOF'
import json, sys
log, start, blob = sys.argv[1], int(sys.argv[2]), sys.argv[3]
gets = total = 0
ranges = []
for n, line in enumerate(open(log)):
    if n < start or not line.strip():
        continue
    r = json.loads(line)
    if r["method"] == "GET" and r["path"].split("?")[0].endswith("/blobs/" + blob):
        gets += 1
        total += r["bytes"]
        ranges.append(r.get("range") or "whole")
print(gets, total, ",".join(ranges) or "-")
EOF
}

# check_reads CLIENT PHASE ACCESS_START FRONT_START WANT_UPSTREAM: the mirror's answers to the
# data blob since ACCESS_START (all 206), and the upstream's GETs of it since FRONT_START
# ("some" or "none").
check_reads() {
  local client=$1 phase=$2 astart=$3 fstart=$4 want_up=$5 stats
  wait_until 5 access_settled || log "the access log lags the metrics; counting what it has"
  stats=$(img access "$(mirror_log)" "$astart" "$BLOB")
  echo "$phase: mirror's answers to nydusd for the data blob: $stats" >>"$T/counts.txt"
  local r206 r200 other
  read -r r206 r200 other < <("$PY" -c '
import json, sys
s = json.loads(sys.argv[1])["requests"]
get206 = s.get("GET 206", 0)
get200 = s.get("GET 200", 0)
other = sum(v for k, v in s.items() if k not in ("GET 206", "GET 200", "HEAD 200"))
print(get206, get200, other)' "$stats")
  local detail="GET 206: $r206, GET 200: $r200, other: $other; $("$PY" -c 'import json,sys; s=json.loads(sys.argv[1]); print("HEAD:", s["requests"].get("HEAD 200", 0), "range sizes", s["get_sizes"]["min"], "-", s["get_sizes"]["max"], "B, total", s["bytes"].get("GET 206", 0), "B")' "$stats")"
  if [ "$r206" -gt 0 ] && [ "$r200" -eq 0 ] && [ "$other" -eq 0 ]; then
    record "$client" "$REPO:$TAG" "$phase: blob reads are Range GETs answered 206" PASS "$detail"
  else
    record "$client" "$REPO:$TAG" "$phase: blob reads are Range GETs answered 206" FAIL "$detail"
  fi
  # The mirror's download of a cold blob may still run after nydusd's last read.
  wait_until 60 front_idle || log "the upstream transfer is still running after 60 s"
  local gets bytes ranges
  read -r gets bytes ranges < <(upstream_blob "$fstart")
  echo "$phase: upstream GETs of the data blob: $gets ($bytes bytes; ranges: $ranges)" >>"$T/counts.txt"
  local updetail="upstream GETs of the blob: $gets ($bytes of $BLOB_SIZE bytes; Range: $ranges)"
  if [ "$want_up" = some ] && [ "$gets" -gt 0 ]; then
    record mirror "$REPO:$TAG" "$phase: the upstream was asked for the blob" PASS "$updetail"
  elif [ "$want_up" = none ] && [ "$gets" -eq 0 ]; then
    record mirror "$REPO:$TAG" "$phase: no upstream request for the blob" PASS "$updetail"
  elif [ "$want_up" = some ]; then
    record mirror "$REPO:$TAG" "$phase: the upstream was asked for the blob" FAIL "$updetail"
  else
    record mirror "$REPO:$TAG" "$phase: no upstream request for the blob" FAIL "$updetail"
  fi
}

# read_phase NAME PHASE HOST [MIRROR_URL] WANT_UPSTREAM: mount with an empty nydusd cache,
# read and compare everything, unmount, then the checks.
read_phase() {
  local name=$1 phase=$2 host=$3 mirror=$4 want_up=$5 astart fstart
  rm -rf "${T:?}/$name"
  nydusd_config "$name" "$host" "$mirror"
  astart=$(img lines "$(mirror_log)")
  fstart=$(img lines "$FRONT_LOG")
  if ! mount_nydus "$name"; then
    record nydusd "$REPO:$TAG" "$phase: mount" FAIL "see logs/nydusd-$name.log"
    umount_nydus "$name"
    return 1
  fi
  probe "$name" "$phase"
  read_all "$name" nydusd "$phase"
  local m
  m=$(img nydus-metrics "$T/$name/api.sock")
  echo "$phase: $m" >>"$T/counts.txt"
  log "$m"
  umount_nydus "$name"
  check_reads nydusd "$phase" "$astart" "$fstart" "$want_up"
}

phase_cold() {
  log "== phase cold: empty mirror cache, empty nydusd cache; nydusd's host = the mirror"
  # The bootstrap, as nydus-snapshotter gets it: the manifest, then the annotated layer.
  local blobs
  if ! blobs=$(img fetch-bootstrap "$MIRROR" "$REPO" "$TAG" "$T/bootstrap" 2>"$T/err"); then
    record mirror "$REPO:$TAG" "bootstrap layer pulled through the mirror" FAIL "$(tail -1 "$T/err")"
    return 1
  fi
  if [ "$blobs" = "$BLOB $BLOB_SIZE" ] && cmp -s "$T/bootstrap" "$T/nydus/bootstrap"; then
    record mirror "$REPO:$TAG" "bootstrap layer pulled through the mirror" PASS "data blob $(short "$BLOB") named in the manifest"
  else
    record mirror "$REPO:$TAG" "bootstrap layer pulled through the mirror" FAIL "manifest's data blobs: $blobs; bootstrap identical: $(cmp -s "$T/bootstrap" "$T/nydus/bootstrap" && echo yes || echo no)"
    return 1
  fi
  read_phase cold cold "$MIRROR" "" some
}

phase_warm() {
  log "== phase warm: the mirror's cache, nydusd's cache emptied"
  read_phase warm warm "$MIRROR" "" none
}

phase_mirrors() {
  log "== phase mirrors: host = a closed port, mirrors = [the mirror]"
  read_phase mirrors "mirrors setting" "127.0.0.1:$CLOSED_PORT" "http://$MIRROR" none
}

# --- main ---------------------------------------------------------------------------------
main() {
  local started=$SECONDS
  if [ "${1:-}" = --install ]; then install; return; fi
  [ "$(id -u)" = 0 ] || { echo "run.sh needs root (nydusd mounts FUSE)" >&2; exit 2; }
  need_tools
  build_pullthrough
  make_workdir ptlazy
  trap lazy_exit EXIT
  : >"$T/counts.txt"
  print_versions
  timed image phase_image
  timed cold phase_cold
  timed warm phase_warm
  timed mirrors phase_mirrors
  local status=0
  stop_all
  TABLE_SHOWN=1
  util table "$T/results.tsv" || status=1
  cat "$T/counts.txt"
  echo
  cat "$T/versions.txt"
  printf '%s\n' "${TIMES[@]}"
  echo "total time: $((SECONDS - started))s ($(nproc) cores)"
  [ "$status" -eq 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
  return "$status"
}

# On exit, every FUSE mount of ours first (a read blocked on a dead nydusd would hang the
# rest), then services.sh's on_exit.
lazy_exit() {
  local status=$? m
  for m in $(awk -v t="$T/" 'index($2, t) == 1 && $3 ~ /^fuse/ { print $2 }' /proc/mounts 2>/dev/null | sort -r); do
    timeout 10 umount -l "$m" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ] && [ -s "$T/results.tsv" ] && [ -z "${TABLE_SHOWN:-}" ]; then
    util table "$T/results.tsv" || true
    [ ! -s "$T/counts.txt" ] || cat "$T/counts.txt"
    echo "RESULT: FAIL (exit $status)"
  fi
  # on_exit reads the run's status from $?; after a failure, in a || list, so that set -e
  # cannot cut the cleanup short.
  if [ "$status" -eq 0 ]; then on_exit; else return_status "$status" || on_exit; fi
}
return_status() { return "$1"; }

main "$@"
