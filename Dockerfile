# syntax=docker/dockerfile:1
# Multi-stage build: compile in the full Rust image, run in a slim Debian with only
# CA certificates (for HTTPS S3 endpoints) and a non-root user.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# BuildKit caches: the registry and target directory survive between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin nbd-s3 \
    && strip --strip-debug -o /nbd-s3 target/release/nbd-s3

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10809 nbd-s3 \
    && useradd --system --uid 10809 --gid nbd-s3 --home-dir /var/lib/nbd-s3 \
        --create-home --shell /usr/sbin/nologin nbd-s3 \
    && mkdir -p /etc/nbd-s3
COPY --from=builder /nbd-s3 /usr/bin/nbd-s3
COPY packaging/docker/exports.toml /etc/nbd-s3/exports.toml
USER nbd-s3
WORKDIR /var/lib/nbd-s3
EXPOSE 10809
# SIGTERM (docker stop) flushes every export to S3 before exit: give it time
# (docker stop -t 300, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
# Reads /etc/nbd-s3/exports.toml (mounted by compose / a ConfigMap); NBD_EXPORT_NAME & co.
# select the single-export ad-hoc mode instead.
ENTRYPOINT ["/usr/bin/nbd-s3", "serve"]
