#!/usr/bin/env bash
# Builds the Debian package target/debian/ubd-engine_VERSION-1_ARCH.deb with cargo-deb:
# the binary, the systemd unit, the man pages and completions (generated from the clap
# definitions by `ubd-engine generate-docs`), an example configuration.
# Installs cargo-deb (crates.io) when it is missing. Prints the package's path.
# usage: packaging/build-deb.sh [cargo-deb options]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb.sh: installing cargo-deb (cargo install cargo-deb)" >&2
    cargo install --locked --quiet cargo-deb
fi
# The whole workspace, as tests/build-e2e.sh builds it: -p ubd-tools alone unifies the
# dependencies' features differently and rebuilds them.
cargo build --release --quiet
rm -rf target/docs
target/release/ubd-engine generate-docs target/docs >/dev/null
gzip -9n target/docs/man/*.1
rm -f target/debian/ubd-engine_*.deb
cargo deb --no-build --strip -p ubd-tools --quiet "$@" >&2
# The one line on stdout: the package's path.
ls -1 "$PWD"/target/debian/ubd-engine_*.deb
