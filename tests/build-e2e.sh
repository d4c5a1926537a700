#!/usr/bin/env bash
# Builds the release binaries (target/release) and the e2e suite's build of them with the
# engine's test hooks (UBD_DEBUG_PAUSE, UBD_DEBUG_QUEUE_PANIC), which a release meant for
# use does not have, into target/e2e/release. Both builds use one target directory, so
# the dependencies build once and only the project's crates build twice (a target
# directory of its own for the e2e build cost CI 90 s); target/release ends with the
# plain build (cargo keeps both, so putting it back is a copy, not a build).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo build --release --quiet --features ubd-tools/test-hooks
mkdir -p target/e2e/release
cp target/release/ubd-engine target/release/ubd-ceph-mon target/e2e/release/
# The README's C client example for the shared-memory case, built here: gcc under TCG
# took the case 30-40 s.
cc -O2 -Wall -Werror -o target/e2e/release/shmem_io examples/shmem/shmem_io.c
cargo build --release --quiet
