# Multi-stage build of the agentrun binaries; the runtime image runs as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin agentrun-manager --bin agentrun-runner --bin agentrun

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 agentrun
COPY --from=build /src/target/release/agentrun-manager /src/target/release/agentrun-runner /src/target/release/agentrun /usr/local/bin/
USER agentrun
EXPOSE 7400
ENTRYPOINT ["agentrun-manager"]
CMD ["serve"]
