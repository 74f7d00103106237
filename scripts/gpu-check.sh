#!/usr/bin/env bash
# Validates and measures the CUDA path on a machine with a GPU, in one command. Made for
# the GPU machines this project borrows: NVIDIA driver (580, CUDA 13.0), PyTorch with its
# CUDA 13 wheels (python3 there, or $TORCH_PYTHON), CuPy, and no Rust, so the binary
# comes prebuilt:
#
#   scripts/build-cuda.sh                      # here, on the build machine
#   (carry target/cuda/rws.gz, the gzipped binary: the binary itself is too large to
#   carry with the working tree)
#   scripts/gpu-check.sh                       # there (RWS_DEVICE=cpu: a dry run of steps 4-5)
#
# Steps (each runs even if an earlier one failed; the exit status says if any did):
#   1. environment: GPU, driver, and that the binary finds every shared library;
#   2. `rws bench gpu`: the CUDA kernel against the CPU kernel (NaN-poisoned outputs,
#      every storage form, 1-3 signatures, the error cases), its speed against a device
#      copy, patched logits GPU vs CPU, patch-then-remove bitwise, profile switch
#      against a full reload (conv1 + layer1 patchable) on synthetic ResNet-18/50;
#   3. scripts/gpu/check_kernel_cupy.py: src/patch/kernel/add_scale.cu compiled by CuPy and
#      checked against an independent NumPy float64 implementation;
#   4. `rws serve --device cuda:0` on a synthetic ResNet-50 with four signatures, over
#      loopback gRPC: served logits patched, then every signature removed (bitwise
#      equal to before), then `rws bench load` with and without a storm of 100
#      default-profile switches per second, and over 4 profiles against 1;
#   5. ResNet-50 inference, rws against PyTorch eager on the same weights
#      (scripts/gpu/torch_baseline.py), alternated twice; the served logits against
#      PyTorch's.
# Everything lands in $RESULTS (default ./gpu-out); the device runner's caller tars it.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS="${RESULTS:-$PWD/gpu-out}"
BIN="${RWS_BIN:-$PWD/target/cuda/release/rws}"
GZ="${RWS_GZ:-target/cuda/rws.gz}"  # target/cuda/rws-cudnn.gz for the cudnn build
PY="${TORCH_PYTHON:-$(command -v python3)}"
[ -x /opt/torch/.venv/bin/python3 ] && [ -z "${TORCH_PYTHON:-}" ] && PY=/opt/torch/.venv/bin/python3
DEVICE="${RWS_DEVICE:-cuda:0}"
LOAD_SECONDS="${LOAD_SECONDS:-8}"
mkdir -p "$RESULTS"
if [ ! -x "$BIN" ] && [ -f "$GZ" ]; then
    mkdir -p "$(dirname "$BIN")"
    gzip -dc "$GZ" >"$BIN" && chmod +x "$BIN"
fi
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
failed=()

step() { echo; echo "=== $* ($(date +%T))"; }

# The CUDA 13 user-space libraries (cuBLAS, cuRAND, NVRTC, cudart, and cuDNN for the
# cudnn build) come from PyTorch's wheels; the driver supplies libcuda.so.1.
NV="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/nvidia"
CU13="$NV/cu13/lib"
if [ -d "$CU13" ]; then
    export LD_LIBRARY_PATH="$CU13:$NV/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    echo "warning: no $CU13; set TORCH_PYTHON to a python whose site-packages hold nvidia/cu13/lib" >&2
fi

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv || failed+=(nvidia-smi)
nvidia-smi | sed -n 3p
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
if [ -x "$BIN" ]; then
    if ldd "$BIN" | grep 'not found'; then
        echo "the binary misses shared libraries (above): steps 2, 4 and 5 will fail" >&2
        failed+=(libraries)
    fi
    ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|cudnn'
else
    echo "no binary at $BIN: build it with scripts/build-cuda.sh and carry it" >&2
    failed+=(binary)
fi

