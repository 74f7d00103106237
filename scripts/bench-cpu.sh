#!/usr/bin/env bash
# rws against onnxruntime and OpenVINO on the CPU, side by side (issue 32,
# docs/BENCHMARKS.md): the same weights, 2 threads each, at batch 1 and 8, on
# ResNet-18, ResNet-50 and MobileNetV2 (synthetic, `rws synth`), the real
# EfficientNet-Lite0 (scripts/fetch-imagenet-model.sh) and mnist-resnet. Each round
# runs the three one after another per model; the table gives each one's median
# over the rounds and rws's ratio to the faster rival. It prints the CPU and the
# instruction set rws's kernels chose.
#
# Usage: scripts/bench-cpu.sh [ROUNDS]   (default 3)
# Needs target/release/rws and .venv (scripts/test.sh makes both); installs the
# pinned openvino wheel into .venv when it is missing. Env: MODELS (a space-separated
# subset of the model names below), THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
export RAYON_NUM_THREADS="${THREADS:-2}"
rws=target/release/rws
py=.venv/bin/python
[ -x "$rws" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ -x "$py" ] || { echo "make .venv first: scripts/test.sh (or python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt)" >&2; exit 1; }
$py -c 'import openvino' 2>/dev/null || $py -m pip install --quiet --disable-pip-version-check openvino==2026.4.1
[ -f models/efficientnet-lite0/base.safetensors ] || PYTHON=$py scripts/fetch-imagenet-model.sh >/dev/null

synth=target/bench-cpu
declare -A repo=([mnist-resnet]=models [efficientnet-lite0]=models)
for arch in resnet18 resnet50 mobilenet-v2; do
  [ -f $synth/$arch/base.safetensors ] || $rws synth --arch $arch --out $synth/$arch --patchable-blocks 2 --signatures a >/dev/null 2>&1
  repo[$arch]=$synth
done
MODELS="${MODELS:-resnet18 resnet50 mobilenet-v2 efficientnet-lite0 mnist-resnet}"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
iterations() { case $1 in mnist-resnet) echo 2000 ;; resnet50) echo 8 ;; *) echo 20 ;; esac; }
for round in $(seq "$ROUNDS"); do
  for m in $MODELS; do
    n=$(iterations "$m")
    echo "round $round/$ROUNDS: $m" >&2
    $rws bench infer --repo "${repo[$m]}" --model "$m" --batch 1,8 --iterations "$n" --json >"$out/rws-$m-$round.json"
    for rt in onnxruntime openvino; do
      $py benches/onnx_baseline.py "${repo[$m]}/$m" --runtime $rt --threads "$RAYON_NUM_THREADS" \
        --batch 1,8 --iterations "$n" --json >"$out/$rt-$m-$round.json"
    done
  done
done

echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores here, $RAYON_NUM_THREADS threads each"
$py - "$out" <<'EOF'
import glob, json, statistics, sys
rows, isa = {}, set()
for f in glob.glob(f"{sys.argv[1]}/*.json"):
    runtime = f.rsplit("/", 1)[1].split("-", 1)[0]
    for r in json.load(open(f)):
        rows.setdefault((r["model"], r["batch"]), {}).setdefault(runtime, []).append(r["images_per_second"])
        isa.add(r.get("isa", "?")) if runtime == "rws" else None
print(f"rws kernels: {', '.join(sorted(isa))}")
print("| model | batch | rws | onnxruntime | OpenVINO | rws / the faster | rounds |")
print("|---|---|---|---|---|---|---|")
for (model, batch), by in sorted(rows.items()):
    med = {k: statistics.median(v) for k, v in by.items()}
    best = max(med["onnxruntime"], med["openvino"])
    print(f"| {model} | {batch} | {med['rws']:.1f} | {med['onnxruntime']:.1f} | {med['openvino']:.1f} "
          f"| {med['rws'] / best:.2f}× | {len(by['rws'])} |")
EOF
