#!/usr/bin/env bash
# The container image as a user gets it: `docker build .` of the repository with the real
# Dockerfile and .dockerignore, then the image run and checked:
#   - runs as 10001:10001, has no shell, is small;
#   - `config check` passes on the config baked into it;
#   - its HEALTHCHECK (the binary's own `healthcheck`) turns the container healthy;
#   - skopeo pulls an image through it from a CNCF distribution registry, with the cache in
#     the image's VOLUME (so the volume is writable by uid 10001), and `cache stats` run in the
#     container counts what it cached.
#
#   tests/image/run.sh             (as root: it runs a private dockerd under a temp dir)
#   tests/image/run.sh --install   only install the Debian packages it needs, then exit
#
# Docker Hub cannot be reached from here, so the builder stage's base image
# (rust:1-slim-bookworm) is made locally: Debian bookworm from debootstrap, with gcc, and this
# machine's Rust toolchain copied in, imported under the name the Dockerfile uses. The runtime
# stage is FROM scratch and needs no base image. The base is cached between runs in
# $PT_IMAGE_CACHE (default /var/tmp/pullthrough-image), keyed by the toolchain's version.
# Everything else lives under one mktemp dir, removed on exit (KEEP_TMP=1 keeps it); every
# process started is stopped. Only 127.0.0.1 is contacted besides the package registries (for
# debootstrap and cargo, through the machine's own apt sources and cargo config).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLIENTS=$ROOT/tests/clients
PACKAGES=(docker.io debootstrap docker-registry skopeo curl python3)
CACHE=${PT_IMAGE_CACHE:-/var/tmp/pullthrough-image}
IMAGE=pullthrough:image-test
# Build arguments left at the Dockerfile's defaults: the base image name follows from them.
BASE=rust:1-slim-bookworm
# Largest acceptable image: the binary plus the C libraries it links.
MAX_IMAGE_BYTES=$((40 * 1024 * 1024))

# shellcheck source=tests/clients/services.sh
. "$CLIENTS/services.sh"

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

