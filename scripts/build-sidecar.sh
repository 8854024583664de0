#!/usr/bin/env bash
# Builds sagamesh-sidecar the way its image ships it, and prints the binary's path. Beside it,
# built the same way, goes sagamesh-manifest-check: the program the sidecar runs (as a
# short-lived child) to check its --manifests files.
# - the `sidecar` cargo profile (whole-program LTO, one codegen unit; see Cargo.toml);
# - glibc linked statically (a static-pie binary, `-C target-feature=+crt-static`): the data
#   plane then maps only the parts of libc it uses instead of all of libc.so, libm.so and the
#   dynamic loader, about 1.3 MiB less resident memory per sidecar (docs/benchmarks.md). glibc's
#   `files` and `dns` name services are built into it, so /etc/hosts and DNS (cluster DNS
#   included) work without loading NSS modules.
#
#   scripts/build-sidecar.sh [--locked ...]     extra arguments go to `cargo build`
#
# `--target` is given explicitly so the static flag applies to the sidecar only, never to
# build scripts or proc macros.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --profile sidecar --target "$TRIPLE" -p sagamesh-sidecar --bin sagamesh-sidecar "$@" >&2
# A separate build: one invocation would unify the two packages' dependency features into the
# sidecar.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --profile sidecar --target "$TRIPLE" -p sagamesh-manifest --bin sagamesh-manifest-check "$@" >&2
echo "${CARGO_TARGET_DIR:-$ROOT/target}/$TRIPLE/sidecar/sagamesh-sidecar"
