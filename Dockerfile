# syntax=docker/dockerfile:1
# The rws server image: `docker build -t rws .` or `docker compose up` (see
# docker-compose.yml). tests/deploy.rs checks that every COPY source below
# exists, that the builder's sources pass `cargo fetch --locked`, and that the
# CMD starts the real binary with deploy/rws.toml.

# ---- builder ---------------------------------------------------------------
# The toolchain the project is developed with. The slim image has gcc and libc
# headers, all that `ring` needs; protoc comes from the protoc-bin-vendored
# crate, so nothing is installed with apt.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src

# Only what `cargo build` reads: the manifest and lock file, the build script
# and its protos, the sources, and the benches (Cargo.toml declares them, and
# cargo refuses a manifest whose declared targets are missing).
COPY Cargo.toml Cargo.lock build.rs ./
# etcd-client's build script needs protoc: .cargo/config.toml points it at
# scripts/protoc, which runs the one from the protoc-bin-vendored crate.
COPY .cargo .cargo
COPY scripts/protoc scripts/protoc
COPY proto proto
COPY benches benches
COPY src src

# BuildKit cache mounts keep the crates.io downloads and the compiled
# dependencies between builds, so a change to src/ recompiles rws only. The
# target directory lives in the cache, not in the layer, so the binary is
# copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin rws \
    && cp target/release/rws /usr/local/bin/rws

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: for clients that talk to TLS servers (rws classify --addr https://...).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid, so volume and secret permissions can be set on the host
# (the admin token file must be readable by uid 10001).
RUN groupadd --system --gid 10001 rws \
    && useradd --system --uid 10001 --gid rws --home-dir /var/lib/rws \
        --shell /usr/sbin/nologin rws \
    && install -d -o rws -g rws -m 0750 /var/lib/rws

COPY --from=builder /usr/local/bin/rws /usr/local/bin/rws
# The shipped model, read-only to the server (owned by root).
COPY models /srv/rws/models
COPY deploy/rws.toml /etc/rws/rws.toml
COPY deploy/rws-fleet.toml /etc/rws/fleet.toml

# --state-dir: signatures and profiles changed through Admin survive restarts.
# A new named volume starts as a copy of this directory, owner included.
VOLUME /var/lib/rws
WORKDIR /var/lib/rws
USER 10001:10001

# gRPC (rws.v1 Inference and Admin, KServe v2, health, reflection) and Prometheus /metrics.
EXPOSE 50051 9464

# No HEALTHCHECK: readiness is the gRPC health service (SERVING after warm-up),
# and the image has no gRPC health probe to ask it. A TCP or /metrics check
# would pass during warm-up and drain, when the server refuses requests, so it
# would be wrong rather than missing. Orchestrators with native gRPC probes
# (Kubernetes `grpc:` probes) can check the service `rws.v1.Inference`.

# rws is PID 1 and handles SIGTERM itself: NOT_SERVING for drain_grace_ms, then drain.
ENTRYPOINT ["rws"]
CMD ["serve", "--config", "/etc/rws/rws.toml"]
