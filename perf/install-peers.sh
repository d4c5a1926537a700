#!/usr/bin/env bash
# Installs peer ublk servers that `ubd-perf compare` measures beside ubd-engine.
# Today: rublk, from crates.io, into $UBD_PEERS (default /var/cache/ubd-engine/peers),
# so its binary is $UBD_PEERS/bin/rublk. Idempotent: does nothing when it is there.
# Needs root for apt-get (libclang-dev: rublk's build runs bindgen) and network
# access to Debian's archive and crates.io.
#
# usage: perf/install-peers.sh [--force]
set -euo pipefail

PEERS=${UBD_PEERS:-/var/cache/ubd-engine/peers}
RUBLK_VERSION=${RUBLK_VERSION:-}   # empty: the newest on crates.io
force=0
[[ ${1-} == --force ]] && force=1

if [[ -x $PEERS/bin/rublk && $force == 0 ]]; then
    echo "rublk already installed: $PEERS/bin/rublk ($("$PEERS/bin/rublk" --version 2>/dev/null || echo '?'))"
    exit 0
fi

# Root from here on (apt-get, $PEERS).
source "$(dirname "${BASH_SOURCE[0]}")/../tests/vm/as-root.sh"
command -v cargo >/dev/null || { echo "install-peers.sh: cargo not found (Rust is needed to build rublk)" >&2; exit 1; }
if ! dpkg -s libclang-dev >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq libclang-dev >/dev/null
fi

mkdir -p "$PEERS"
args=(install --locked --root "$PEERS")
[[ -n $RUBLK_VERSION ]] && args+=(--version "$RUBLK_VERSION")
((force)) && args+=(--force)
# Build in a private target dir (removed afterwards) so no other target/ is touched.
build=$PEERS/.build
CARGO_TARGET_DIR=$build cargo "${args[@]}" rublk
rm -rf "$build"
echo "rublk installed: $PEERS/bin/rublk"
