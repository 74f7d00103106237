#!/usr/bin/env bash
# The depthwise networks on the CPU, side by side (docs/BENCHMARKS.md, issue 18): rws
# against onnxruntime at 2 threads, alternating twice, on the fetched EfficientNet-Lite0
# (scripts/fetch-imagenet-model.sh) and a synthetic MobileNetV2; then candle's stock
# conv once, and profile switches. Needs target/release/rws and .venv (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS=2
rws=target/release/rws
[ -d /tmp/mb2/mobilenet-v2 ] || $rws synth --arch mobilenet-v2 --out /tmp/mb2/mobilenet-v2 --patchable-blocks 2 --signatures a,b >/dev/null 2>&1
for round in 1 2; do
  for m in "models efficientnet-lite0" "/tmp/mb2 mobilenet-v2"; do
    set -- $m
    echo "== round $round $2"
    $rws bench infer --repo $1 --model $2 --batch 1,8 --iterations 20 2>&1 | grep images/s
    .venv/bin/python benches/onnx_baseline.py $1/$2 --threads 2 --batch 1,8 --iterations 20
  done
done
echo "== candle stock conv"
$rws bench infer --model efficientnet-lite0 --batch 1 --iterations 5 --conv candle 2>&1 | grep images/s
echo "== switch"
$rws bench switch --arch efficientnet-lite0 --patchable-blocks 2 2>&1 | tail -4
$rws bench switch --arch mobilenet-v2 --patchable-blocks 2 2>&1 | tail -4
