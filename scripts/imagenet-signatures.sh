#!/usr/bin/env bash
# Makes EfficientNet-Lite0's signatures without its training data, by distillation
# under corruption (docs/DISTILLATION.md), and evaluates them on held-out photos:
#   1. scripts/fetch-imagenet-model.sh: the model, the unlabelled photos in
#      data/imagenet/distill and the labelled samples in data/imagenet/foolbox;
#   2. `rws distill`: the stem fine-tuned on crops of the unlabelled photos, clean
#      (std) and once per corruption, into runs/lite0-distill;
#   3. `rws extract`: an int8 signature per corruption for the untouched base, into
#      models/efficientnet-lite0/signatures (committed);
#   4. `rws distill-eval`: top-1 and agreement with the clean model on the 20
#      labelled samples, unpatched vs patched, at severities 3 and 5, into
#      runs/lite0-distill/eval.md and eval.json.
# About 30 minutes on 2 cores.
#
#   scripts/imagenet-signatures.sh [--eval-only]
set -euo pipefail
cd "$(dirname "$0")/.."

export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
# Large freshly mmapped buffers page-fault on every step; keep them in the heap.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296}"
KINDS="fog,contrast,gaussian_noise,impulse_noise"
MODEL=models/efficientnet-lite0
RUN=runs/lite0-distill

scripts/fetch-imagenet-model.sh
cargo build --release --quiet
rws=target/release/rws

if [[ "${1:-}" != "--eval-only" ]]; then
  $rws distill --model "$MODEL" --kinds "$KINDS" --crops 512 --steps 200 --batch 8 \
    --lr 1e-3 --seed 1 --out "$RUN" data/imagenet/distill/*
  mkdir -p "$MODEL/signatures"
  for kind in ${KINDS//,/ }; do
    $rws extract --pre "$MODEL/base.safetensors" --served "$MODEL/base.safetensors" \
      --std "$RUN/std.safetensors" --robust "$RUN/rob-$kind.safetensors" \
      --config "$RUN/model.toml" --quant int8 \
      --out "$MODEL/signatures/$kind.rws.safetensors"
  done
fi
sigs=()
for kind in ${KINDS//,/ }; do sigs+=("$MODEL/signatures/$kind.rws.safetensors"); done
$rws distill-eval --model "$MODEL" --images data/imagenet/foolbox --severities 3,5 \
  --json "$RUN/eval.json" "${sigs[@]}" | tee "$RUN/eval.md"