on_exit() {
  local status=$?
  stop_all
  if [ "${KEEP_TMP:-0}" = 1 ]; then
    log "kept $T"
  else
    [ "$status" -eq 0 ] || { log "failed; last lines of the logs:"; tail -n 5 "$T"/logs/*.log >&2 || true; }
    rm -rf "$T"
  fi
}

# The Debian mirror this machine's apt uses (one-line or deb822 sources).
debian_mirror() {
  local files=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  awk '/^(deb |URIs:)/ && !/security/ {
         for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; exit } }' "${files[@]}"
}

# make_base TAR: bookworm + gcc + libc6-dev (ring and the linker need them, as in the official
# rust:slim images) + the Rust toolchain in /usr/local, where rustc finds its sysroot.
make_base() {
  local tar=$1 rootfs=$T/rootfs sysroot mirror
  sysroot=$(rustc --print sysroot)
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || { log "no Debian mirror in the apt sources"; return 1; }
  log "debootstrap bookworm from the apt sources' mirror (a few minutes, cached afterwards)"
  debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates bookworm "$rootfs" "$mirror" \
    >"$T/logs/debootstrap.log" 2>&1
  cp "$sysroot/bin/rustc" "$sysroot/bin/cargo" "$rootfs/usr/local/bin/"
  cp -a "$sysroot/lib/." "$rootfs/usr/local/lib/"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  # This machine's resolver and CA bundle (which may hold a TLS-inspecting proxy's CA), so
  # that cargo inside the build reaches the crate registry as cargo outside it does.
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  mkdir -p "$(dirname "$tar")"
  tar -C "$rootfs" -cf "$tar.part" . && mv "$tar.part" "$tar"
  rm -rf "$rootfs"
}

start_dockerd() {
  local d=$T/docker
  mkdir -p "$d/cli"
  DOCKER=(env "DOCKER_CONFIG=$d/cli" /usr/bin/docker -H "unix://$d/docker.sock")
  echo '{}' >"$d/daemon.json"
  # No network setup: nothing here may touch the host's bridges or firewall. Builds and the
  # pull test use the host's network; the health test uses none.
  local flags=(--bridge none --iptables=false --ip-masq=false)
  if /usr/sbin/dockerd --help 2>&1 | grep -q -- '--ip6tables'; then flags+=(--ip6tables=false); fi
  spawn dockerd /usr/sbin/dockerd --config-file "$d/daemon.json" --data-root "$d/data" \
    --exec-root "$d/exec" --pidfile "$d/dockerd.pid" -H "unix://$d/docker.sock" \
    --storage-driver vfs "${flags[@]}"
  for _ in $(seq 150); do "${DOCKER[@]}" version >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "dockerd did not start"; return 1
}

fail() { log "FAIL: $*"; exit 1; }
pass() { log "ok: $*"; }

main() {
  ensure_packages
  [ "${1:-}" = --install ] && return 0
  T=$(mktemp -d /tmp/ptimage.XXXXXX)
  mkdir -p "$T/logs"
  trap on_exit EXIT
  trap 'exit 130' INT TERM

  local tar
  tar=$CACHE/rust-bookworm-$(rustc --version | tr -cd '[:alnum:].-').tar
  [ -f "$tar" ] || make_base "$tar"
  start_dockerd
  "${DOCKER[@]}" import --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tar" "$BASE" >/dev/null
  log "base image $BASE imported from $tar"

  # The build as a user runs it: the repository as the context, the Dockerfile's defaults.
  # --network host only because this dockerd sets up no bridge.
  # The build needs a few GB in dockerd's data root (under $T): say what there is, so that a
  # full disk is told apart from a broken build.
  log "docker build (release build of the dependencies and the mirror: several minutes;" \
    "$(df -h --output=avail "$T" | tail -n 1 | tr -d ' ') free under $T)"
  local started=$SECONDS
  DOCKER_BUILDKIT=1 "${DOCKER[@]}" build --network host -t "$IMAGE" "$ROOT" >"$T/logs/build.log" 2>&1 \
    || { tail -n 30 "$T/logs/build.log" >&2; fail "docker build"; }
  pass "docker build in $((SECONDS - started)) s"

  local user size health
  user=$("${DOCKER[@]}" image inspect -f '{{.Config.User}}' "$IMAGE")
  [ "$user" = 10001:10001 ] || fail "image user is '$user'"
  pass "runs as $user"
  size=$("${DOCKER[@]}" image inspect -f '{{.Size}}' "$IMAGE")
  [ "$size" -le "$MAX_IMAGE_BYTES" ] || fail "image is $size bytes"
  pass "image size $((size / 1024 / 1024)) MiB"
  if "${DOCKER[@]}" run --rm --network none --entrypoint /bin/sh "$IMAGE" -c true >/dev/null 2>&1; then
    fail "the image has a shell"
  fi
  pass "no shell in the image"
  "${DOCKER[@]}" run --rm --network none "$IMAGE" config check >"$T/logs/config-check.log" 2>&1 \
    || fail "config check of the image's config: $(cat "$T/logs/config-check.log")"
  grep -q 'dir = "/var/lib/pullthrough"' "$T/logs/config-check.log" || fail "config check output"
  pass "config check of /etc/pullthrough/mirror.toml"

  # The image's own HEALTHCHECK command, probed every second instead of every 30 s.
  "${DOCKER[@]}" run -d --name pt-health --network none --health-interval 1s --health-start-period 0s \
    "$IMAGE" >/dev/null
  for _ in $(seq 60); do
    health=$("${DOCKER[@]}" inspect -f '{{.State.Health.Status}}' pt-health)
    [ "$health" = healthy ] && break
    sleep 0.5
  done
  [ "$health" = healthy ] || fail "container health is '$health': $("${DOCKER[@]}" logs pt-health 2>&1 | tail -3)"
  pass "HEALTHCHECK by the binary: $health"
  "${DOCKER[@]}" rm -f pt-health >/dev/null

  # A pull through the container, from a local registry, cache in the image's VOLUME.
  local up_port mirror_port digest pulled
  read -r up_port mirror_port < <(python3 "$CLIENTS/util.py" ports 2)
  start_registry upstream "$up_port"
  python3 "$CLIENTS/mkimage.py" "$T/oci" single-oci >/dev/null
  local skopeo=(skopeo --registries-conf "$T/registries.conf" --policy "$T/policy.json")
  : >"$T/registries.conf"
  echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$T/policy.json"
  "${skopeo[@]}" copy -q --dest-tls-verify=false "oci:$T/oci:single-oci" \
    "docker://127.0.0.1:$up_port/library/single-oci:v1"
  digest=sha256:$("${skopeo[@]}" inspect --raw --tls-verify=false \
    "docker://127.0.0.1:$up_port/library/single-oci:v1" | sha256sum | cut -d' ' -f1)
  "${DOCKER[@]}" run -d --name pt-pull --network host "$IMAGE" \
    --listen "127.0.0.1:$mirror_port" --upstream "http://127.0.0.1:$up_port" >/dev/null
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$mirror_port/readyz" && break; sleep 0.2; done
  curl -fsS -o /dev/null "http://127.0.0.1:$mirror_port/readyz" || fail "mirror not ready: $("${DOCKER[@]}" logs pt-pull 2>&1 | tail -3)"
  "${skopeo[@]}" copy -q --src-tls-verify=false \
    "docker://127.0.0.1:$mirror_port/library/single-oci:v1" "dir:$T/pulled"
  pulled=sha256:$(sha256sum <"$T/pulled/manifest.json" | cut -d' ' -f1)
  [ "$pulled" = "$digest" ] || fail "pulled $pulled, upstream has $digest"
  pass "skopeo pulled library/single-oci:v1 through the container ($digest)"
  local stats
  stats=$("${DOCKER[@]}" exec pt-pull /usr/local/bin/pullthrough cache stats)
  grep -qE '^entries: [1-9]' <<<"$stats" || fail "nothing cached in the volume: $stats"
  pass "cached in the volume as uid 10001: $(head -1 <<<"$stats")"
  "${DOCKER[@]}" stop -t 45 pt-pull >/dev/null
  "${DOCKER[@]}" rm -v pt-pull >/dev/null
  log "image test: ok"
}

main "$@"
