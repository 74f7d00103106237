#!/usr/bin/env bash
# The soak of docs/RELIABILITY.md: starts the shipped model's server on its own
# ports with two resident stems (so that the mixed traffic keeps evicting and
# rebuilding them), then runs `rws bench soak` against it.
#
#   scripts/soak.sh [MINUTES] [OUT_DIR]    default 30 minutes, into runs/soak
#
# OUT_DIR gets soak.json, soak.txt, the three charts and the server's log. Extra
# environment: RWS_SOAK_WRAP, a command to run the server under (e.g. valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-30}
out=${2:-runs/soak}
addr=127.0.0.1:50071
metrics=127.0.0.1:9471
mkdir -p "$out"

cargo build --release --quiet
rws=target/release/rws
# shellcheck disable=SC2086
${RWS_SOAK_WRAP:-} $rws serve --model mnist-resnet --trust-loopback --addr $addr --metrics-addr $metrics \
    --events-addr off --console-addr off --max-resident-profiles 2 \
    >"$out/server.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

for _ in $(seq 600); do
    $rws profile ls --addr $addr >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { cat "$out/server.log"; exit 1; }
    sleep 1
done

$rws bench soak --addr $addr --metrics-url "http://$metrics/metrics" \
    --minutes "$minutes" --image docs/fog-digit.png --out "$out" | tee "$out/soak.txt"
