#!/usr/bin/env bash
# Builds the container image from deploy/Dockerfile and runs it as shipped, with podman as the
# engine: the hub starts as uid 10001 and binds 443, a module on the host connects through the
# published AMQPS port, the HEALTHCHECK command passes, the keys and certificates in the volume
# survive a restart, and SIGTERM (`podman stop`) ends the hub cleanly within the stop timeout.
#
# The base image is made locally: mmdebstrap builds a minimal bookworm from the Debian packages
# apt uses here, and `podman import` tags it debian:bookworm-slim. The image is built as the
# Dockerfile's `prebuilt` target, around the binary already built on the host: the debug one by
# default (EDGEHUB_BIN), stripped, since a release build would add several minutes to CI and
# nothing the image does depends on the profile.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${EDGEHUB_BIN:-$ROOT/target/debug/edgehub}
BASE=docker.io/library/debian:bookworm-slim
IMAGE=localhost/edgehub:test
NAME=edgehub-test-$$
VOLUME=edgehub-test-$$
# The SDK dials 5671 on the gateway host name: the container's ports are published on a
# loopback address of their own, so that they clash with nothing else on the host.
ADDR=127.0.99.1
# `podman stop` waits this long for SIGTERM to end the hub before it kills it (docker's default).
STOP_TIMEOUT=10

start=$SECONDS
step() { echo "-- $* ($((SECONDS - start)) s)"; }
now_ms() { date +%s%3N; }
fail() {
  echo "container test FAILED: $*" >&2
  podman logs "$NAME" 2>&1 | tail -n 40 >&2 || true
  exit 1
}

if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v runc >/dev/null; then
  step "installing podman, mmdebstrap, runc (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman mmdebstrap runc >/dev/null
fi

if [ ! -d tests/node_modules/azure-iot-device-amqp ]; then
  (cd tests && npm ci --no-audit --no-fund --loglevel=error)
fi

WORK=$(mktemp -d /tmp/edgehub-container.XXXXXX)
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  # The image goes; the base stays, so that the next run skips mmdebstrap.
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The test's own podman settings, which this kind of VM needs: the runc runtime (crun refuses
# its hybrid cgroup layout) and no default ulimits.
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf
# Without systemd, podman logs an error for each healthcheck timer it cannot install; the
# HEALTHCHECK command itself is run below with `podman healthcheck run`.
podman() { command podman "$@" 2> >(grep -v 'systemd connection' >&2); }

