# syntax=docker/dockerfile:1.7
# The sagamesh-sidecar image: built in a full Rust image by scripts/build-sidecar.sh (the `sidecar`
# profile, glibc linked statically), shipped in distroless/static (no shell, no package manager, no
# libc needed), running as the nonroot user (65532). Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t sagamesh/sidecar:dev .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bin="$(scripts/build-sidecar.sh --locked)" && cp "$bin" /sagamesh-sidecar \
    && cp "$(dirname "$bin")/sagamesh-manifest-check" /sagamesh-manifest-check

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /sagamesh-sidecar /usr/local/bin/sagamesh-sidecar
# What `--manifests` runs, as a short-lived child, to check its files (unused with the control
# plane's gRPC discovery).
COPY --from=build /sagamesh-manifest-check /usr/local/bin/sagamesh-manifest-check
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sagamesh-sidecar"]
