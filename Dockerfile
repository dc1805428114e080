# syntax=docker/dockerfile:1
#
# pullthrough container image. Build from the repository root:
#   docker build -t pullthrough .
# Run (the cache lives in a named volume; give the 30 s shutdown grace time to finish):
#   docker run -d --name pullthrough -p 5000:5000 -v pullthrough-cache:/var/lib/pullthrough \
#     --stop-timeout 45 pullthrough
# Another config file: mount it and point PULLTHROUGH_CONFIG (or --config) at it.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /build

# Dependencies first, in their own layer: build a placeholder crate with the real manifest and
# lock file, so that this layer is rebuilt only when Cargo.toml or Cargo.lock change. Then drop
# the placeholder's own artifacts so the real sources are always compiled below.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && cargo clean --release --locked --package pullthrough \
    && rm -rf src

COPY src ./src
RUN cargo build --release --locked \
    && install -D -m 0755 target/release/pullthrough /out/pullthrough \
    && /out/pullthrough --version

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim

LABEL org.opencontainers.image.title="pullthrough" \
      org.opencontainers.image.description="A pull-through caching mirror for Docker Hub and other OCI registries" \
      org.opencontainers.image.licenses="Apache-2.0"

# ca-certificates: TLS to the upstream registries. curl: the HEALTHCHECK below.
# Versions are left to the Debian release's security updates rather than pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pullthrough \
    && useradd --system --uid 10001 --gid pullthrough --no-create-home \
       --home-dir /var/lib/pullthrough --shell /usr/sbin/nologin pullthrough \
    && install -d -o pullthrough -g pullthrough -m 0750 /var/lib/pullthrough

COPY --from=builder /out/pullthrough /usr/local/bin/pullthrough
COPY examples/mirror.container.toml /etc/pullthrough/mirror.toml

ENV PULLTHROUGH_CONFIG=/etc/pullthrough/mirror.toml

# Numeric, so that Kubernetes' runAsNonRoot can check it. A bind-mounted cache directory must
# be writable by uid 10001 (chown 10001:10001 DIR); a new named volume inherits the ownership.
USER 10001:10001
VOLUME ["/var/lib/pullthrough"]
EXPOSE 5000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:5000/healthz"]

ENTRYPOINT ["/usr/local/bin/pullthrough"]
