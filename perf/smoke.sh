#!/usr/bin/env bash
# A tiny end-to-end `ubd-perf compare` (one 1-second cell per system), for the e2e
# suite: runs as root where ublk_drv is loaded (inside the test VM), checks that
# every system produced IOPS, that every output file exists, and that no ublk
# device is left behind. Prints one line per check; exits non-zero on failure.
#
# usage: perf/smoke.sh UBD_ENGINE_BINARY OUT_DIR [BACKING]
#   BACKING defaults to /dev/ram0 (made with modprobe brd when absent); only
#   read workloads run on it, so its contents are kept.
set -euo pipefail
ubd=${1:?usage: smoke.sh UBD_ENGINE_BINARY OUT_DIR [BACKING]}
out=${2:?usage: smoke.sh UBD_ENGINE_BINARY OUT_DIR [BACKING]}
backing=${3:-}
# UBD_PERF names ubd-perf when it is not next to the engine binary (the e2e build has its own target dir).
perf=${UBD_PERF:-$(dirname "$ubd")/ubd-perf}
[[ -x $perf ]] || { echo "smoke.sh: $perf not found (cargo build --release -p ubd-perf)" >&2; exit 1; }
args=(compare --engine "$ubd" --rounds 1 --runtime 1 --ramp 0 --workloads randread-4k-qd1 --out "$out")
[[ -n $backing ]] && args+=(--backing "$backing")
"$perf" "${args[@]}" >"$out.stdout"
for f in results.json results.csv report.md iops.png latency.png; do
    [[ -s $out/$f ]] || { echo "smoke.sh: $out/$f missing or empty" >&2; exit 1; }
done
# Every system row has IOPS > 0, and there are at least raw, kloop, engine-loop*, engine-null.
awk -F, 'NR > 1 { n++; if ($4 <= 0) { print "smoke.sh: no IOPS for " $2 > "/dev/stderr"; bad = 1 } }
         END { if (n < 4) { print "smoke.sh: only " n " systems" > "/dev/stderr"; bad = 1 }; exit bad }' "$out/results.csv"
if ls /dev/ublkb* >/dev/null 2>&1; then
    echo "smoke.sh: ublk devices left behind: $(ls /dev/ublkb*)" >&2
    exit 1
fi
echo "smoke.sh: $(($(wc -l <"$out/results.csv") - 1)) systems measured: $(awk -F, 'NR > 1 { printf "%s ", $2 }' "$out/results.csv")"
