#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets/) with cargo-fuzz and libFuzzer, each
# for SECONDS (default 30), starting from its committed seeds (fuzz/seeds/TARGET)
# plus what earlier runs here found (fuzz/corpus/TARGET, not committed). Any
# crash, timeout or over-allocation fails the run and leaves the input under
# fuzz/artifacts/TARGET/. Installs cargo-fuzz and the nightly toolchain when
# they are missing.
#   scripts/fuzz.sh              every target, 30 s each (what CI runs)
#   scripts/fuzz.sh 600 image    one target, 10 minutes
set -euo pipefail
cd "$(dirname "$0")/.."

# `cargo install` puts cargo-fuzz here; make sure `cargo fuzz` finds it.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
seconds=${1:-30}
shift || true
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

cargo +nightly fuzz build
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
    rm -rf "fuzz/artifacts/$t"
    echo "fuzz: $t for ${seconds}s"
    # -malloc_limit_mb: one allocation above 1 GiB is a finding (the largest
    # legitimate one, a 40-megapixel image as f32 RGB, is under 500 MB).
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=3072 -malloc_limit_mb=1024 \
        -print_final_stats=1 2>&1 | grep -E '^(stat::|==|SUMMARY|Done)|DONE|panicked|ERROR' || true
    # cargo fuzz run exits non-zero on a finding; the grep above hides that, so check the artifacts.
    if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
        echo "fuzz: $t found an input that fails: $(ls fuzz/artifacts/$t)" >&2
        exit 1
    fi
done
