# Multi-stage build of the agentrun binaries; the runtime image runs as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p agentrun-manager --bin agentrun-manager

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 agentrun
COPY --from=build /src/target/release/agentrun-manager /usr/local/bin/agentrun-manager
USER agentrun
EXPOSE 7400
ENTRYPOINT ["agentrun-manager"]
CMD ["serve"]
