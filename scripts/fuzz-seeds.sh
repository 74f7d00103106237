#!/usr/bin/env bash
# Grows each fuzz target's corpus for SECONDS (default 300) with scripts/fuzz.sh,
# minimises it with libFuzzer's set-cover merge, and makes the result the committed seeds:
# fuzz/seeds/TARGET/ keeps its named files (the real files it started from, and
# each input a bug was once found with) and gets the minimised corpus as
# cmin-HASH files, replacing those of the run before. CI's 30 s runs then start
# from the coverage the long runs reached.
#   scripts/fuzz-seeds.sh            every target, 5 minutes each
#   scripts/fuzz-seeds.sh 600 image  one target, 10 minutes
#   scripts/fuzz-seeds.sh 0          no new runs: merge what fuzz/corpus holds
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

seconds=${1:-300}
shift || true
[ "$seconds" = 0 ] || scripts/fuzz.sh "$seconds" "$@"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)

for t in "${targets[@]}"; do
    # The smallest set of inputs covering what the corpus and the seeds cover
    # (libFuzzer's set-cover merge; plain `cargo fuzz cmin` kept half again as many).
    out=$(mktemp -d)
    cargo +nightly fuzz run "$t" "$out" "fuzz/corpus/$t" "fuzz/seeds/$t" -- -set_cover_merge=1 2>&1 |
        grep -E 'MERGE-OUTER: [0-9]+ new files|ERROR' || true
    # The named seeds stay as they are; the merge names its files by content SHA-1.
    named=$(for f in "fuzz/seeds/$t"/*; do
        case "$(basename "$f")" in cmin-*) ;; *) sha1sum "$f" | cut -d' ' -f1 ;; esac
    done)
    rm -f "fuzz/seeds/$t"/cmin-*
    for f in "$out"/*; do
        grep -qx "$(basename "$f")" <<<"$named" || cp "$f" "fuzz/seeds/$t/cmin-$(basename "$f")"
    done
    rm -rf "$out"
    echo "fuzz-seeds: $t: $(ls "fuzz/seeds/$t" | grep -c '^cmin-') minimised inputs," \
        "$(du -sh --apparent-size "fuzz/seeds/$t" | cut -f1) of seeds"
done
