# syntax=docker/dockerfile:1
# Multi-stage build of the agentrun binaries; the runtime image is Debian slim with only
# the three binaries, running as the non-root user 10001 (the uid deploy/ expects).
#   docker build -t agentrun:latest .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the crate registry and the build directory between builds:
# a source change rebuilds the workspace's crates, not its dependencies.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin agentrun-manager --bin agentrun-runner --bin agentrun \
 && mkdir -p /out \
 && cp target/release/agentrun-manager target/release/agentrun-runner target/release/agentrun /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 agentrun \
 && useradd --system --uid 10001 --gid agentrun --home-dir /nonexistent --shell /usr/sbin/nologin agentrun
COPY --from=build /out/ /usr/local/bin/
# Where compose's one-shot key bootstrap leaves the runner key (a volume mounted here
# starts out owned by the image's user).
RUN mkdir /keys && chown 10001:10001 /keys
# Numeric, so Kubernetes can check runAsNonRoot without resolving the name.
USER 10001:10001
# gRPC API, Prometheus metrics, the web UI (when AGENTRUN_UI_LISTEN is set).
EXPOSE 7400 9400 7401
ENTRYPOINT ["agentrun-manager"]
CMD ["serve"]
