#!/usr/bin/env bash
# Validates the CUDA path on a machine with a GPU, in one command. Made for the GPU
# machines this project borrows: NVIDIA driver (580, CUDA 13.0), PyTorch with its CUDA 13
# wheels at /opt/torch/.venv, CuPy, and no Rust, so the binary comes prebuilt:
#
#   scripts/build-cuda.sh                      # here, on the build machine
#   (carry target/cuda/rws.gz, the gzipped binary, to the GPU machine's copy of the
#   repository: the binary itself is too large to carry with the working tree)
#   scripts/gpu-check.sh                       # there
#
# Steps (each runs even if an earlier one failed; the exit status says if any did):
#   1. environment: GPU, driver, and that the binary finds every shared library;
#   2. `rws bench gpu`: the CUDA kernel against the CPU kernel (NaN-poisoned outputs,
#      every storage form, 1-3 signatures, the error cases), its speed against a device
#      copy, patched-model logits GPU vs CPU, profile switch and inference p50/p99 on
#      synthetic ResNet-18 and ResNet-50;
#   3. scripts/gpu/check_kernel_cupy.py: src/kernel/add_scale.cu compiled by CuPy and
#      checked against an independent NumPy float64 implementation (needs no Rust
#      binary, so it still says something if step 2 cannot run);
#   4. `rws serve --device cuda:0` on a small synthetic model: classify, switch to a
#      two-signature profile, classify again (GPU work from several threads).
# Results go to $OUT (the device runner's output folder) or ./gpu-out.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu-out}"
BIN="${RWS_BIN:-$PWD/target/cuda/release/rws}"
PY="${TORCH_PYTHON:-/opt/torch/.venv/bin/python3}"
mkdir -p "$OUT"
if [ ! -x "$BIN" ] && [ -f target/cuda/rws.gz ]; then
    mkdir -p "$(dirname "$BIN")"
    gzip -dc target/cuda/rws.gz >"$BIN" && chmod +x "$BIN"
fi
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
failed=()

step() { echo; echo "=== $*"; }

# The CUDA 13 user-space libraries (cuBLAS, cuRAND, NVRTC, cudart) come from
# PyTorch's wheels; the driver supplies libcuda.so.1.
CU13="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/nvidia/cu13/lib"
if [ -d "$CU13" ]; then
    export LD_LIBRARY_PATH="$CU13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    echo "warning: no $CU13; set TORCH_PYTHON to a python whose site-packages hold nvidia/cu13/lib" >&2
fi

step "1. environment"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || failed+=(nvidia-smi)
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ls "$CU13" 2>/dev/null | tr '\n' ' '; echo
if [ -x "$BIN" ]; then
    ls -l "$BIN"
    if ldd "$BIN" | grep 'not found'; then
        echo "the binary misses shared libraries (above): steps 2 and 4 will fail" >&2
        failed+=(libraries)
    fi
    ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc'
else
    echo "no binary at $BIN: build it with scripts/build-cuda.sh and carry it" >&2
    failed+=(binary)
fi

step "2. rws bench gpu"
if [ -x "$BIN" ]; then
    timeout 420 "$BIN" bench gpu --device cuda:0 --json >"$OUT/bench-gpu.json" 2>"$OUT/bench-gpu.log"
    rc=$?
    tail -n 5 "$OUT/bench-gpu.log"
    [ $rc -eq 0 ] || failed+=("bench gpu (exit $rc)")
    [ -s "$OUT/bench-gpu.json" ] && "$PY" - "$OUT/bench-gpu.json" <<'EOF' || true
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
    print(f"  {m['arch']} logits GPU vs CPU: {m['max_rel_err_logits']:.2e}")
for s in r["switch"]:
    a = s["apply"]
    print(f"  {s['arch']} switch p50 {a['p50_us']:.1f} us p99 {a['p99_us']:.1f} us")
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
timeout 300 "$PY" scripts/gpu/check_kernel_cupy.py --json "$OUT/cupy.json" || failed+=("cupy check")

step "4. rws serve --device cuda:0"
if [ -x "$BIN" ]; then
    tmp=$(mktemp -d)
    (
        set -e
        "$BIN" synth --arch resnet-small --out "$tmp/models/small" >/dev/null
        "$BIN" serve --repo "$tmp/models" --addr 127.0.0.1:0 --metrics-addr off \
            --device cuda:0 >"$tmp/serve.out" 2>"$OUT/serve.log" &
        server=$!
        trap 'kill $server 2>/dev/null' EXIT
        for _ in $(seq 100); do
            addr=$(sed -n 's/^rws listening on //p' "$tmp/serve.out")
            [ -n "$addr" ] && break
            kill -0 $server 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
            sleep 0.2
        done
        grep -m1 serving "$OUT/serve.log" || true
        client=(--addr "http://$addr")
        "$BIN" classify docs/fog-digit.png "${client[@]}"
        "$BIN" profile put storm synthetic-fog@0.7 synthetic-noise@0.5 "${client[@]}"
        "$BIN" classify docs/fog-digit.png --profile storm "${client[@]}"
        "$BIN" profile default storm "${client[@]}"
        "$BIN" classify docs/fog-digit.png "${client[@]}"
    ) || failed+=("serve on cuda:0")
    rm -rf "$tmp"
fi

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu-check: all steps passed (results in $OUT)"
else
    echo "gpu-check: FAILED: ${failed[*]} (results in $OUT)" >&2
    exit 1
fi
