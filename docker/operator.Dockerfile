# syntax=docker/dockerfile:1.7
# The sagamesh-operator image: built in a full Rust image, shipped in a distroless one (no shell, no package
# manager), running as the nonroot user (65532). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t sagamesh/operator:dev .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sagamesh-operator --bin sagamesh-operator \
 && cp target/release/sagamesh-operator /sagamesh-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /sagamesh-operator /usr/local/bin/sagamesh-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sagamesh-operator"]
