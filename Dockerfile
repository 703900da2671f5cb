# syntax=docker/dockerfile:1
#
# Container image of the session-manager bot. Two final targets share one runtime stage:
#
#   runtime (the default, last stage): compiles the bot inside RUST_IMAGE with
#   `cargo build --release --locked`.
#       docker build -t session-manager:dev .
#
#   runtime-prebuilt: copies an already built target/release/session-manager from the build
#   context instead; nothing is compiled and RUST_IMAGE is never pulled (BuildKit, buildah and
#   podman build only the stages a target needs; the legacy `DOCKER_BUILDKIT=0` builder builds
#   them all). The binary must be linked against a glibc no newer than the runtime's (Debian
#   bookworm: 2.36), e.g. built on Debian 12:
#       cargo build --release --locked
#       docker build --target runtime-prebuilt -t session-manager:dev .
#
# Base images are build arguments, so the image builds from locally imported bases when no
# registry can be reached, e.g. a debootstrap'd bookworm rootfs imported as localhost/bookworm:
#       podman build --target runtime-prebuilt \
#           --build-arg RUNTIME_IMAGE=localhost/bookworm:latest -t session-manager:dev .
#
# The image runs as uid/gid 10001 in /var/lib/session-manager, listens on 8000 (/health,
# /metrics, /callback) and has no HEALTHCHECK: Kubernetes probes GET /health (deploy/k8s), and
# the image carries no HTTP client to probe itself with.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

#checkov:skip=CKV_DOCKER_7: the base images are the build arguments above, whose defaults carry explicit tags (rust:1-bookworm, debian:bookworm-slim); checkov cannot expand ARGs in FROM

# ---------------------------------------------------------------------------------------------
# Compile. The cargo registry and the target directory are cache mounts, so a rebuild after a
# source change reuses the compiled dependencies.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin session-manager \
    && install -D -m 0755 target/release/session-manager /out/session-manager

# ---------------------------------------------------------------------------------------------
# Runtime: Debian slim with only what the bot uses at run time.
#   openssh-client   the SSH library drives the system `ssh` (master connection to the VM)
#   ca-certificates  TLS to Mattermost, OPNsense and PostgreSQL
#   tini             PID 1: ssh master connections daemonize, so they are re-parented to PID 1
#                    when they end; tini reaps them (the bot does not reap foreign children)
FROM ${RUNTIME_IMAGE} AS runtime-base

# Versions are not pinned: Debian's archive keeps only the current version of a package in a
# suite, so a pin breaks the build at the next security update; the suite (bookworm) is pinned
# by RUNTIME_IMAGE and rebuilding picks up security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates openssh-client tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid (Kubernetes runAsUser/runAsGroup use the same numbers). The home directory is
# the working directory: the default embedded SQLite file (sqlite://session-manager.db) is
# created there unless SM_DATABASE_URL points elsewhere, and ssh looks for ~/.ssh there.
RUN groupadd --gid 10001 session-manager \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
       --home-dir /var/lib/session-manager --shell /usr/sbin/nologin session-manager \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/session-manager

ENV SM_LISTEN_ADDR=0.0.0.0:8000
WORKDIR /var/lib/session-manager
USER 10001:10001
EXPOSE 8000

#checkov:skip=CKV_DOCKER_2: no HEALTHCHECK on purpose; the image has no HTTP client and Kubernetes probes GET /health on port 8000 (deploy/k8s/deployment.yaml)
ENTRYPOINT ["/usr/bin/tini", "--", "session-manager"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# Final image from a binary built outside: `--target runtime-prebuilt`.
FROM runtime-base AS runtime-prebuilt
COPY --chmod=0755 target/release/session-manager /usr/local/bin/session-manager

# ---------------------------------------------------------------------------------------------
# Final image compiled above: the last stage, so the default target.
FROM runtime-base AS runtime
COPY --from=build --chmod=0755 /out/session-manager /usr/local/bin/session-manager
