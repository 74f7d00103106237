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
# Env:   CUDA_COMPUTE_CAP (default 90: H100/H200), CUDA_WHEEL_DIR (default .cuda).
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
PREFIX="$CUDA_DIR/site/nvidia/cu13"

# 1. Wheels (~675 MB, cuBLAS is 421 MB). pip skips files already in the folder.
mkdir -p "$CUDA_DIR/wheels"
if [ "$(ls "$CUDA_DIR"/wheels/*.whl 2>/dev/null | wc -l)" -lt "${#WHEELS[@]}" ]; then
    echo "build-cuda: downloading CUDA 13.0 wheels into $CUDA_DIR/wheels" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$CUDA_DIR/wheels" "${WHEELS[@]}"
fi

# 2. Unpack once; the marker names the wheel set so a changed pin re-unpacks.
marker="$CUDA_DIR/site/.unpacked"
want="${WHEELS[*]}"
if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$want" ]; then
    echo "build-cuda: unpacking into $CUDA_DIR/site" >&2
    rm -rf "$CUDA_DIR/site"
    mkdir -p "$CUDA_DIR/site"
    for w in "$CUDA_DIR"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$CUDA_DIR/site"
    done
    # zipfile drops the mode bits.
    chmod +x "$PREFIX"/bin/* "$PREFIX"/nvvm/bin/*
    # Wheels ship only sonames (libfoo.so.13); the linker looks for libfoo.so.
    for lib in cublas cublasLt cudart curand nvrtc; do
        so=$(cd "$PREFIX/lib" && ls "lib$lib.so."* | sort | head -n1)
        ln -sf "$so" "$PREFIX/lib/lib$lib.so"
    done
    echo "$want" >"$marker"
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
start=$(date +%s)
cargo "$1" --features cuda "${@:2}"
echo "build-cuda: cargo $1 --features cuda ${*:2} took $(($(date +%s) - start)) s" >&2
bin="$CARGO_TARGET_DIR/release/rws"
if [ "$1" = build ] && [ -f "$bin" ]; then
    gzip -9 -c "$bin" >"$CARGO_TARGET_DIR/rws.gz"
    echo "build-cuda: $bin is $(stat -c %s "$bin") bytes, $CARGO_TARGET_DIR/rws.gz $(stat -c %s "$CARGO_TARGET_DIR/rws.gz")" >&2
fi
