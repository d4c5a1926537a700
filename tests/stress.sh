#!/usr/bin/env bash
# Reliability stress, longer than CI's suite: many kill -9 + recover rounds across the
# buffer modes, many add/del cycles, and the fault-injection and kill -9 cases, on
# each kernel, in the test VM. Prints the suite's per-case lines and a summary.
#
# usage: sudo tests/stress.sh [--kernels "lts newest"] [--rounds N] [--cycles N] [--repeat N]
#   --rounds N   kill -9 / recover rounds per kernel (default 50)
#   --cycles N   add/start/stop/del cycles per kernel (default 300; a tenth with fio)
#   --repeat N   run the fault, abort and kill -9 cases N times (default 3)
# Needs what tests/run-all.sh installs (it runs tests/vm/setup.sh first).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=vm/as-root.sh
source "$ROOT/tests/vm/as-root.sh"
cd "$ROOT" || exit 1
kernels="lts newest" rounds=50 cycles=300 repeat=3
while (($#)); do
    case $1 in
    --kernels) kernels=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --cycles) cycles=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    *) echo "usage: $0 [--kernels \"lts newest\"] [--rounds N] [--cycles N] [--repeat N]" >&2; exit 2 ;;
    esac
done
tests/vm/setup.sh >/dev/null || { echo "stress: tests/vm/setup.sh failed" >&2; exit 1; }
tests/build-e2e.sh || exit 1
total_pass=0 total_fail=0
for k in $kernels; do
    for ((r = 0; r < repeat; r++)); do
        # The first repeat also runs the long recovery and cycle cases.
        only='fault_errors|fault_delay_stall|abort|kill9_states'
        ((r == 0)) && only="$only|recover|cycles"
        log=/tmp/ubd-stress-$k-$r.log
        echo "=== kernel $k, pass $((r + 1))/$repeat: $only"
        tests/vm/run.sh --kernel "$k" --quiet --timeout 7200 \
            --env UBD_BIN="$ROOT/target/e2e/release/ubd-engine" --env UBD_E2E_ONLY="^($only)\$" \
            --env UBD_RECOVER_ROUNDS="$rounds" --env UBD_CYCLES="$cycles" --env UBD_FIO_CYCLES=$((cycles / 10)) \
            -- "$ROOT/tests/e2e/suite.sh" 2>&1 | tee "$log" | grep -E '^(PASS|FAIL|SKIP|===)|recoveries|cycles|injected|KNOWN'
        read -r p f < <(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n1 | awk '{ print $1, $3 }')
        total_pass=$((total_pass + ${p:-0})) total_fail=$((total_fail + ${f:-1}))
    done
done
echo "$total_pass passed, $total_fail failed"
((total_fail == 0))
