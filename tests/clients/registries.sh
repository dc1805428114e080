# shellcheck shell=bash
# Sourced by run.sh: phase registries, three registries behind one mirror.
#
#   docker.io             the token-authenticated registry of phase auth (Bearer, our user)
#   ghcr.io               a registry whose own token server grants anonymous pulls, as
#                         ghcr.io does for public images
#   registry.example.com  a private registry with htpasswd Basic auth only
#
# Each client reaches all three the way examples/ shows: containerd through certs.d hosts.toml
# files (?ns=), podman and skopeo through registries.conf prefix mirrors (/v2/ghcr.io/...),
# dockerd through registry-mirrors for Docker Hub and mirror:PORT/ghcr.io/... references for
# the others. Every pull must give the upstream's digest, and a second pull with fresh client
# state must cost zero upstream blob GETs at all three registries.
# Needs: T, HERE, MIRROR, UP_USER, UP_TOKEN, AUTH_PORT, the clients set up.

GHCR=ghcr.io
PRIVATE=registry.example.com
PRIV_USER=ci-reader
PRIV_PASS=pw-$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n')
declare -A REGISTRY_LOG=([docker.io]=auth-registry [$GHCR]=ghcr-registry [$PRIVATE]=private-registry)
REFS=("docker.io/library/multi-docker:v1" "$GHCR/org/app:v1" "$PRIVATE/team/tool:v1")

start_registries() {
  read -r GHCR_TOKEN_PORT GHCR_PORT PRIV_PORT < <(python3 "$HERE/util.py" ports 3)
  start_tokenserver "$GHCR_TOKEN_PORT" ghcr-token --anonymous-pull
  start_registry ghcr-registry "$GHCR_PORT" "$GHCR_TOKEN_PORT"
  htpasswd -Bbn "$PRIV_USER" "$PRIV_PASS" >"$T/keys/htpasswd"
  start_registry private-registry "$PRIV_PORT" "htpasswd=$T/keys/htpasswd"
  local creds=(--dest-creds "$UP_USER:$UP_TOKEN") args=(copy -q --all --dest-tls-verify=false)
  "${SKOPEO[@]}" "${args[@]}" "${creds[@]}" "oci:$T/oci:multi-oci" "docker://127.0.0.1:$GHCR_PORT/org/app:v1"
  "${SKOPEO[@]}" "${args[@]}" --format v2s2 --dest-creds "$PRIV_USER:$PRIV_PASS" \
    "oci:$T/oci:hello" "docker://127.0.0.1:$PRIV_PORT/team/tool:v1"
  DIGEST[docker.io/library/multi-docker:v1]=${DIGEST[auth/multi-docker:v1]}
  DIGEST[$GHCR/org/app:v1]=$(raw_digest "127.0.0.1:$GHCR_PORT/org/app:v1")
  DIGEST[$PRIVATE/team/tool:v1]=$(raw_digest "127.0.0.1:$PRIV_PORT/team/tool:v1" --creds "$PRIV_USER:$PRIV_PASS")
  GHCR_TOKEN_MARK=$(wc -l <"$T/logs/ghcr-token-requests.jsonl")
  log "pushed $GHCR/org/app:v1 ${DIGEST[$GHCR/org/app:v1]}, $PRIVATE/team/tool:v1 ${DIGEST[$PRIVATE/team/tool:v1]}"
}

# raw_digest HOST/REPO:TAG [skopeo args]: sha256 of the exact manifest bytes served.
raw_digest() {
  local ref=$1; shift
  echo "sha256:$("${SKOPEO[@]}" inspect --raw --tls-verify=false "$@" "docker://$ref" | sha256sum | cut -d' ' -f1)"
}

# The mirror of this phase: one [upstreams] entry per registry, credentials of the private
# one in a file only the mirror reads.
start_registries_mirror() {
  local file
  file=$(mirror_config mirror-registries)
  cat >>"$file" <<EOF
[upstreams."docker.io"]
url = "http://127.0.0.1:$AUTH_PORT"
username = "$UP_USER"
[upstreams."$GHCR"]
url = "http://127.0.0.1:$GHCR_PORT"
aliases = ["ghcr"]
[upstreams."$PRIVATE"]
url = "http://127.0.0.1:$PRIV_PORT"
username = "$PRIV_USER"
password = "$PRIV_PASS"
EOF
  chmod 600 "$file"
  launch_mirror mirror-registries "PULLTHROUGH_UPSTREAM_PASSWORD=$UP_TOKEN"
}

# --- each client, by full reference --------------------------------------------------------
# pull_ref CLIENT REF prints the manifest digest the client ended up with; reset_ref CLIENT REF
# forgets the image and its blobs. containerd and podman take the reference as it is.