step "2. rws bench gpu"
if [ -x "$BIN" ]; then
    timeout 240 "$BIN" bench gpu --device "$DEVICE" --json --batch 1,8,32 --iterations 30 \
        >"$RESULTS/bench-gpu.json" 2>"$RESULTS/bench-gpu.log"
    rc=$?
    tail -n 5 "$RESULTS/bench-gpu.log"
    [ $rc -eq 0 ] || failed+=("bench gpu (exit $rc)")
    [ -s "$RESULTS/bench-gpu.json" ] && "$PY" - "$RESULTS/bench-gpu.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
k = r["kernel"]
print(r["device"])
print(f"kernel vs CPU: {k['layers']} layers, {k['bitwise_equal']} bitwise equal, "
      f"{k['error_cases']} error cases, max rel err {k['max_rel_err_weight']:.2e} / "
      f"{k['max_rel_err_bias']:.2e}, failures: {k['failures']}")
for b in r["bandwidth"]:
    print(f"  {b['shape']} {b['quant']}: kernel {b['kernel_us']:.1f} us "
          f"({b['kernel_gbps']:.0f} GB/s), copy {b['copy_us']:.1f} us: {b['ratio']:.2f}x")
for m in r["model"]:
    print(f"  {m['arch']} logits GPU vs CPU: {m['max_rel_err_logits']:.2e}, patch changes: "
          f"{m['patch_changes_logits']}, removal bitwise: {m['removal_bitwise_equal']}")
for s in r["switch"]:
    a, m, l = s["apply"], s["materialize"], s["reload"]
    print(f"  {s['arch']} switch p50 {a['p50_us']:.1f} us p99 {a['p99_us']:.1f} us "
          f"(stem alone p50 {m['p50_us']:.1f} us p99 {m['p99_us']:.1f} us); "
          f"reload p50 {l['p50_us'] / 1e3:.1f} ms ({s['reload_over_apply_p99']:.0f}x)")
for i in r["infer"]:
    l = i["batch_latency"]
    print(f"  {i['model']} batch {i['batch']}: p50 {l['p50_us']/1e3:.2f} ms "
          f"p99 {l['p99_us']/1e3:.2f} ms, {i['images_per_second']:.0f} img/s")
for t in r["targets"]:
    print(f"  target {t['name']}: {t['value']:.3g} (goal {t['goal']}) "
          f"{'met' if t['met'] else 'NOT MET'}")
EOF
fi

step "3. add_scale.cu under CuPy against NumPy"
timeout 120 "$PY" scripts/gpu/check_kernel_cupy.py --json "$RESULTS/cupy.json" || failed+=("cupy check")

