# pullthrough container image. Build from the repository root:
#   docker build -t pullthrough .
# Run (the cache lives in a named volume; give the 30 s shutdown grace time to finish):
#   docker run -d --name pullthrough -p 5000:5000 -v pullthrough-cache:/var/lib/pullthrough \
#     --stop-timeout 45 pullthrough
# Another config file: mount it and point PULLTHROUGH_CONFIG (or --config) at it.
#
# No `# syntax=` line on purpose: BuildKit would fetch that frontend image from Docker Hub
# before every build, which fails where Docker Hub cannot be reached (the builtin one is used).

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /build

# Dependencies first, in their own layer: build a placeholder crate with the real manifest and
# lock file, so that this layer is rebuilt only when Cargo.toml or Cargo.lock change. Cargo
# refuses a manifest whose declared targets are missing, so the bench gets a placeholder too.
# Then drop the placeholder's own artifacts so the real sources are always compiled below.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/startup.rs \
    && cargo build --release --locked \
    && cargo clean --release --locked --package pullthrough \
    && rm -rf src benches

COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked \
    && target/release/pullthrough --version

# The runtime file system, assembled here because the runtime image has no shell: the binary,
# the shared libraries it links (glibc, libgcc_s: whatever ldd names, for any architecture), a
# passwd entry for uid 10001, /tmp, the config, and the cache directory owned by 10001. No CA
# bundle is needed: the upstream client carries its own root certificates (webpki-roots).
COPY examples/mirror.container.toml /out/rootfs/etc/pullthrough/mirror.toml
RUN install -D -m 0755 target/release/pullthrough /out/rootfs/usr/local/bin/pullthrough \
    && ldd target/release/pullthrough | grep -o '/[^ ]*' | sort -u \
       | xargs -I{} cp --parents --dereference {} /out/rootfs/ \
    && install -d -m 1777 /out/rootfs/tmp \
    && echo 'pullthrough:x:10001:10001:pullthrough:/var/lib/pullthrough:/sbin/nologin' \
       > /out/rootfs/etc/passwd \
    && echo 'pullthrough:x:10001:' > /out/rootfs/etc/group \
    && install -d -o 10001 -g 10001 -m 0750 /out/rootfs/var/lib/pullthrough \
    && chroot /out/rootfs /usr/local/bin/pullthrough --version

# ---------------------------------------------------------------------------------------------
# No distribution, no shell, no package manager: the binary and what it links.
FROM scratch

LABEL org.opencontainers.image.title="pullthrough" \
      org.opencontainers.image.description="A pull-through caching mirror for Docker Hub and other OCI registries" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/rootfs /

ENV PULLTHROUGH_CONFIG=/etc/pullthrough/mirror.toml

# Numeric, so that Kubernetes' runAsNonRoot can check it. A bind-mounted cache directory must
# be writable by uid 10001 (chown 10001:10001 DIR); a new named volume inherits the ownership.
USER 10001:10001
VOLUME ["/var/lib/pullthrough"]
EXPOSE 5000
STOPSIGNAL SIGTERM
# The binary itself asks /healthz (a plain HTTP/1.1 GET): no curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/pullthrough", "healthcheck", "--url", "http://127.0.0.1:5000/healthz"]

ENTRYPOINT ["/usr/local/bin/pullthrough"]