# skopeo with the same registries.conf as podman: it follows the prefix mirrors too.
pull_skopeo_conf() {
  local out=$T/skopeo/reg-${1//[:\/]/-}
  rm -rf "$out"
  timeout "$PULL_TIMEOUT" skopeo --registries-conf "$T/podman/registries.conf" --policy "$T/skopeo/policy.json" \
    copy -q --all "docker://$1" "dir:$out" >>"$T/logs/skopeo-pull.log" 2>&1 \
    || { tail -3 "$T/logs/skopeo-pull.log" >&2; return 1; }
  echo "sha256:$(sha256sum <"$out/manifest.json" | cut -d' ' -f1)"
}

# dockerd mirrors Docker Hub only; other registries are named through the mirror's path.
docker_ref() {
  case $1 in
    docker.io/*) echo "${1#docker.io/}" ;;
    *) echo "$MIRROR/$1" ;;
  esac
}

pull_ref() {
  case $1 in
    skopeo) pull_skopeo_conf "$2" ;;
    docker) pull_docker "$(docker_ref "$2")" ;;
    *) "pull_$1" "$2" ;;
  esac
}

reset_ref() {
  case $1 in
    skopeo) rm -rf "$T/skopeo/reg-${2//[:\/]/-}" ;;
    docker) reset_docker "$(docker_ref "$2")" ;;
    *) "reset_$1" "$2" ;;
  esac
}

# --- the phase ---------------------------------------------------------------------------
phase_registries() {
  log "== phase registries: docker.io, $GHCR and $PRIVATE behind one mirror"
  start_registries
  start_registries_mirror
  local client ref
  for client in "${CLIENTS[@]}"; do
    for ref in "${REFS[@]}"; do check_registry_pull "$client" "$ref"; done
  done
  check_alias
  check_private_credentials_stay_private
  stop_mirror
}

check_registry_pull() {
  local client=$1 ref=$2 want=${DIGEST[$2]} log0 gets detail
  reset_ref "$client" "$ref" || true
  first_pull "$client" "$ref" "$want" pull_ref "$client" "$ref" || return 0
  reset_ref "$client" "$ref" || true
  log0=$(all_registry_blob_gets)
  if ! GOT=$(pull_ref "$client" "$ref" 2>"$T/err"); then
    record "$client" "$ref" "re-pull: 0 upstream blob GETs" FAIL "second pull failed: $(tail -1 "$T/err" | cut -c1-160)"
    return
  fi
  sleep 0.5   # the registry writes its access log line when a response completes
  gets=$(( $(all_registry_blob_gets) - log0 ))
  detail="upstream blob GETs +$gets at the three registries"
  if [ "$GOT" = "$want" ] && [ "$gets" -eq 0 ]; then
    record "$client" "$ref" "re-pull: 0 upstream blob GETs" PASS "$detail"
  else
    record "$client" "$ref" "re-pull: 0 upstream blob GETs" FAIL "$detail, digest ${GOT:-none}"
  fi
  reset_ref "$client" "$ref" || true
}

all_registry_blob_gets() {
  local sum=0 name
  for name in "${REGISTRY_LOG[@]}"; do sum=$((sum + $(upstream_blob_gets "$name"))); done
  echo "$sum"
}

# The alias: skopeo straight at mirror/ghcr/org/app, the same digest as through ghcr.io.
check_alias() {
  local out=$T/skopeo/alias got
  rm -rf "$out"
  if timeout "$PULL_TIMEOUT" "${SKOPEO[@]}" copy -q --all --src-tls-verify=false \
      "docker://$MIRROR/ghcr/org/app:v1" "dir:$out" >>"$T/logs/skopeo-pull.log" 2>&1; then
    got="sha256:$(sha256sum <"$out/manifest.json" | cut -d' ' -f1)"
    if [ "$got" = "${DIGEST[$GHCR/org/app:v1]}" ]; then
      record skopeo "ghcr/org/app:v1" "alias pull: digest" PASS "$(short "$got")"
    else
      record skopeo "ghcr/org/app:v1" "alias pull: digest" FAIL "got $got"
    fi
  else
    record skopeo "ghcr/org/app:v1" "alias pull: digest" FAIL "$(tail -1 "$T/logs/skopeo-pull.log" | cut -c1-160)"
  fi
  rm -rf "$out"
}

# The ghcr.io token server saw no credentials from the mirror (its images are public), and
# the Docker Hub one saw only our Hub user: no upstream got another's secret.
check_private_credentials_stay_private() {
  local ghcr_auth hub_other
  ghcr_auth=$(tail -n +"$((GHCR_TOKEN_MARK + 1))" "$T/logs/ghcr-token-requests.jsonl" | grep -c '"user": "' || true)
  hub_other=$(grep -c "\"user\": \"$PRIV_USER\"" "$T/logs/token-requests.jsonl" || true)
  if [ "$ghcr_auth" -eq 0 ] && [ "$hub_other" -eq 0 ]; then
    record mirror - "credentials stay with their upstream" PASS "ghcr.io token requests all anonymous"
  else
    record mirror - "credentials stay with their upstream" FAIL "ghcr.io saw $ghcr_auth authenticated, Hub saw $PRIV_USER $hub_other times"
  fi
}