if ! podman image exists "$BASE"; then
  step "building the base image with mmdebstrap"
  sources=/etc/apt/sources.list.d/debian.sources
  [ -f "$sources" ] || sources=/etc/apt/sources.list
  # As debian:bookworm-slim: minbase, without manuals, docs and translations; apt's settings
  # for this mirror carried over.
  aptopts=()
  while IFS= read -r line; do
    aptopts+=(--aptopt="$line")
  done < <(cat /etc/apt/apt.conf.d/* 2>/dev/null | grep -E '^Acquire::Check-(Valid-Until|Date)' || true)
  mmdebstrap --quiet --variant=minbase --format=tar "${aptopts[@]}" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$WORK/base.tar" "$sources"
  podman import --quiet --change 'CMD ["bash"]' "$WORK/base.tar" "$BASE" >/dev/null
  rm -f "$WORK/base.tar"
fi

step "building the image (target prebuilt, binary $BIN)"
mkdir -p "$WORK/context/config"
strip -o "$WORK/context/edgehub" "$BIN"
cp config/edgehub.json "$WORK/context/config/"
# docker format: the OCI image format has no HEALTHCHECK. The `runtime` stage (base, packages,
# user) is tagged of its own, so that it stays cached when the test image is removed.
for target in runtime prebuilt; do
  tag=$IMAGE
  [ "$target" = prebuilt ] || tag=$IMAGE-$target
  podman build --quiet --format docker --pull=never --target "$target" \
    -f deploy/Dockerfile -t "$tag" "$WORK/context" >/dev/null
done
caps=$(podman run --rm --entrypoint getcap "$IMAGE" /usr/local/bin/edgehub)
case "$caps" in
  *cap_net_bind_service=ep*) ;;
  *) fail "the binary lacks its bind capability: '$caps'" ;;
esac

# The operator's config, mounted over the image's; listen addresses and dataDir come from the
# image's environment.
cat >"$WORK/edgehub.json" <<EOF
{
  "deviceId": "container-device",
  "iothubHostname": "test-hub.azure-devices.net",
  "gatewayHostname": "$ADDR",
  "listen": { "amqps": "0.0.0.0:5671" },
  "dataDir": "/var/lib/edgehub",
  "modules": { "A": {}, "B": {} },
  "\$edgeHub": {
    "schemaVersion": "1.1",
    "routes": { "aToB": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")" },
    "storeAndForwardConfiguration": { "timeToLiveSecs": 7200 }
  }
}
EOF
chmod 0644 "$WORK/edgehub.json"

ready_count() { podman logs "$NAME" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -c 'edgehub ready' || true; }
wait_ready() {
  local want=$1
  for _ in $(seq 1 150); do
    [ "$(ready_count)" -ge "$want" ] && return 0
    [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || fail "the hub exited at start"
    sleep 0.2
  done
  fail "the hub was not ready within 30 s"
}
# SIGTERM through `podman stop`: the hub must exit by itself (0), not be killed at the timeout.
stop_hub() {
  local t0 took code
  t0=$(now_ms)
  podman stop --time "$STOP_TIMEOUT" "$NAME" >/dev/null
  took=$(($(now_ms) - t0))
  code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
  [ "$code" = 0 ] || fail "the hub exited with $code after SIGTERM"
  [ "$took" -lt $((STOP_TIMEOUT * 1000)) ] || fail "SIGTERM took ${took} ms (the bound is ${STOP_TIMEOUT} s)"
  echo "   stopped by SIGTERM in ${took} ms (podman stop included), exit code 0"
}
# What must survive a restart: the device key, the CA, the server certificate and key, and the
# module keys derived from the device key.
identity() {
  local data
  data=$(podman volume inspect --format '{{.Mountpoint}}' "$VOLUME")
  (cd "$data" && sha256sum device.key certs/*)
  podman exec "$NAME" edgehub module-env --config /etc/edgehub/edgehub.json --module A
  podman exec "$NAME" edgehub module-env --config /etc/edgehub/edgehub.json --module B
}
run_modules() {
  local data env_a env_b
  data=$(podman volume inspect --format '{{.Mountpoint}}' "$VOLUME")
  env_a=$(podman exec "$NAME" edgehub module-env --config /etc/edgehub/edgehub.json --module A)
  env_b=$(podman exec "$NAME" edgehub module-env --config /etc/edgehub/edgehub.json --module B)
  (cd tests && CONTAINER_RUN=$1 CONTAINER_CA_FILE="$data/certs/edge-ca.pem" \
    CONTAINER_A_CONNECTION_STRING=$(sed -n 's/^EdgeHubConnectionString=//p' <<<"$env_a") \
    CONTAINER_B_CONNECTION_STRING=$(sed -n 's/^EdgeHubConnectionString=//p' <<<"$env_b") \
    node --test container/)
}

step "starting the container (volume $VOLUME, ports on $ADDR)"
podman volume create "$VOLUME" >/dev/null
podman run -d --name "$NAME" \
  --volume "$VOLUME:/var/lib/edgehub" \
  --volume "$WORK/edgehub.json:/etc/edgehub/edgehub.json:ro" \
  --publish "$ADDR:5671:5671" --publish "$ADDR:443:443" --publish "$ADDR:9600:9600" \
  "$IMAGE" >/dev/null
wait_ready 1
[ "$(podman exec "$NAME" id -u)" = 10001 ] || fail "the hub does not run as uid 10001"

step "HEALTHCHECK"
podman healthcheck run "$NAME" || fail "the HEALTHCHECK command failed"
curl -fsS "http://$ADDR:9600/metrics" | grep -q '^edgehub_' || fail "no metrics through the published port"
curl -sS -o /dev/null --cacert "$(podman volume inspect --format '{{.Mountpoint}}' "$VOLUME")/certs/edge-ca.pem" \
  "https://$ADDR:443/" || fail "no TLS on the published HTTPS port 443"

step "upstream TLS roots: the platform's, from ca-certificates"
cat >"$WORK/upstream.json" <<'EOF'
{
  "deviceId": "container-device",
  "iothubHostname": "test-hub.azure-devices.net",
  "gatewayHostname": "localhost",
  "listen": { "amqps": "127.0.0.1:0", "https": null, "metrics": null },
  "dataDir": "/tmp/data",
  "modules": {},
  "upstream": { "hostname": "upstream.invalid" },
  "$edgeHub": { "schemaVersion": "1.1", "routes": {}, "storeAndForwardConfiguration": { "timeToLiveSecs": 7200 } }
}
EOF
chmod 0644 "$WORK/upstream.json"
# With roots found, the check gets as far as resolving the (unresolvable) host name.
check=$(podman run --rm --network none --volume "$WORK/upstream.json:/tmp/upstream.json:ro" \
  --env EDGEHUB_LISTEN_AMQPS=127.0.0.1:0 --env EDGEHUB_DATA_DIR=/tmp/data \
  --entrypoint edgehub "$IMAGE" check --config /tmp/upstream.json || true)
grep -q 'upstream upstream.invalid:5671: cannot resolve' <<<"$check" \
  || fail "upstream check did not reach name resolution: $(grep upstream <<<"$check")"

step "a module on the host, through the published port"
before=$(identity)
run_modules 1

step "restart: SIGTERM, then start on the same volume"
stop_hub
podman start "$NAME" >/dev/null
wait_ready 2
after=$(identity)
[ "$before" = "$after" ] || fail "keys or certificates changed across the restart:
$(diff <(echo "$before") <(echo "$after") || true)"
echo "   keys and certificates unchanged"
run_modules 2

step "stop"
stop_hub
step "container test passed"
