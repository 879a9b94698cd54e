#!/bin/bash
# The hub side of the peer comparison in one command: the hub (release build) under the
# neutral C load client of the peer kit (Qpid Proton, AMQPS + SASL PLAIN), the same workload
# the kit runs against RabbitMQ.
#
#   durable store, unpaced       RUNS x N messages of 256 B, module A -> route -> module B
#   durable store, paced         N messages at each rate of RATES (default 2k and 10k msg/s)
#   idle connections             for each K of KS and each stage of STAGES, a fresh hub with K
#                                leaf devices takes K authenticated connections, one per device (stage connection: open only;
#                                session: + one session; link: + one sender link) and the
#                                server's RSS per held connection is read
#
# usage: benches/peer.sh [throughput|conns|all]            (default all)
# env:   PEER_KIT   the kit folder (default ../shared/peer_bench next to the checkout); it is
#                   copied to a temporary folder, which is removed at the end
#        EDGEHUB    hub binary (default target/release/edgehub, built with cargo if missing)
#        N (50000)  RUNS (3)  RATES ("2000 10000")  KS (10000)  STAGES ("connection session link")
#        OUT        result lines (default target/peer-bench/<date>.jsonl): one procmon.py JSON
#                   line per throughput run, one amqp_conns_c JSON line per K and stage
#        COMMIT_INTERVAL_MS  the hub's storage.commitIntervalMs (default: the hub's default)
#        CLIENT_ARGS  more arguments for every throughput run of the client (e.g. --window 1)
#        LABEL      names the hub in the result labels (default: the checkout's short commit)
#        PORT       first AMQPS port (default 25671; the hub also takes PORT+1000 and PORT+2000)
# Needs gcc, libqpid-proton11-dev and python3. Every wait is bounded (timeout), and only the
# hubs this script started are stopped, by their PID.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:-all}
PEER_KIT=${PEER_KIT:-$root/../shared/peer_bench}
EDGEHUB=${EDGEHUB:-$root/target/release/edgehub}
N=${N:-50000}; RUNS=${RUNS:-3}; RATES=${RATES:-"2000 10000"}; KS=${KS:-10000}
STAGES=${STAGES:-"connection session link"}; PORT=${PORT:-25671}
OUT=${OUT:-$root/target/peer-bench/$(date +%F).jsonl}
case $MODE in throughput|conns|all) ;; *) echo "usage: $0 [throughput|conns|all]" >&2; exit 2 ;; esac
[ -d "$PEER_KIT" ] || { echo "no peer kit at $PEER_KIT (set PEER_KIT)" >&2; exit 1; }
if [ ! -x "$EDGEHUB" ]; then (cd "$root" && cargo build --release --bin edgehub); fi
mkdir -p "$(dirname "$OUT")"; OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")

kit=$(mktemp -d /tmp/edgehub-peer.XXXXXX)
hub_dir=""
cleanup() {
  [ -n "$hub_dir" ] && HUB_DIR=$hub_dir "$kit/brokers/stop_edgehub.sh" > /dev/null 2>&1 || true
  [ -n "${hub_pid:-}" ] && kill "$hub_pid" 2> /dev/null || true
  rm -rf "$kit"
}
trap cleanup EXIT
cp -a "$PEER_KIT/." "$kit/"; chmod -R u+w "$kit"; cd "$kit"
# The kit's config leaves MQTT on its default 0.0.0.0:8883, which another hub on the machine
# may hold: give it a loopback port next to the others.
sed -i 's|"metrics": "127.0.0.1:$((HUB_PORT + 2000))"|&,\n    "mqtts": "127.0.0.1:$((HUB_PORT + 3000))"|' brokers/start_edgehub.sh
grep -q '"mqtts"' brokers/start_edgehub.sh || { echo "cannot set the MQTT port in the kit's start script" >&2; exit 1; }
# COMMIT_INTERVAL_MS, when set, becomes the hub's storage.commitIntervalMs.
if [ -n "${COMMIT_INTERVAL_MS:-}" ]; then
  sed -i "s|\"sync\": \"\${HUB_SYNC:-commit}\"|&, \"commitIntervalMs\": $COMMIT_INTERVAL_MS|" brokers/start_edgehub.sh
  grep -q '"commitIntervalMs"' brokers/start_edgehub.sh || { echo "cannot set the commit interval in the kit's start script" >&2; exit 1; }
fi
gcc -O2 -Wall -o amqp_bench_c amqp_bench_c.c -lqpid-proton
# The hub keeps one connection per identity (a newer one replaces the older), so the idle
# connections are K leaf devices, one each: the kit's amqp_conns_c learns --creds if it lacks it.
grep -q '"creds"' amqp_conns_c.c || patch -s -p1 < "$root/benches/peer-kit-creds.patch"
gcc -O2 -Wall -o amqp_conns_c amqp_conns_c.c -lqpid-proton
rev=${LABEL:-$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo -dirty)}
export EDGEHUB

