#!/usr/bin/env bash
# The leak check of docs/RELIABILITY.md, with valgrind's memcheck:
#   1. a shortened soak (scripts/soak.sh) with the server under valgrind;
#   2. the server test files, each binary under valgrind.
# Each run's report is in OUT_DIR (default runs/leaks). Fails if valgrind finds
# any byte definitely or indirectly lost, or any invalid read or write.
#
#   scripts/leaks.sh [SOAK_MINUTES] [OUT_DIR]     default 3 minutes
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-3}
out=${2:-runs/leaks}
# The test files whose servers run in the test process (the others start `rws
# serve` processes, which valgrind would not follow); tests/atomicity.rs's storms
# are left out, being too slow under valgrind.
tests="serve bad_input ops kserve"
mkdir -p "$out"
command -v valgrind >/dev/null || {
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind >/dev/null
}

# Errors and definite or indirect leaks fail the run (scripts/valgrind.supp lists
# the reports in code rws does not own, each a checked false positive); "possibly lost" and "still
# reachable" are listed in the reports (process-wide statics, threads alive at exit).
memcheck="valgrind --suppressions=scripts/valgrind.supp --leak-check=full --show-leak-kinds=definite,indirect,possible \
--errors-for-leak-kinds=definite,indirect --num-callers=40 --error-exitcode=99"

RWS_SOAK_WRAP="$memcheck --log-file=$out/soak.valgrind" scripts/soak.sh "$minutes" "$out/soak"

# The test binaries, as cargo builds them; one test at a time keeps valgrind's
# serialised threads from timing out the tests' deadlines.
bins=$(for t in $tests; do
    cargo test --test "$t" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
done)
status=0
for bin in $bins; do
    name=$(basename "$bin" | sed 's/-[0-9a-f]*$//')
    echo "== $name under valgrind"
    RAYON_NUM_THREADS=2 $memcheck --log-file="$out/$name.valgrind" "$bin" --test-threads=1 \
        >"$out/$name.log" 2>&1 || status=$?
done

echo "== summary"
for f in "$out"/*.valgrind; do
    printf '%-22s %s; %s; %s\n' "$(basename "$f" .valgrind)" \
        "$(grep -h 'definitely lost:' "$f" | sed 's/.*definitely/definitely/' | tail -1)" \
        "$(grep -h 'indirectly lost:' "$f" | sed 's/.*indirectly/indirectly/' | tail -1)" \
        "$(grep -h 'ERROR SUMMARY' "$f" | sed 's/.*ERROR/ERROR/' | tail -1)"
done
if grep -l 'ERROR SUMMARY: [1-9]' "$out"/*.valgrind; then
    echo "valgrind found errors or leaks: see the files above"
    exit 1
fi
exit "$status"
