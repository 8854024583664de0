# syntax=docker/dockerfile:1.7
# The shop-service image: built in a full Rust image, shipped in a distroless one (no shell, no package
# manager), running as the nonroot user (65532). Build from the repository root:
#   docker build -f docker/examples.Dockerfile -t sagamesh/examples:dev .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sagamesh-examples --bin shop-service \
 && cp target/release/shop-service /shop-service

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /shop-service /usr/local/bin/shop-service
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/shop-service"]
