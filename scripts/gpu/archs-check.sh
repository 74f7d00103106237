#!/usr/bin/env bash
# The new architectures on a GPU (issue 18), in one command on the device machine:
# `rws bench gpu` on synthetic EfficientNet-Lite0, MobileNetV2 and VGG-16 (with and
# without BatchNorm): the CUDA kernel against the CPU's, patched logits GPU vs CPU,
# switch and inference times; then the real EfficientNet-Lite0 served from the GPU,
# asked about the fetched photos. Carry target/cuda/rws.gz, models/efficientnet-lite0
# and data/imagenet/{foolbox,photos}.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
zcat target/cuda/rws.gz > /tmp/rws && chmod +x /tmp/rws
PY=/opt/torch/.venv/bin/python3
[ -x "$PY" ] || PY=python3
LIB=$("$PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
export LD_LIBRARY_PATH="$LIB:${LD_LIBRARY_PATH:-}"
nvidia-smi -L > "$OUT/env.txt" 2>&1
ldd /tmp/rws | grep -c "not found" >> "$OUT/env.txt"
echo "== bench gpu" >&2
timeout 300 /tmp/rws bench gpu --archs efficientnet-lite0,mobilenet-v2,vgg16-bn,vgg16 \
    --patchable-blocks 2 --applies 200 --batch 1,8,32 --iterations 20 \
    > "$OUT/bench-gpu.txt" 2> "$OUT/bench-gpu.err"
echo "bench gpu exit $?" >> "$OUT/env.txt"
echo "== serve" >&2
/tmp/rws serve --device cuda:0 --repo models --model efficientnet-lite0 --trust-loopback \
    --addr 127.0.0.1:50051 --metrics-addr 127.0.0.1:0 --console-addr 127.0.0.1:0 \
    --events-addr 127.0.0.1:0 > "$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do
    /tmp/rws classify data/imagenet/photos/coffee.png --addr http://127.0.0.1:50051 >/dev/null 2>&1 && break
    sleep 0.5
done
for f in data/imagenet/foolbox/*.png data/imagenet/photos/*.png; do
    echo "== $f"
    /tmp/rws classify "$f" --addr http://127.0.0.1:50051 --top-k 1 2>&1
done > "$OUT/classify-gpu.txt"
kill $server
echo "== infer" >&2
timeout 120 /tmp/rws bench infer --device cuda:0 --model efficientnet-lite0 --batch 1,8,32 \
    --iterations 20 > "$OUT/infer-gpu.txt" 2>&1
timeout 120 /tmp/rws bench infer --device cpu --model efficientnet-lite0 --batch 1,8 \
    --iterations 5 > "$OUT/infer-cpu16.txt" 2>&1
tail -n 5 "$OUT/bench-gpu.txt" "$OUT/infer-gpu.txt" "$OUT/classify-gpu.txt"