tmp=$(mktemp -d)
model="$tmp/models/r50"
step "4. rws serve --device $DEVICE (synthetic ResNet-50, conv1 + layer1 patchable)"
if [ -x "$BIN" ]; then
    (
        set -e
        "$BIN" synth --arch resnet50 --patchable-blocks 3 --signatures fog,noise,snow,rain \
            --out "$model" >/dev/null
        # A 224x224 RGB image: served as is (no resize), so step 5 can repeat the input.
        "$PY" -c 'import numpy as np, sys; from PIL import Image
Image.fromarray(np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(sys.argv[1])' "$tmp/img.png"
        "$BIN" serve --repo "$tmp/models" --trust-loopback --addr 127.0.0.1:0 --metrics-addr off \
            --device "$DEVICE" --max-batch 32 --workers 2 >"$tmp/serve.out" 2>"$RESULTS/serve.log" &
        server=$!
        trap 'kill $server 2>/dev/null' EXIT
        for _ in $(seq 300); do
            addr=$(sed -n 's/^rws listening on //p' "$tmp/serve.out")
            [ -n "$addr" ] && break
            kill -0 $server 2>/dev/null || { tail "$RESULTS/serve.log"; exit 1; }
            sleep 0.2
        done
        grep -m1 -i serving "$RESULTS/serve.log" || true
        client=(--addr "http://$addr")
        classify() { "$BIN" classify "$tmp/img.png" --json "${client[@]}" "$@"; }
        classify >"$RESULTS/logits-clean.json"
        "$BIN" profile put storm fog@0.7 noise@0.5 "${client[@]}"
        "$BIN" profile default storm "${client[@]}"
        classify >"$tmp/patched.json"
        # Every signature removed: the stem is folded again from the base weights.
        "$BIN" profile put storm --replace "${client[@]}"
        classify >"$tmp/removed.json"
        "$BIN" profile default clean "${client[@]}"
        classify >"$tmp/back.json"
        "$PY" - "$RESULTS/logits-clean.json" "$tmp/patched.json" "$tmp/removed.json" "$tmp/back.json" <<'EOF'
import json, sys
clean, patched, removed, back = (json.load(open(p)) for p in sys.argv[1:])
bits = lambda r: r["logits"]
print(f"served logits: {len(clean['logits'])} classes; patched differs: {bits(patched) != bits(clean)}; "
      f"all signatures removed, bitwise equal: {bits(removed) == bits(clean)}; "
      f"back on clean, bitwise equal: {bits(back) == bits(clean)}")
sys.exit(0 if bits(patched) != bits(clean) and bits(removed) == bits(clean) == bits(back) else 1)
EOF
        load() {
            local name=$1
            shift
            "$BIN" bench load "${client[@]}" --image "$tmp/img.png" --clients 64 \
                --duration "$LOAD_SECONDS" --json "$@" >"$tmp/load-$name.json"
            "$PY" - "$name" "$tmp/load-$name.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[2]))
l = r["latency"]
print(f"load {sys.argv[1]:<8} {r['throughput_rps']:8.1f} req/s  p50 {l['p50_us'] / 1e3:6.2f} ms  "
      f"p99 {l['p99_us'] / 1e3:6.2f} ms  errors {r['errors']}  switches {r['switches']} "
      f"({r['switch_errors']} failed)")
EOF
        }
        load warm --requests 2000
        load base1
        load storm1 --toggle clean,fog --toggle-ms 10
        load base2
        load storm2 --toggle clean,fog --toggle-ms 10
        load one --profiles fog
        load four --profiles fog,noise,snow,rain
        "$PY" - "$tmp" "$RESULTS/load.json" <<'EOF'
import json, pathlib, sys
runs = {p.stem[5:]: json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("load-*.json")}
pathlib.Path(sys.argv[2]).write_text(json.dumps(runs, indent=2))
p99 = lambda n: runs[n]["latency"]["p99_us"]
rps = lambda n: runs[n]["throughput_rps"]
base = min(p99("base1"), p99("base2"))
storm = max(p99("storm1"), p99("storm2"))
errors = sum(r["errors"] + r["switch_errors"] for r in runs.values())
print(f"storm p99 / base p99: {storm / base:.3f} (worst storm over best base; each pair "
      f"{p99('storm1') / p99('base1'):.3f}, {p99('storm2') / p99('base2'):.3f}); errors {errors}")
print(f"4 profiles / 1 profile: throughput {rps('four') / rps('one'):.3f}, p99 {p99('four') / p99('one'):.3f}")
sys.exit(1 if errors else 0)
EOF
    ) || failed+=("serve on cuda:0")
fi

step "5. ResNet-50 inference: rws against PyTorch eager, same weights, same card"
if [ -x "$BIN" ] && [ -d "$model" ]; then
    for round in 1 2; do
        timeout 120 "$BIN" bench infer --repo "$tmp/models" --model r50 --device "$DEVICE" \
            --batch 1,8,32 --iterations 40 --json >"$RESULTS/infer-rws-$round.json" \
            2>>"$RESULTS/infer.log" || failed+=("rws bench infer round $round")
        "$PY" - "$RESULTS/infer-rws-$round.json" <<'EOF' || true
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"rws   fp32        batch {r['batch']:>3}: {r['images_per_second']:8.1f} images/s "
          f"(p50 {r['batch_latency']['p50_us'] / 1e3:.2f} ms)")
EOF
        logits=()
        [ "$round" = 1 ] && [ -s "$RESULTS/logits-clean.json" ] &&
            logits=(--image "$tmp/img.png" --rws-logits "$RESULTS/logits-clean.json")
        timeout 180 "$PY" scripts/gpu/torch_baseline.py "$model" --batch 1,8,32 --iterations 40 \
            --json "$RESULTS/infer-torch-$round.json" "${logits[@]}" || failed+=("torch baseline round $round")
    done
fi
rm -rf "$tmp"

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu-check: all steps passed (results in $RESULTS)"
else
    echo "gpu-check: FAILED: ${failed[*]} (results in $RESULTS)" >&2
    exit 1
fi
