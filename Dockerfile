# Images for the operator and the identity agent (the chart's defaults):
#   docker build --target slim-operator -t ghcr.io/agntcy/slim-operator:0.1.0 .
#   docker build --target slim-identity-agent -t ghcr.io/agntcy/slim-identity-agent:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The agent without its `dev` feature: no fake Workload API in the sidecar image.
RUN cargo build --release --locked -p slim-operator \
 && cargo build --release --locked -p slim-identity-agent --no-default-features

FROM gcr.io/distroless/cc-debian12:nonroot AS slim-operator
COPY --from=build /src/target/release/slim-operator /slim-operator
USER 65532:65532
ENTRYPOINT ["/slim-operator"]
CMD ["run"]

FROM gcr.io/distroless/cc-debian12:nonroot AS slim-identity-agent
COPY --from=build /src/target/release/slim-identity-agent /slim-identity-agent
USER 65532:65532
ENTRYPOINT ["/slim-identity-agent"]
