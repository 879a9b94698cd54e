#!/bin/bash
# The hub side of the peer comparison in one command: the hub (release build) under the
# neutral C load client of the peer kit (Qpid Proton, AMQPS + SASL PLAIN), the same workload
# the kit runs against RabbitMQ.
#
#   durable store, unpaced       RUNS x N messages of 256 B, module A -> route -> module B
#   durable store, paced         N messages at each rate of RATES (default 2k and 10k msg/s)
#   idle connections             for each K of KS and each stage of STAGES, a fresh hub takes K
#                                authenticated connections (stage connection: open only;
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
  rm -rf "$kit"
}
trap cleanup EXIT
cp -a "$PEER_KIT/." "$kit/"; chmod -R u+w "$kit"; cd "$kit"
# The kit's config leaves MQTT on its default 0.0.0.0:8883, which another hub on the machine
# may hold: give it a loopback port next to the others.
sed -i 's|"metrics": "127.0.0.1:$((HUB_PORT + 2000))"|&,\n    "mqtts": "127.0.0.1:$((HUB_PORT + 3000))"|' brokers/start_edgehub.sh
grep -q '"mqtts"' brokers/start_edgehub.sh || { echo "cannot set the MQTT port in the kit's start script" >&2; exit 1; }
gcc -O2 -Wall -o amqp_bench_c amqp_bench_c.c -lqpid-proton
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
      ./amqp_bench_c "${args[@]}" -n "$N" --timeout 300 --label "$label" "$@" | python3 summarize_line.py
  }
  timeout 120 ./amqp_bench_c "${args[@]}" -n 2000 --timeout 60 --label warmup > /dev/null
  for _ in $(seq 1 "$RUNS"); do run "hub-$rev-durable-unpaced"; done
  for r in $RATES; do run "hub-$rev-durable-paced$((r / 1000))k" --rate "$r"; done
  stop_hub
fi

if [ "$MODE" != throughput ]; then
  for k in $KS; do
    for stage in $STAGES; do
      start_hub "$kit/run/hub-conns" "$((PORT + 10))" $((k + 1000))
      sleep 3 # the idle RSS is read once the hub has settled
      timeout 900 ./amqp_conns_c --port "$HUB_PORT" --tls --ca "$HUB_CA" --user "$HUB_USER_A" \
        --password "$HUB_TOKEN_A" --address "$HUB_ADDR_A" --role sender --attach "$stage" \
        -k "$k" --concurrency 100 --hold 5 --timeout 600 --pid "$HUB_PID" \
        --label "hub-$rev-idle-$stage" | tee -a "$OUT"
      stop_hub
    done
  done
fi
echo "results: $OUT"
