#!/usr/bin/env bash
# Tries ubd-engine for real on a machine whose kernel has no ublk: boots a VM with a
# Debian kernel that has ublk_drv (installing what is needed on first use), serves a
# device with the given ubd-engine arguments, shows it, runs a short fio job with
# crc32c verification on it, then stops it.
#
# usage: tests/vm/try.sh [--kernel lts|newest] [UBD-ENGINE-ARGS...]
#   default arguments: --cpus 0,1 loop /tmp/ubd-try.img (a 256 MiB file in the VM)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=vm/as-root.sh
source "$ROOT/tests/vm/as-root.sh"
kernel=lts
if [[ ${1:-} == --kernel ]]; then
    kernel=${2:?}
    shift 2
fi
args=("$@")
((${#args[@]})) || args=(--cpus 0,1 loop /tmp/ubd-try.img)

cargo build --release --manifest-path "$ROOT/Cargo.toml" -p ubd-tools
bin=$ROOT/target/release/ubd-engine

guest=$(mktemp /tmp/ubd-try.XXXXXX.sh)
trap 'rm -f "$guest"' EXIT
cat >"$guest" <<GUEST
set -u
modprobe ublk_drv
truncate -s 256M /tmp/ubd-try.img
$bin $(printf '%q ' "${args[@]}") >/tmp/dev.txt &
pid=\$!
for _ in \$(seq 600); do [[ -s /tmp/dev.txt ]] && break; kill -0 \$pid 2>/dev/null || exit 1; sleep 0.1; done
dev=\$(head -n1 /tmp/dev.txt)
echo "== served: \$dev"
$bin list
lsblk "\$dev"
echo "== fio: 10 s random read/write with crc32c verification"
fio --name=try --filename="\$dev" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=32 \
    --size=64M --time_based --runtime=10 --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting |
    grep -E 'IOPS|err=|verify'
rc=\${PIPESTATUS[0]}
kill -TERM \$pid
wait \$pid
echo "== ubd-engine exited \$?; fio exited \$rc"
exit \$rc
GUEST
exec "$ROOT/tests/vm/run.sh" --kernel "$kernel" --quiet -- bash "$guest"
