#!/usr/bin/env bash
# engine-rbd beside krbd and rbd-nbd on one throwaway single-node Ceph cluster (one
# mon, one memstore OSD on 127.0.0.1, tests/e2e/ceph-cluster.sh) and one image, with
# `ubd-perf compare`. Runs as root where ublk_drv exists (the test VM, 6G of memory):
#
#   tests/vm/run.sh --kernel newest --quiet --memory 6G -- $PWD/perf/rbd.sh [options]
#
# options (the rest go to ubd-perf compare):
#   --rounds N     interleaved rounds (default 3)
#   --runtime SEC  fio seconds per cell (default 10; under TCG the OSD serves a few
#                  hundred IOPS, so short runs are noisy)
#   --size SIZE    the image (default 256M), written once before the runs
#   --out DIR      results (default $UBD_VM_SHARED/perf/rbd-TIME, else /tmp/ubd-vm/...)
# Needs the release build (cargo build --release: ubd-engine, ubd-perf, ubd-ceph-mon).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=3 runtime=10 size=256M out="" rest=()
while (($#)); do
    case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) rest+=("$1"); shift ;;
    esac
done
out=${out:-${UBD_VM_SHARED:-/tmp/ubd-vm}/perf/rbd-$(date +%Y%m%d-%H%M%S)}
bin=$ROOT/target/release
for b in ubd-engine ubd-perf ubd-ceph-mon; do
    [[ -x $bin/$b ]] || { echo "rbd.sh: $bin/$b is missing: cargo build --release" >&2; exit 1; }
done
modprobe ublk_drv
dir=$(mktemp -d /tmp/ubd-perf-ceph.XXXXXX)
cleanup() {
    bash "$ROOT/tests/e2e/ceph-cluster.sh" stop "$dir" || true
}
trap cleanup EXIT
UBD_CEPH_MON=$bin/ubd-ceph-mon bash "$ROOT/tests/e2e/ceph-cluster.sh" start "$dir" >/dev/null
conf=$dir/ceph.conf
rbd -c "$conf" create --size "$size" rbd/perf
# Written once, so that reads reach the OSD (objects that do not exist read as zeroes
# without it).
rbd -c "$conf" bench --io-type write --io-size 4M --io-pattern seq --io-total "$size" rbd/perf >/dev/null
export UBD_PERF_RBD_CONF=$conf UBD_PERF_RBD_IMAGE=rbd/perf
"$bin/ubd-perf" compare --engine "$bin/ubd-engine" --systems krbd,rbd-nbd,engine-rbd,rbd-nbd-lean,engine-rbd-lean --jobs-dir "$ROOT/perf/jobs-rbd" \
    --rounds "$rounds" --runtime "$runtime" --ramp 2 --out "$out" "${rest[@]}"
echo "rbd.sh: results in $out"
