#!/usr/bin/env bash
# How fast does this kernel copy data under the VM? brd O_DIRECT reads (brd copies into
# the reader's pages), then a cpu-clock profile and the annotation of the hottest kernel
# symbol. Run as root in the VM:  tests/vm/run.sh --kernel newest -- perf/memcpy-check.sh
# (see perf/docs/profile-7.2.md: 7.2's `rep movsb` memcpy is ~4x slower than 6.12's under TCG).
set -uo pipefail
PERF=${PERF:-/usr/bin/perf}
echo -1 >/proc/sys/kernel/perf_event_paranoid
echo 0 >/proc/sys/kernel/kptr_restrict
[[ -e /dev/ram0 ]] || modprobe brd rd_nr=1 rd_size=$((256 * 1024))
dd if=/dev/zero of=/dev/ram0 bs=1M count=256 oflag=direct status=none
echo "kernel $(uname -r); CPU copy flags: $(grep -o -w -E 'erms|fsrm|fsrs|rep_good' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for spec in 4k:65536 16k:16384 1M:256; do
    echo "bs=${spec%%:*}: $(dd if=/dev/ram0 of=/dev/null bs="${spec%%:*}" count="${spec#*:}" iflag=direct 2>&1 | tail -1)"
done
data=$(mktemp /tmp/memcpy-check.XXXXXX)
"$PERF" record -q -a -e cpu-clock -F 999 -o "$data" -- \
    dd if=/dev/ram0 of=/dev/null bs=16k count=16384 iflag=direct 2>/dev/null
"$PERF" report -i "$data" --no-children --sort sym --stdio 2>/dev/null | grep -v -e '^#' -e '^$' | head -6
sym=$("$PERF" report -i "$data" --no-children --sort sym --stdio 2>/dev/null |
    awk '/\[k\]/ && !/halt/ { print $3; exit }')
echo "hottest instructions of $sym:"
"$PERF" annotate -i "$data" --stdio -s "$sym" 2>/dev/null | grep -E '^ +[0-9]+\.[0-9]+ :' | sort -rn | head -5
rm -f "$data"