start_hub() { # dir port [max connections]
  local out
  hub_dir=$1
  # one retry: a just-stopped hub's port can take a moment to free
  out=$(HUB_DIR=$1 HUB_PORT=$2 HUB_MAX_CONN=${3:-1000} brokers/start_edgehub.sh 2>&1) ||
    { sleep 2; out=$(HUB_DIR=$1 HUB_PORT=$2 HUB_MAX_CONN=${3:-1000} brokers/start_edgehub.sh 2>&1); } ||
    { echo "$out" >&2; tail -5 "$1/hub.log" >&2; exit 1; }
  # shellcheck disable=SC1091
  source "$1/hub.env"
}
stop_hub() {
  HUB_DIR=$hub_dir brokers/stop_edgehub.sh > /dev/null; hub_dir=""
}

if [ "$MODE" != conns ]; then
  start_hub "$kit/run/hub" "$PORT"
  args=(--port "$HUB_PORT" --tls --ca "$HUB_CA" --app-prop iothub-outputname=out1
        --send-address "$HUB_ADDR_A" --user "$HUB_USER_A" --password "$HUB_TOKEN_A"
        --recv-address "$HUB_ADDR_B" --recv-user "$HUB_USER_B" --recv-password "$HUB_TOKEN_B")
  run() { # label, client arguments...
    local label=$1; shift
    timeout 400 python3 procmon.py --pid "$HUB_PID" --label "$label" --json "$OUT" -- \
      ./amqp_bench_c "${args[@]}" -n "$N" --timeout 300 --label "$label" ${CLIENT_ARGS:-} "$@" | python3 summarize_line.py
  }
  timeout 120 ./amqp_bench_c "${args[@]}" -n 2000 --timeout 60 --label warmup > /dev/null
  for _ in $(seq 1 "$RUNS"); do run "hub-$rev-durable-unpaced"; done
  for r in $RATES; do run "hub-$rev-durable-paced$((r / 1000))k" --rate "$r"; done
  stop_hub
fi

if [ "$MODE" != throughput ]; then
  # One hub config with K leaf devices (one SAS key) and a credentials file for amqp_conns_c:
  # user, SAS token and events address of each device, one line each.
  leaf_hub() { # dir port k
    local key
    mkdir -p "$1"; key=$(head -c 32 /dev/urandom | base64)
    python3 - "$3" "$key" "$2" > "$1/edgehub.json" <<'PY'
import json, sys
k, key, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print(json.dumps({"deviceId": "bench-edge", "iothubHostname": "bench-hub.azure-devices.net",
    "gatewayHostname": "127.0.0.1",
    "listen": {"amqps": f"127.0.0.1:{port}", "https": f"127.0.0.1:{port + 1000}",
               "metrics": f"127.0.0.1:{port + 2000}", "mqtts": f"127.0.0.1:{port + 3000}"},
    "dataDir": "data", "deviceKey": key, "limits": {"maxConnections": k + 1000},
    "devices": {f"leaf{i}": {"primaryKey": key} for i in range(k)}, "modules": {"A": {}},
    "$edgeHub": {"schemaVersion": "1.1", "routes": {},
                 "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}}))
PY
    python3 - "$3" "$key" > "$1/creds.tsv" <<'PY'
import base64, hashlib, hmac, sys, time, urllib.parse
k, key = int(sys.argv[1]), base64.b64decode(sys.argv[2])
expiry = int(time.time()) + 86400
for i in range(k):
    sr = urllib.parse.quote(f"bench-hub.azure-devices.net/devices/leaf{i}", safe="")
    sig = base64.b64encode(hmac.new(key, f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"
    print(f"leaf{i}@sas.bench-hub\t{token}\t/devices/leaf{i}/messages/events")
PY
  }
  for k in $KS; do
    for stage in $STAGES; do
      d=$kit/run/hub-conns; rm -rf "$d"; leaf_hub "$d" "$((PORT + 10))" "$k"
      ca=$(cd "$d" && "$EDGEHUB" module-env --config edgehub.json --module A | sed -n 's/^EdgeModuleCACertificateFile=//p')
      (cd "$d" && ulimit -n "$(ulimit -Hn)" && exec "$EDGEHUB" run --config edgehub.json > hub.log 2>&1) &
      hub_pid=$!
      for _ in $(seq 1 300); do grep -q "edgehub ready" "$d/hub.log" 2>/dev/null && break; sleep 0.1; done
      grep -q "edgehub ready" "$d/hub.log" || { tail -5 "$d/hub.log" >&2; kill "$hub_pid"; exit 1; }
      sleep 3 # the idle RSS is read once the hub has settled
      timeout 900 ./amqp_conns_c --port "$((PORT + 10))" --tls --ca "$ca" --creds "$d/creds.tsv" \
        --role sender --attach "$stage" -k "$k" --concurrency 100 --hold 5 --timeout 600 \
        --pid "$hub_pid" --label "hub-$rev-idle-$stage" | tee -a "$OUT" || true
      kill "$hub_pid"; wait "$hub_pid" || true; hub_pid=""
    done
  done
fi
echo "results: $OUT"
