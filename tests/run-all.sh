#!/usr/bin/env bash
# Sets up and runs the whole test suite on a fresh machine: lints, Rust unit/socket tests, and
# the interop tests that drive the real Azure IoT Node SDK against the hub binary.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== npm ci (Azure IoT Node SDK, rhea; pinned by tests/package-lock.json)"
(cd tests && npm ci --no-audit --no-fund --loglevel=error)

echo "== cargo fmt --check"
cargo fmt --check

echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo build (the binary the interop tests start)"
cargo build --quiet --bins

echo "== cargo test"
cargo test --quiet --all-targets

echo "== interop tests (Node SDK)"
(cd tests && EDGEHUB_BIN="$PWD/../target/debug/edgehub" node --test --test-concurrency=1 interop/)
