#!/usr/bin/env bash
# Builds `rws` with the `cuda` feature on a machine without a CUDA toolkit or a GPU
# (the recipe verified in /work/shared/NOTES.md and docs/CUDA.md), idempotently:
#   1. pip-downloads the pinned CUDA 13.0 wheels into .cuda/wheels (gitignored),
#   2. unpacks them into .cuda/site (nvidia/cu13/{bin,include,lib,nvvm}), restores
#      exec bits and the unversioned .so links the linker needs,
#   3. makes the link-time libcuda stub (every cu* entry point cudarc declares,
#      each returning CUDA_ERROR_STUB_LIBRARY), since no wheel ships libcuda,
#   4. runs cargo into target/cuda so the CPU build in target/ stays valid.
# CUDA 13.0 is pinned because the GPU machines run driver 580, whose PTX loader
# takes PTX 9.0; newer nvcc wheels emit PTX it may reject.
#
# Usage: scripts/build-cuda.sh                 # cargo build --release --features cuda
#        scripts/build-cuda.sh clippy --release --all-targets -- -D warnings
#        (any other arguments replace `build --release`; `--features cuda` is added
#        after the cargo subcommand)
# A build also writes target/cuda/rws.gz: the stripped binary is ~61 MiB, and the
# device runner carries at most 64 MiB with the working tree, so carry the .gz
# (scripts/gpu-check.sh unpacks it).
# Env:   CUDA_COMPUTE_CAP (default 90: H100/H200), CUDA_WHEEL_DIR (default .cuda),
#        RWS_CUDNN=1: also the cuDNN 9.19 wheel, and the `cudnn` feature (candle's
#        convolutions on cuDNN); the binary is then written to target/cuda/rws-cudnn.gz.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_DIR="${CUDA_WHEEL_DIR:-$PWD/.cuda}"
WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)
# The cuDNN that PyTorch 2.11 (cu130) ships, so the GPU machines have it at run time.
CUDNN_WHEEL=nvidia-cudnn-cu13==9.19.0.56
if [ "${RWS_CUDNN:-0}" = 1 ]; then
    WHEELS+=("$CUDNN_WHEEL")
fi
PREFIX="$CUDA_DIR/site/nvidia/cu13"

# 1. Wheels (~675 MB, cuBLAS is 421 MB). pip skips files already in the folder.
mkdir -p "$CUDA_DIR/wheels"
if [ "$(ls "$CUDA_DIR"/wheels/*.whl 2>/dev/null | wc -l)" -lt "${#WHEELS[@]}" ]; then
    echo "build-cuda: downloading CUDA 13.0 wheels into $CUDA_DIR/wheels" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$CUDA_DIR/wheels" "${WHEELS[@]}"
fi

# 2. Unpack each wheel once (a marker per wheel), so that switching RWS_CUDNN on and
#    off unpacks nothing again; a wheel that is no longer pinned wipes the folder.
pinned=("${WHEELS[@]}" "$CUDNN_WHEEL")
for m in "$CUDA_DIR"/site/.unpacked-*; do
    [ -e "$m" ] || continue
    if [[ ! " ${pinned[*]} " == *" ${m##*/.unpacked-} "* ]]; then
        echo "build-cuda: ${m##*/.unpacked-} is no longer pinned: unpacking afresh" >&2
        rm -rf "$CUDA_DIR/site"
        break
    fi
done
mkdir -p "$CUDA_DIR/site"
for pin in "${WHEELS[@]}"; do
    [ -f "$CUDA_DIR/site/.unpacked-$pin" ] && continue
    name=${pin%%==*}
    whl=$(ls "$CUDA_DIR"/wheels/"${name//-/_}"-"${pin##*==}"-*.whl)
    echo "build-cuda: unpacking $whl" >&2
    python3 -m zipfile -e "$whl" "$CUDA_DIR/site"
    touch "$CUDA_DIR/site/.unpacked-$pin"
done
# zipfile drops the mode bits.
chmod +x "$PREFIX"/bin/* "$PREFIX"/nvvm/bin/*
# Wheels ship only sonames (libfoo.so.13); the linker looks for libfoo.so.
for lib in cublas cublasLt cudart curand nvrtc; do
    so=$(cd "$PREFIX/lib" && ls "lib$lib.so."* | sort | head -n1)
    ln -sf "$so" "$PREFIX/lib/lib$lib.so"
done
# cuDNN unpacks beside cu13 (nvidia/cudnn/lib); the linker finds it through cu13/lib.
if [ -f "$CUDA_DIR/site/nvidia/cudnn/lib/libcudnn.so.9" ]; then
    ln -sf ../../cudnn/lib/libcudnn.so.9 "$PREFIX/lib/libcudnn.so"
fi

# 3. libcuda stub, for linking only: on the GPU machine the driver's libcuda.so.1
#    is loaded instead. cudarc's build script searches $CUDA_HOME/lib/stubs.
CUDARC_SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | sort -V | tail -n1)
stub="$PREFIX/lib/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$CUDARC_SYS" -nt "$stub" ]; then
    echo "build-cuda: generating libcuda stub from $CUDARC_SYS" >&2
    mkdir -p "$PREFIX/lib/stubs"
    {
        echo "/* Link-time stub: every entry point returns CUDA_ERROR_STUB_LIBRARY (34). */"
        grep -oE '\bfn cu[A-Z][A-Za-z0-9_]*' "$CUDARC_SYS" | sed 's/^fn //' | sort -u |
            sed 's/.*/int &(void) { return 34; }/'
    } >"$PREFIX/lib/stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$PREFIX/lib/stubs/libcuda_stub.c"
    # With lib and lib/stubs on LD_LIBRARY_PATH a CUDA build also runs here: it finds
    # no GPU (every call fails), which is how its tests and the CPU fallback run.
    ln -sf libcuda.so "$PREFIX/lib/stubs/libcuda.so.1"
fi

# 4. Build, stripped (with symbols the binary is over 100 MiB).
export CUDA_HOME="$PREFIX"
export PATH="$PREFIX/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
export CARGO_PROFILE_RELEASE_STRIP=symbols
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
if [ $# -eq 0 ]; then
    set -- build --release
fi
feature=cuda
gz="$CARGO_TARGET_DIR/rws.gz"
if [ "${RWS_CUDNN:-0}" = 1 ]; then
    feature=cudnn
    gz="$CARGO_TARGET_DIR/rws-cudnn.gz"
fi
start=$(date +%s)
cargo "$1" --features "$feature" "${@:2}"
echo "build-cuda: cargo $1 --features $feature ${*:2} took $(($(date +%s) - start)) s" >&2
bin="$CARGO_TARGET_DIR/release/rws"
if [ "$1" = build ] && [ -f "$bin" ]; then
    gzip -9 -c "$bin" >"$gz"
    echo "build-cuda: $bin is $(stat -c %s "$bin") bytes, $gz $(stat -c %s "$gz")" >&2
fi
