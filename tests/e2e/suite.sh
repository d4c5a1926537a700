#!/usr/bin/env bash
# End-to-end suite for ubd-engine. Runs as root inside a VM with ublk_drv (see
# tests/vm/run.sh); UBD_BIN names the binary. Prints "N passed, N failed" and exits
# non-zero on any failure. UBD_E2E_ONLY=regex runs a subset of cases.
set -uo pipefail
# The system's tools first: the VM shares the host's PATH, where `python3` may be a
# pyenv shim (a shell script that runs pyenv: 12 s per start under TCG, against 0.6-3 s
# for /usr/bin/python3, measured); the suite's Python uses the standard library only.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
# shellcheck source=nbd.sh
source "$HERE/nbd.sh"
# shellcheck source=rbd.sh
source "$HERE/rbd.sh"
# shellcheck source=service.sh
source "$HERE/service.sh"
# shellcheck source=device.sh
source "$HERE/device.sh"
# shellcheck source=unpriv.sh
source "$HERE/unpriv.sh"

echo "=== ubd-engine e2e on $(uname -r), $(nproc) CPUs"
rm -rf "$WORK" && mkdir -p "$WORK"
# Kernel complaints from before the suite are not ours.
dmesg | grep -E "WARNING:|BUG:|UBSAN:|KASAN:|blocked for more than|Oops" >"$WORK/dmesg.seen"
modprobe ublk_drv || { echo "ublk_drv not available"; exit 1; }
# Two RAM disks: ram0 is a raw backing device, ram1 holds an ext4 for backing files.
modprobe brd rd_nr=2 rd_size=262144 || exit 1
mkfs.ext4 -q -F /dev/ram1 && mkdir -p "$WORK/fs" && mount /dev/ram1 "$WORK/fs" || exit 1
FS=$WORK/fs

case_features() {
    "$UBD" features --json >"$WORK/f.json"
    grep -q '"CMD_IOCTL_ENCODE"' "$WORK/f.json"
    log "$(cat "$WORK/f.json")"
}

case_null() {
    start_dev --cpus 0,1 --depth 64 null --size 256M
    [[ $(blockdev --getsize64 "$DEV") == 268435456 ]]
    [[ $(cat /sys/block/"${DEV#/dev/}"/mq/*/nr_tags 2>/dev/null | head -n1) == 64 ]] || log "(nr_tags not visible)"
    ls -d /sys/block/"${DEV#/dev/}"/mq/* | wc -l | grep -qx 2
    fio --name=null --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
        --iodepth=32 --numjobs=2 --size=64M --io_size=16M --group_reporting >"$WORK/fio.out"
    grep -q "err= 0" "$WORK/fio.out"
    # Queue threads serve writeback: PR_SET_IO_FLUSHER sets PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE.
    local t flags nq=0
    for t in /proc/"$PID"/task/*; do
        [[ $(cat "$t/comm") == ubd-q* ]] || continue
        flags=$(awk '{ print $9 }' "$t/stat")
        (((flags & 0x180000) == 0x180000)) || fail "$(cat "$t/comm") flags $flags lack PF_MEMALLOC_NOIO|PF_LOCAL_THROTTLE"
        nq=$((nq + 1))
    done
    ((nq == 2)) || fail "found $nq queue threads, want 2"
    # Live stats: published every second while the device serves.
    local id=${DEV#/dev/ublkb} deadline=$((SECONDS + 30))
    until "$UBD" stats "$id" --json >"$WORK/stats.json" 2>/dev/null &&
        python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["stats"]; t=s["total"]; sys.exit(0 if t["reads"] > 1000 and t["read_latency"]["count"] > 1000 and len(s["queues"]) == 2 and all("batch" not in q for q in [t] + s["queues"]) else 1)' "$WORK/stats.json"; do
        ((SECONDS < deadline)) || fail "stats never showed the fio reads: $(cat "$WORK/stats.json")"
        sleep 0.2
    done
    "$UBD" stats "$id" | tee "$WORK/stats.txt" | grep -E "^total"
    stop_dev
    grep -q "errors 0" "$LOG"
    grep -q "read latency (us, in engine+target): p50" "$LOG"
}

# The null target moves no data: in auto mode the kernel copies nothing (buffer mode
# none, UBLK_F_USER_COPY), with either io protocol, across kill -9 + recover; a forced
# copy still works; `none` is refused for loop, which moves data.
case_null_nocopy() {
    local id rc
    start_dev --queues 2 --depth 32 null --size 256M
    id=${DEV#/dev/ublkb}
    grep -q "buffer mode none (auto: the null target never touches request data and the kernel offers USER_COPY); no buffers: none (no data moved: UBLK_F_USER_COPY)" "$LOG" ||
        { cat "$LOG" >&2; fail "null in auto mode is not in buffer mode none"; }
    log "$(grep -o 'buffer mode none.*' "$LOG")"
    "$UBD" list --json | python3 -c 'import json,sys; d=[e for e in json.load(sys.stdin) if e["dev_id"]==int(sys.argv[1])][0]; sys.exit(0 if "USER_COPY" in d["flags"] else 1)' "$id" ||
        fail "device $id lacks USER_COPY: $("$UBD" list --json)"
    fio --name=rw --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
        --iodepth=32 --numjobs=2 --size=256M --io_size=16M --group_reporting >"$WORK/fio.out"
    grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out" >&2; fail "fio randrw"; }
    # Sequential writes then reads, large and small, without verification (no data is kept).
    fio --name=w --filename="$DEV" --ioengine=io_uring --direct=1 --rw=write --bsrange=4k-512k \
        --iodepth=16 --size=64M --group_reporting >"$WORK/fio-w.out"
    fio --name=r --filename="$DEV" --ioengine=io_uring --direct=1 --rw=read --bsrange=4k-512k \
        --iodepth=16 --size=64M --group_reporting >"$WORK/fio-r.out"
    grep -q "err= 0" "$WORK/fio-w.out" && grep -q "err= 0" "$WORK/fio-r.out" ||
        { cat "$WORK/fio-w.out" "$WORK/fio-r.out" >&2; fail "fio write/read"; }
    "$UBD" stats "$id" >"$WORK/stats.txt"
    head -n1 "$WORK/stats.txt" | grep -q "buffer mode none (no data moved: UBLK_F_USER_COPY)" ||
        fail "stats: $(cat "$WORK/stats.txt")"
    "$UBD" stats "$id" --json >"$WORK/stats.json"
    grep -q '"buffer_mode": "none"' "$WORK/stats.json" || fail "stats --json: $(cat "$WORK/stats.json")"
    log "$(head -n1 "$WORK/stats.txt")"
    stop_dev
    grep -q "errors 0" "$LOG"
    # UBLK_F_BATCH_IO with USER_COPY: PREP/COMMIT elements carry no buffer address.
    if [[ $("$UBD" features --json) == *'"BATCH_IO"'* ]]; then
        start_dev --queues 2 --depth 32 --io-protocol batch null --size 64M
        grep -q "io protocol batch" "$LOG" && grep -q "buffer mode none (auto" "$LOG"
        fio --name=b --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bsrange=4k-128k \
            --iodepth=32 --numjobs=2 --size=64M --io_size=16M --group_reporting >"$WORK/fio.out"
        grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out" >&2; fail "fio randrw, batch"; }
        stop_dev
        grep -q "errors 0" "$LOG"
        log "io protocol batch in buffer mode none: fio randrw clean"
    fi
    # Forced copy still works for null.
    start_dev --queues 1 --depth 16 --buffer-mode copy null --size 64M
    grep -q "buffer mode copy (forced)" "$LOG"
    fio --name=c --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=64k --iodepth=16 \
        --size=64M --io_size=16M >"$WORK/fio.out"
    grep -q "err= 0" "$WORK/fio.out" || { cat "$WORK/fio.out" >&2; fail "fio randrw, forced copy"; }
    stop_dev
    grep -q "errors 0" "$LOG"
    # `none` for a target that moves data: one line, exit 1, no device.
    truncate -s 16M "$FS/none.img"
    expect_error "buffer mode none moves no request data.*the loop target reads and writes data" \
        --buffer-mode none loop "$FS/none.img"
    # kill -9 under IO and recover: the mode comes back from the device flags.
    start_dev --queues 2 --depth 32 null --size 64M
    id=${DEV#/dev/ublkb}
    fio --name=k --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=16 \
        --numjobs=2 --time_based --runtime=8 --group_reporting >"$WORK/fio-k.out" 2>&1 &
    local fio_pid=$!
    wait_reads "$id"
    kill -KILL "$PID"
    wait "$PID" 2>/dev/null || true
    "$UBD" list | grep -E "^$id +(quiesced|live) .* dead " >/dev/null ||
        fail "device $id not left for recovery: $("$UBD" list)"
    start_recover "$id"
    grep -q "buffer mode none (as the device was created); no buffers" "$LOG" ||
        { cat "$LOG" >&2; fail "recovered device not in buffer mode none"; }
    rc=0
    wait "$fio_pid" || rc=$?
    ((rc == 0)) && grep -q "err= 0" "$WORK/fio-k.out" || { cat "$WORK/fio-k.out" >&2; fail "fio across the recovery exited $rc"; }
    stop_dev
    grep -q "errors 0" "$LOG"
    log "kill -9 + recover in buffer mode none: fio randrw clean across it"
}

# Data written through the device, read back through it and from the backing.
check_roundtrip() {
    local backing=$1
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=8 status=none
    # At 3 MiB + 4 KiB: unaligned to the 512 KiB max IO, so requests are split.
    dd if="$WORK/pat" of="$DEV" bs=64k seek=3149824 oflag=direct,seek_bytes status=none
    cmp <(dd if="$DEV" bs=1M iflag=direct,skip_bytes,count_bytes skip=3149824 count=8M status=none) "$WORK/pat"
    stop_dev
    cmp <(dd if="$backing" bs=1M iflag=skip_bytes,count_bytes skip=3149824 count=8M status=none) "$WORK/pat"
    log "8 MiB round trip through $DEV matches the backing"
}

fio_matrix() {
    # Random writes then verify: several block sizes, qd1 and qd32, 2 jobs on 2 queues.
    fio_verify --rw=randwrite --bs=4k --iodepth=1 --size=8M
    fio_verify --rw=randwrite --bsrange=512-128k --iodepth=32 --numjobs=2 --offset_increment=48M --size=32M
    fio_verify --rw=randwrite --bs=16k --iodepth=32 --numjobs=2 --offset_increment=48M --size=32M
    fio_verify --rw=write --bs=512k --iodepth=8 --size=64M
    log "fio verify=crc32c passed (4k qd1, 512-128k qd32 x2, 16k qd32 x2, 512k seq)"
}

case_loop_file() {
    truncate -s 128M "$FS/backing.img"
    start_dev --cpus 0,1 --depth 64 loop "$FS/backing.img"
    grep -q "backing IO: O_DIRECT" "$LOG"
    fio_matrix
    check_roundtrip "$FS/backing.img"
}

case_loop_file_buffered() {
    truncate -s 64M "$FS/buffered.img"
    start_dev --queues 2 --depth 32 loop --direct off "$FS/buffered.img"
    grep -q "backing IO: buffered" "$LOG"
    fio_verify --rw=randwrite --bsrange=512-64k --iodepth=16 --numjobs=2 --offset_increment=24M --size=16M
    check_roundtrip "$FS/buffered.img"
}

case_loop_bdev() {
    start_dev --cpus 0,1 --depth 64 loop /dev/ram0
    [[ $(blockdev --getsize64 "$DEV") == $(blockdev --getsize64 /dev/ram0) ]]
    fio_matrix
    check_roundtrip /dev/ram0
}

# A tree of files with random contents and sizes (about 24 MiB), made once.
make_tree() {
    local t=$WORK/tree
    [[ -d $t ]] && return 0
    mkdir -p "$t"
    local i
    for i in $(seq 1 60); do
        mkdir -p "$t/d$((i % 7))/e$((i % 3))"
        head -c $(((RANDOM % 800 + 1) * 512 + RANDOM % 511)) /dev/urandom >"$t/d$((i % 7))/e$((i % 3))/f$i"
    done
    ln -s d1/e1 "$t/link"
    cp -a /etc/hostname /etc/passwd "$t/"
}

case_mkfs_mount() {
    make_tree
    ext4_roundtrip
    # user-copy moves data through the char device: ext4 with fsck on it too.
    if [[ $("$UBD" features --json) == *'"USER_COPY"'* ]]; then
        ext4_roundtrip --buffer-mode user-copy
    fi
}

# ext4_roundtrip [ENGINE ARGS...]: ext4 on a loop file served with ARGS: mkfs, a tree
# copied in, fsck clean through the device and in the backing, contents equal.
ext4_roundtrip() {
    rm -f "$FS/fs.img"
    truncate -s 128M "$FS/fs.img"
    start_dev --cpus 0,1 --depth 32 "$@" loop "$FS/fs.img"
    mkfs.ext4 -q -F "$DEV"
    mkdir -p "$WORK/mnt"
    mount "$DEV" "$WORK/mnt"
    cp -a "$WORK/tree" "$WORK/mnt/tree"
    sync
    umount "$WORK/mnt"
    fsck.ext4 -fn "$DEV" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; false; }
    mount -o ro "$DEV" "$WORK/mnt"
    diff -r --no-dereference "$WORK/tree" "$WORK/mnt/tree"
    umount "$WORK/mnt"
    stop_dev
    # The filesystem lives in the backing file, intact, without the engine.
    fsck.ext4 -fn "$FS/fs.img" >/dev/null
    log "ext4${*:+ ($*)}: mkfs, copy a $(du -sh "$WORK/tree" | cut -f1) tree, sync, fsck clean, contents equal"
}

allocated_kib() { du -k "$1" | cut -f1; }

case_discard_flush() {
    truncate -s 64M "$FS/sparse.img"
    start_dev --queues 1 --depth 16 loop "$FS/sparse.img"
    [[ $(cat /sys/block/"${DEV#/dev/}"/queue/discard_max_bytes) -gt 0 ]]
    dd if=/dev/urandom of="$DEV" bs=1M count=8 oflag=direct conv=fsync status=none
    local full
    full=$(allocated_kib "$FS/sparse.img")
    ((full >= 8192)) || fail "backing has only ${full} KiB allocated after 8 MiB written"
    blkdiscard -o 0 -l 4M "$DEV"
    local after
    after=$(allocated_kib "$FS/sparse.img")
    ((after <= full - 4096)) || fail "discard did not punch the backing: ${full} -> ${after} KiB"
    cmp -n 4194304 "$DEV" /dev/zero
    blkdiscard -z -o 4M -l 2M "$DEV"
    cmp -n 2097152 <(dd if="$DEV" bs=1M skip=4 count=2 iflag=direct status=none) /dev/zero
    # Data past the zeroed range is untouched.
    [[ $(dd if="$DEV" bs=1M skip=6 count=2 iflag=direct status=none | tr -d '\0' | wc -c) -gt 0 ]]
    stop_dev
    grep -qE "flushes [1-9]" "$LOG" || fail "no FLUSH reached the target: $(grep "stopped and deleted" "$LOG")"
    grep -qE "discards [1-9]" "$LOG" || fail "no DISCARD reached the target"
    grep -qE "write-zeroes [1-9]" "$LOG" || fail "no WRITE_ZEROES reached the target"
    log "backing allocation ${full} KiB -> ${after} KiB after discard; $(grep "stopped and deleted" "$LOG" | sed 's/.*(SIGTERM received): //')"
}

case_discard_bdev() {
    start_dev --queues 1 --depth 16 loop /dev/ram0
    dd if=/dev/urandom of="$DEV" bs=1M count=2 oflag=direct status=none
    blkdiscard -z -o 0 -l 1M "$DEV"
    cmp -n 1048576 "$DEV" /dev/zero
    stop_dev
    cmp -n 1048576 /dev/ram0 /dev/zero
}

case_list_del() {
    truncate -s 16M "$WORK/a.img"
    start_dev --queues 1 --depth 8 loop "$WORK/a.img"
    local id=${DEV#/dev/ublkb}
    "$UBD" list | grep -E "^$id +live .*alive +loop $WORK/a.img"
    # (Captured first: `grep -q` stops reading at its match, and the writer of a longer
    # output would die of SIGPIPE, which pipefail counts as a failure.)
    grep -q '"daemon_alive": true' <<<"$("$UBD" list --json)" || fail "list --json: no live daemon"
    # A device whose daemon is alive is refused without --force.
    expect_error "device $id is served by running process $PID; stop that process, or use --force" del "$id"
    "$UBD" del --force "$id"
    local rc=0
    wait "$PID" || rc=$?
    ((rc == 0)) || fail "daemon exited $rc after del"
    [[ ! -e $DEV ]]
    "$UBD" list | grep -q "no ublk devices"
    # del --all with two devices; SIGINT also stops cleanly.
    start_dev --queues 1 --depth 8 null --size 64M
    local p1=$PID
    start_dev --queues 1 --depth 8 --id 7 null --size 64M
    [[ $DEV == /dev/ublkb7 ]]
    expect_error "device id 7 is already in use" --id 7 null --size 64M
    "$UBD" del --all --force
    wait "$p1" "$PID"
    [[ -z $(ublk_devs) ]]
    start_dev --queues 1 --depth 8 null --size 64M
    stop_dev INT
}

case_bad_input() {
    truncate -s 1000 "$WORK/odd.img"
    expect_error "cannot open /nonexistent/disk.img: No such file" loop /nonexistent/disk.img
    expect_error "not a multiple of the 512-byte block size" loop "$WORK/odd.img"
    expect_error "not a multiple of the 512-byte block size" null --size 1000
    expect_error "bad size" null --size 12Q
    expect_error "empty CPU list" --cpus "" null --size 64M
    expect_error "CPUs [0-9]+-99 are not available" --cpus 0-99 null --size 64M
    expect_error "bad CPU list" --cpus 1-x null --size 64M
    expect_error "queue depth 5000 must be from 1 to 4096" --depth 5000 null --size 64M
    expect_error "queue depth 0" --depth 0 null --size 64M
    expect_error "device 4242 does not exist" del 4242
    # Not root.
    local rc=0
    setpriv --reuid=65534 --regid=65534 --clear-groups "$UBD" null --size 64M 2>"$WORK/nr.txt" || rc=$?
    ((rc == 1)) && grep -q "permission denied opening /dev/ublk-control (uid 65534): run as root" "$WORK/nr.txt" &&
        [[ $(wc -l <"$WORK/nr.txt") == 1 ]] ||
        { cat "$WORK/nr.txt" >&2; fail "non-root run: rc $rc"; }
    log "ok: non-root -> $(cat "$WORK/nr.txt")"
    # No ublk module.
    rmmod ublk_drv
    rc=0
    "$UBD" null --size 64M 2>"$WORK/nm.txt" || rc=$?
    modprobe ublk_drv
    ((rc == 1)) && grep -q "ublk_drv kernel module is not loaded" "$WORK/nm.txt" ||
        { cat "$WORK/nm.txt" >&2; fail "no-module run: rc $rc"; }
    log "ok: no module -> $(cat "$WORK/nm.txt")"
}

case_hugepages() {
    # With reserved hugepages the buffers come from hugetlb; without, the fallback is reported.
    echo 0 >/proc/sys/vm/nr_hugepages
    start_dev --queues 1 --depth 16 --buffer-mode copy null --size 64M
    grep -qE "buffers (thp|4k)" "$LOG"
    stop_dev
    echo 16 >/proc/sys/vm/nr_hugepages
    start_dev --queues 1 --depth 16 --buffer-mode copy null --size 64M
    grep -q "buffers hugetlb" "$LOG" || fail "no hugetlb buffers: $(grep serving "$LOG")"
    truncate -s 32M "$WORK/h.img"
    stop_dev
    start_dev --queues 1 --depth 16 --buffer-mode copy loop "$WORK/h.img"
    grep -q "buffers hugetlb" "$LOG"
    fio_verify --rw=randwrite --bsrange=4k-256k --iodepth=16 --size=16M
    stop_dev
    echo 0 >/proc/sys/vm/nr_hugepages
}

# Every buffer mode the kernel offers passes the verify suite; the others are refused clearly.
case_buffer_modes() {
    local feats mode
    feats=$("$UBD" features --json)
    for mode in copy zero-copy auto-reg user-copy; do
        local need= since=
        case $mode in
        zero-copy) need=SUPPORT_ZERO_COPY since=6.15 ;;
        auto-reg) need=AUTO_BUF_REG since=6.16 ;;
        user-copy) need=USER_COPY since=6.5 ;;
        esac
        if [[ -n $need && $feats != *\"$need\"* ]]; then
            expect_error "buffer mode $mode needs the ublk feature $need \(Linux $since\+\)" --buffer-mode "$mode" null --size 64M
            continue
        fi
        start_dev --cpus 0,1 --depth 32 --buffer-mode "$mode" loop /dev/ram0
        grep -q "buffer mode $mode (forced)" "$LOG"
        fio_verify --rw=randwrite --bsrange=512-256k --iodepth=32 --numjobs=2 --offset_increment=64M --size=24M
        # The qd1 mix and the null target: in every mode with --full, in copy mode in
        # the CI run (its time; the brd and file jobs cover each mode's data path).
        [[ -n ${UBD_E2E_FULL:-} || $mode == copy ]] && fio_verify --rw=randrw --rwmixread=30 --bs=4k --iodepth=1 --size=4M
        check_roundtrip /dev/ram0
        grep -q "ring coop-taskrun (fd registered)" "$LOG"
        # The other ring setup (tuning): the file-backed device runs on DEFER_TASKRUN.
        truncate -s 64M "$FS/mode.img"
        start_dev --queues 2 --depth 16 --buffer-mode "$mode" --ring defer loop "$FS/mode.img"
        grep -q "ring defer-taskrun (fd registered)" "$LOG"
        fio_verify --rw=randwrite --bsrange=4k-128k --iodepth=16 --numjobs=2 --offset_increment=24M --size=16M
        check_roundtrip "$FS/mode.img"
        if [[ -z ${UBD_E2E_FULL:-} && $mode != copy ]]; then
            log "buffer mode $mode: loop (brd on a coop ring, file on a defer ring) verified"
            continue
        fi
        start_dev --queues 1 --depth 16 --buffer-mode "$mode" null --size 64M
        fio --name=n --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=64k --iodepth=16 \
            --size=64M --io_size=16M >"$WORK/fio.out"
        stop_dev
        grep -q "errors 0" "$LOG"
        log "buffer mode $mode: loop (brd on a coop ring, file on a defer ring) verified, null ok"
    done
}

# UBLK_F_BATCH_IO (--io-protocol batch, 7.0+): the verify suite in every buffer mode the
# kernel offers, and a clean stop. Without the feature: refused in one line, then skipped.
case_batch_io() {
    local mode
    if [[ $("$UBD" features --json) != *'"BATCH_IO"'* ]]; then
        expect_error "io protocol batch needs the ublk feature BATCH_IO" --io-protocol batch null --size 64M
        exit 77
    fi
    # The CI run: copy here and one recovery round (zero-copy's and the others' with --full).
    local modes
    modes=$(available_modes)
    [[ -n ${UBD_E2E_FULL:-} ]] || modes=copy
    for mode in $modes; do
        start_dev --queues 2 --depth 32 --buffer-mode "$mode" --io-protocol batch loop /dev/ram0
        grep -q "io protocol batch" "$LOG"
        fio_verify --rw=randwrite --bsrange=4k-128k --iodepth=32 --numjobs=2 --offset_increment=64M --size=24M
        # The qd1 mix and the stats check: in every mode with --full, in copy mode
        # otherwise (CI's time; the batch counters do not depend on the buffer mode).
        if [[ -n ${UBD_E2E_FULL:-} || $mode == copy ]]; then
            fio_verify --rw=randrw --rwmixread=30 --bs=4k --iodepth=1 --size=4M
            check_batch_stats 32
        fi
        check_roundtrip /dev/ram0
        grep -q "errors 0" "$LOG"
        grep -qE "batch io: [1-9][0-9]* fetch CQEs, [0-9.]+ requests per fetch \(max [1-9][0-9]*\); [1-9][0-9]* commits" "$LOG" ||
            { cat "$LOG" >&2; fail "no batch io summary at shutdown"; }
        # A file backing too: in every mode with --full, in copy mode otherwise (CI's time).
        if [[ -n ${UBD_E2E_FULL:-} || $mode == copy ]]; then
            truncate -s 64M "$FS/batch.img"
            start_dev --queues 2 --depth 16 --buffer-mode "$mode" --io-protocol batch loop "$FS/batch.img"
            fio_verify --rw=randwrite --bsrange=4k-128k --iodepth=16 --numjobs=2 --offset_increment=24M --size=16M
            check_roundtrip "$FS/batch.img"
            log "io protocol batch, buffer mode $mode: loop (brd and file) verified"
        else
            log "io protocol batch, buffer mode $mode: loop (brd) verified"
        fi
    done
    # kill -9 under a verified write job, recover (PREP + FETCH again), verify.
    recover_rounds "${UBD_BATCH_RECOVER_ROUNDS:-3}" --io-protocol batch
}

# check_batch_stats DEPTH: with fio reading from the batch device $DEV, `stats --json`
# shows the batch counters on every queue and in total: fetch completions and commits
# counted, at least one request per fetch and one element per commit on average, and
# never more in one than the queue depth. The text form shows them too.
check_batch_stats() {
    local depth=$1 id=${DEV#/dev/ublkb} deadline=$((SECONDS + 30)) rc=0
    fio --name=batchstats --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
        --iodepth=32 --numjobs=2 --size=32M --time_based --runtime=3 >"$WORK/fio-bstats.out" 2>&1 &
    local fio_pid=$!
    until "$UBD" stats "$id" --json >"$WORK/bstats.json" 2>/dev/null &&
        python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))["stats"]
depth = int(sys.argv[2])
def ok(b, need):
    if b is None:
        return False
    f, c = b["requests_per_fetch"], b["elements_per_commit"]
    if f["max"] > depth or c["max"] > depth:
        sys.exit("more than the depth in one fetch or commit: %s" % b)
    return not need or (f["count"] > 0 and c["count"] > 0 and f["mean"] >= 1 and c["mean"] >= 1 and s["total"]["reads"] > 100)
sys.exit(0 if all(ok(q.get("batch"), False) for q in s["queues"]) and ok(s["total"].get("batch"), True) else 1)
' "$WORK/bstats.json" "$depth"; do
        ((SECONDS < deadline)) || fail "stats never showed batch fetches and commits: $(cat "$WORK/bstats.json")"
        sleep 0.2
    done
    wait "$fio_pid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-bstats.out" >&2; fail "fio under stats exited $rc"; }
    "$UBD" stats "$id" >"$WORK/bstats.txt"
    grep -qE "^QUEUE +FETCHES +REQ/FET" "$WORK/bstats.txt" || fail "no batch table in: $(cat "$WORK/bstats.txt")"
    log "batch stats: $(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["stats"]["total"]["batch"]))' "$WORK/bstats.json")"
    sed 's/^/      /' "$WORK/bstats.txt"
}

# The perf toolkit end to end: a tiny `ubd-perf compare` (one 1-second cell per system).
case_perf_smoke() {
    local root
    root=$(cd "$HERE/../.." && pwd)
    "$root/perf/smoke.sh" "$UBD" "$WORK/perf"
}

# Buffer modes this kernel offers, from `features --json`.
available_modes() {
    local feats
    feats=$("$UBD" features --json)
    echo copy
    [[ $feats == *'"SUPPORT_ZERO_COPY"'* ]] && echo zero-copy
    [[ $feats == *'"AUTO_BUF_REG"'* ]] && echo auto-reg
    [[ $feats == *'"USER_COPY"'* ]] && echo user-copy
    return 0
}

# kill -9 the daemon in the middle of a verified random-write job, `recover`, let fio
# finish, then verify everything again: no verify error, in every buffer mode.
case_recover() {
    recover_rounds "${UBD_RECOVER_ROUNDS:-10}"
}

# recover_rounds N [ENGINE ARGS...]: N kill -9 / recover rounds, cycling buffer modes
# (ARGS go to the recovering process too). REC_FIO_EXTRA: more fio options; REC_CHECK:
# a function run with the device id once the recovered daemon has served the job.
recover_rounds() {
    local modes round=0 rounds=$1
    shift
    mapfile -t modes < <(available_modes)
    truncate -s 64M "$FS/rec.img"
    while ((round < rounds)); do
        local mode=${modes[round % ${#modes[@]}]}
        start_dev --queues 2 --depth 32 --buffer-mode "$mode" "$@" loop "$FS/rec.img"
        local id=${DEV#/dev/ublkb}
        local job=(--name=rec --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
            --iodepth=16 --size=32M --verify=crc32c --verify_fatal=1 --randseed=$round "${REC_FIO_EXTRA[@]}")
        fio "${job[@]}" --verify_backlog=128 >"$WORK/fio-rec.out" 2>&1 &
        local fio_pid=$!
        # Let it get going: the kill must land while IO is in flight.
        sleep 1.5
        kill -KILL "$PID"
        wait "$PID" 2>/dev/null || true
        "$UBD" list | grep -E "^$id +(quiesced|live) .* dead " >/dev/null ||
            fail "device $id not left for recovery: $("$UBD" list)"
        start_recover "$id" "$@"
        local rc=0
        wait "$fio_pid" || rc=$?
        ((rc == 0)) || { cat "$WORK/fio-rec.out" >&2; fail "fio across the recovery exited $rc"; }
        fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 ||
            { cat "$WORK/fio-ver.out" >&2; fail "verify after recovery failed"; }
        # A case's own check of the recovered daemon (REC_CHECK: a function name).
        [[ -z ${REC_CHECK:-} ]] || "$REC_CHECK" "$id"
        stop_dev
        round=$((round + 1))
    done
    log "$rounds recoveries (modes: ${modes[*]}; $*): fio verify clean across each kill -9 and after"
}

# SIGTERM while fio runs: the daemon stops the device and exits 0, with no device left;
# a second signal does not hang it.
case_sigterm_under_load() {
    truncate -s 64M "$FS/load.img"
    start_dev --queues 2 --depth 32 loop "$FS/load.img"
    fio --name=load --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=16k --iodepth=32 \
        --numjobs=2 --size=48M --time_based --runtime=60 >"$WORK/fio-load.out" 2>&1 &
    local fio_pid=$!
    # Stop only once IO is flowing.
    wait_reads "${DEV#/dev/ublkb}"
    yank_dev
    wait "$fio_pid" || true
    # fio had it open: the first SIGTERM waited for it, the second stopped it anyway.
    grep -q "is in use (open in process" "$LOG" && grep -q "stopping the device while it is in use" "$LOG" ||
        { cat "$LOG" >&2; fail "the stop under load was not a safe stop then a yank"; }
    log "stopped under load: $(grep "stopped and deleted" "$LOG" | sed 's/.*while in use): //')"
    { grep WARN "$LOG" || true; } | head -n 3 | sed 's/^/    /'
}

# Many add/start/stop/delete cycles leak nothing; some with fio running during the stop.
case_cycles() {
    local i n=${UBD_CYCLES:-100} nf=${UBD_FIO_CYCLES:-20}
    for ((i = 0; i < n; i++)); do
        start_dev --queues 1 --depth 4 null --size 16M >/dev/null
        stop_dev
    done
    for ((i = 0; i < nf; i++)); do
        start_dev --queues 2 --depth 16 null --size 64M >/dev/null
        fio --name=c --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=16 \
            --time_based --runtime=30 >/dev/null 2>&1 &
        sleep 0.5
        yank_dev
        wait || true
    done
    [[ -z $(ublk_devs) ]]
    [[ -z $(ls /dev/ublkc* 2>/dev/null) ]] || fail "char devices left: $(ls /dev/ublkc*)"
    log "$n add/del cycles and $nf with fio running during the stop: nothing left"
}

# Waits until device ID has served some reads (fio starts slowly under emulation).
wait_reads() {
    local id=$1 deadline=$((SECONDS + 60))
    until "$UBD" stats "$id" --json 2>/dev/null | grep -qE '"reads": *[0-9]{3,}'; do
        ((SECONDS < deadline)) || fail "fio never got going on device $id"
        sleep 0.2
    done
}

# Waits until process $1 has stopped itself (UBD_DEBUG_PAUSE); $2 is its log.
wait_stopped() {
    local deadline=$((SECONDS + START_TIMEOUT))
    until grep -qE '^State:\s+T' "/proc/$1/status" 2>/dev/null; do
        kill -0 "$1" 2>/dev/null || { cat "$2" >&2; fail "process $1 exited instead of pausing"; }
        ((SECONDS < deadline)) || fail "process $1 never reached its pause point"
        sleep 0.1
    done
}

# The sum of the "N failed" counts in the fault-injection summaries of $LOG.
injected_failures() {
    grep -oE 'fault injection: [0-9]+ requests, [0-9]+ failed' "$LOG" | awk '{ s += $5 } END { print s + 0 }'
}

# Injected errors reach the application with their errno; the rest of the data is intact.
case_fault_errors() {
    truncate -s 64M "$FS/f.img"
    # A byte range whose writes fail with ENOSPC; reads and other writes go through.
    start_dev --queues 2 --fault range=1M:64K,ops=write,errno=ENOSPC loop "$FS/f.img"
    dd if=/dev/urandom of="$WORK/blk" bs=4k count=1 status=none
    dd if="$WORK/blk" of="$DEV" bs=4k seek=256 oflag=direct status=none 2>"$WORK/dd.err" &&
        fail "a write in the failing range succeeded"
    grep -q "No space left on device" "$WORK/dd.err" || fail "want ENOSPC, got: $(cat "$WORK/dd.err")"
    dd if="$WORK/blk" of="$DEV" bs=4k seek=512 oflag=direct status=none
    cmp <(dd if="$DEV" bs=4k skip=512 count=1 iflag=direct status=none) "$WORK/blk"
    dd if="$DEV" of=/dev/null bs=4k skip=256 count=1 iflag=direct status=none
    stop_dev
    # 5% of reads fail with EIO while fio verifies data written before: fio sees EIO for
    # the failed reads (some of the injected failures hit udev's reads instead), and
    # every read that succeeded verifies.
    start_dev --queues 2 loop "$FS/f.img"
    local job=(--name=v --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=16k --iodepth=16
        --size=16M --verify=crc32c --randseed=7 --verify_state_save=0)
    fio "${job[@]}" --do_verify=0 >"$WORK/fio.out" 2>&1 || { cat "$WORK/fio.out" >&2; fail "fio write"; }
    stop_dev
    start_dev --queues 2 --fault fail=5%,ops=read,seed=3 loop "$FS/f.img"
    local rc=0
    fio "${job[@]}" --verify_only --continue_on_error=all --output-format=json >"$WORK/fio.json" 2>"$WORK/fio.err" ||
        rc=$?
    stop_dev
    local injected errs
    injected=$(injected_failures)
    read -r errs first < <(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(j.get("total_err", 0), j.get("first_error", 0))' "$WORK/fio.json")
    ((injected > 0)) || fail "no failure was injected"
    ((first == 5)) || fail "fio's first error is $first, want EIO (5)"
    ((errs > 0 && errs <= injected)) || { cat "$WORK/fio.err" >&2; fail "fio saw $errs errors, $injected were injected"; }
    # A verify mismatch is reported on stderr even with continue_on_error.
    ! grep -iE "verify|crc32c|bad (magic|header)" "$WORK/fio.err" || fail "fio found corrupt data"
    log "fail=5% on reads: $injected injected, fio saw $errs EIO and verified the rest (fio rc $rc)"
    # A backing filesystem that fills up: the writer gets ENOSPC, what fit is intact.
    mkdir -p "$WORK/small" && mount -t tmpfs -o size=8M tmpfs "$WORK/small"
    truncate -s 64M "$WORK/small/b.img"
    start_dev --queues 1 loop "$WORK/small/b.img"
    dd if=/dev/urandom of="$WORK/src" bs=1M count=16 status=none
    dd if="$WORK/src" of="$DEV" bs=1M oflag=direct status=none 2>"$WORK/dd.err" && fail "16M fit in 8M"
    grep -q "No space left on device" "$WORK/dd.err" || fail "want ENOSPC, got: $(cat "$WORK/dd.err")"
    cmp <(dd if="$DEV" bs=1M count=4 iflag=direct status=none) <(head -c 4M "$WORK/src")
    stop_dev
    umount "$WORK/small"
    # After all that, a fresh device comes up and serves.
    start_dev --queues 1 null --size 16M
    stop_dev
    log "ENOSPC from a full backing filesystem reached dd; data before it read back intact"
}

# Delays and stalls slow requests down but lose nothing.
case_fault_delay_stall() {
    truncate -s 64M "$FS/d.img"
    start_dev --queues 1 --fault delay=20ms loop "$FS/d.img"
    fio --name=d --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=4 --size=1M \
        --verify=crc32c --verify_fatal=1 --output-format=json >"$WORK/fio.json" 2>"$WORK/fio.err" ||
        { cat "$WORK/fio.err" >&2; fail "fio with delay"; }
    local min
    min=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["lat_ns"]["min"])' "$WORK/fio.json")
    ((min >= 20000000)) || fail "a write completed in $min ns, under the injected 20 ms"
    stop_dev
    # Queue 0 stalls for 3 s in the middle of a verify job on both queues.
    start_dev --queues 2 --fault stall=300:3s loop "$FS/d.img"
    fio_verify --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --size=16M --offset_increment=32M
    stop_dev
    grep -qE 'q_id=0|stalled' "$LOG"
    local stalled
    stalled=$(grep -oE '[0-9]+ stalled' "$LOG" | awk '{ s += $1 } END { print s + 0 }')
    ((stalled > 0)) || fail "nothing was stalled"
    log "delay 20 ms: min write latency $((min / 1000)) us; stall 3 s: $stalled requests held, verify clean"
}

# A request stuck in the target forever, and a queue thread that panics: the daemon
# gives up on them, removes the device, and exits; nothing is left behind.
case_abort() {
    truncate -s 64M "$FS/a.img"
    start_dev --queues 2 --stop-timeout 3 --fault stall=50:inf loop "$FS/a.img"
    fio --name=s --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=16 \
        --numjobs=2 --time_based --runtime=60 >/dev/null 2>&1 &
    local fio_pid=$! deadline=$((SECONDS + 60))
    until grep -q "stalls for ever" "$LOG"; do
        ((SECONDS < deadline)) || fail "queue 0 never stalled"
        sleep 0.1
    done
    # fio holds the device: SIGTERM, then the second signal that stops it anyway.
    yank_dev
    local rc=0
    grep -q "aborting them" "$LOG" || { cat "$LOG" >&2; fail "no abort reported"; }
    [[ ! -e $DEV ]] || fail "$DEV left after the abort"
    wait "$fio_pid" || true
    log "stalled queue: SIGTERM → STOP_DEV waited 3 s, aborted; exit $rc, device gone"
    # A panic on queue 0 under load.
    start_dev --queues 2 --fault panic=300 loop "$FS/a.img"
    fio --name=p --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=16 \
        --numjobs=2 --time_based --runtime=60 >/dev/null 2>&1 &
    fio_pid=$!
    timeout 90 tail --pid="$PID" -f /dev/null || fail "daemon still running 90 s after a queue panicked"
    rc=0
    wait "$PID" || rc=$?
    ((rc == 1)) || fail "daemon exited $rc after a queue panic, want 1"
    tail -n1 "$LOG" | grep -q "^error: queue 0: target panicked: fault injection" ||
        fail "last line: $(tail -n1 "$LOG")"
    [[ ! -e $DEV ]] || fail "$DEV left after the panic"
    wait "$fio_pid" || true
    local last
    last=$(tail -n1 "$LOG")
    start_dev --queues 1 null --size 16M
    stop_dev
    log "queue panic: exit 1, '$last'; device removed, a new one starts"
    # A queue thread that dies itself (not in its target): with recovery on, the device
    # is left for `recover`, and no write in flight is lost.
    UBD_DEBUG_QUEUE_PANIC=1500 start_dev --queues 1 --depth 32 loop "$FS/a.img"
    local id=${DEV#/dev/ublkb}
    local job=(--name=qd --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
        --iodepth=16 --size=32M --verify=crc32c --verify_fatal=1 --randseed=5 --verify_state_save=0)
    fio "${job[@]}" --verify_backlog=128 >"$WORK/fio-qd.out" 2>&1 &
    fio_pid=$!
    timeout 90 tail --pid="$PID" -f /dev/null || fail "daemon still running 90 s after its queue thread died"
    rc=0
    wait "$PID" || rc=$?
    ((rc == 1)) || fail "daemon exited $rc after its queue thread died, want 1"
    last=$(tail -n1 "$LOG")
    [[ $last == "error: queue thread ubd-q0 panicked: UBD_DEBUG_QUEUE_PANIC"*"recover $id\`" ]] || fail "last line: $last"
    "$UBD" list | grep -E "^$id +(quiesced|live) .* dead " >/dev/null || fail "device $id not recoverable: $("$UBD" list)"
    start_recover "$id"
    rc=0
    wait "$fio_pid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-qd.out" >&2; fail "fio across the queue death exited $rc"; }
    fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 || { cat "$WORK/fio-ver.out" >&2; fail "verify failed"; }
    stop_dev
    log "queue thread death: exit 1, device left recoverable; recover, fio verify clean"
}

# kill -9 in each state of a device's life; afterwards it can be deleted (or recovered).
case_kill9_states() {
    truncate -s 64M "$FS/k.img"
    # Before START_DEV.
    local out=$WORK/k.out
    UBD_DEBUG_PAUSE=before-start "$UBD" --queues 2 loop "$FS/k.img" >"$out" 2>"$WORK/k.log" &
    local pid=$!
    wait_stopped "$pid" "$WORK/k.log"
    local ids
    ids=$(ls /sys/class/ublk-char)
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    local id=${ids#ublkc}
    timeout 60 "$UBD" del "$id" || fail "del $id after kill -9 before START failed"
    [[ -z $(ls /dev/ublkc* 2>/dev/null) ]] || fail "left: $(ls /dev/ublkc*)"
    log "kill -9 before START: del $id done"
    # While IO runs, then del without recovering.
    start_dev --queues 2 loop "$FS/k.img"
    id=${DEV#/dev/ublkb}
    fio --name=k --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
        --time_based --runtime=60 >/dev/null 2>&1 &
    local fio_pid=$!
    sleep 2
    kill -KILL "$PID"
    wait "$PID" 2>/dev/null || true
    # fio still has it open: a plain del is refused, --yank removes it.
    expect_error "device $id is in use \(open in process [0-9]+ \(fio\)" del "$id"
    timeout 60 "$UBD" del "$id" --yank || fail "del --yank $id after kill -9 under IO failed"
    timeout 60 tail --pid="$fio_pid" -f /dev/null || fail "fio hung after the device was deleted"
    wait "$fio_pid" || true
    [[ ! -e $DEV ]]
    log "kill -9 under IO: del refused while fio has it open, del --yank done, fio got its errors and exited"
    # During recovery: the recovering daemon is killed between START_USER_RECOVERY and
    # END_USER_RECOVERY; a second recover takes over and no data is lost.
    start_dev --queues 2 --depth 32 loop "$FS/k.img"
    id=${DEV#/dev/ublkb}
    local job=(--name=kr --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
        --iodepth=16 --size=32M --verify=crc32c --verify_fatal=1 --randseed=11)
    fio "${job[@]}" --verify_backlog=128 >"$WORK/fio-kr.out" 2>&1 &
    fio_pid=$!
    sleep 1.5
    kill -KILL "$PID"
    wait "$PID" 2>/dev/null || true
    UBD_DEBUG_PAUSE=before-end-recovery "$UBD" recover "$id" >"$out" 2>"$WORK/k.log" &
    pid=$!
    wait_stopped "$pid" "$WORK/k.log"
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    start_recover "$id"
    local rc=0
    wait "$fio_pid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-kr.out" >&2; fail "fio across the two recoveries exited $rc"; }
    fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 || { cat "$WORK/fio-ver.out" >&2; fail "verify failed"; }
    stop_dev
    log "kill -9 during recovery: a second recover took over; fio verify clean"
    # With --recovery fail-io (6.13+), IO to a device without a daemon fails at once
    # (EIO, or EREMOTEIO on 7.2) instead of waiting; after recover it works again.
    if [[ $("$UBD" features --json) == *'"USER_RECOVERY_FAIL_IO"'* ]]; then
        start_dev --queues 1 --recovery fail-io loop "$FS/k.img"
        id=${DEV#/dev/ublkb}
        dd if="$DEV" of="$WORK/before" bs=64k count=16 iflag=direct status=none
        kill -KILL "$PID"
        wait "$PID" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        until "$UBD" list | grep -qE "^$id +fail-io "; do
            ((SECONDS < deadline)) || fail "device $id never reached fail-io: $("$UBD" list)"
            sleep 0.1
        done
        timeout 30 dd if="$DEV" of=/dev/null bs=4k count=1 iflag=direct status=none 2>"$WORK/dd.err" &&
            fail "a read without a daemon succeeded in fail-io mode"
        grep -qE "(Input/output|Remote I/O) error" "$WORK/dd.err" || fail "want an IO error without a daemon, got: $(cat "$WORK/dd.err")"
        start_recover "$id"
        cmp <(dd if="$DEV" bs=64k count=16 iflag=direct status=none) "$WORK/before"
        stop_dev
        log "fail-io: EIO while no daemon, data intact after recover"
    fi
}

# CPU list of each queue thread of the daemon $PID, in queue order ("0-1 0-1", "1 0").
queue_cpus() {
    local t out=()
    for t in /proc/"$PID"/task/*; do
        [[ $(cat "$t/comm") == ubd-q* ]] || continue
        out[$(($(sed 's/^ubd-q//' "$t/comm")))]=$(awk '/^Cpus_allowed_list:/ { print $2 }' "$t/status")
    done
    echo "${out[*]}"
}

# io_uring worker threads (iou-wrk-*) of the daemon $PID.
iou_workers() { grep -l '^iou-wrk' /proc/"$PID"/task/*/comm 2>/dev/null | wc -l; }

# Queue-thread placement: unpinned by default, --cpus LIST pins queue i to the i-th CPU,
# --cpus queue to the CPUs the kernel maps to the queue. --offload SIZE sends target IO
# of at least SIZE to io_uring's workers (threads appear; none without it); data intact.
case_placement() {
    local all mode
    all=$(cat /sys/devices/system/cpu/online)
    start_dev --queues 2 --depth 32 loop /dev/ram0
    [[ $(queue_cpus) == "$all $all" ]] || fail "default placement: queue CPUs $(queue_cpus), want unpinned ($all)"
    # Target IO runs inline: no io_uring worker appears for it. (Some kernels run the
    # queues' eventfd wake-up reads on a worker: those exist before any IO. Reads only:
    # a brd write to an unallocated page may be refused under NOWAIT and then retried
    # on a worker, which is not what is checked here.)
    local before
    before=$(iou_workers)
    fio --name=inline --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
        --iodepth=8 --size=8M >"$WORK/fio.out"
    (($(iou_workers) == before)) || fail "io_uring workers $before -> $(iou_workers) without --offload: reads were punted"
    log "default placement: unpinned ($all); io_uring workers $before before and after a read job"
    stop_dev
    start_dev --cpus 1,0 --depth 32 loop /dev/ram0
    [[ $(queue_cpus) == "1 0" ]] || fail "--cpus 1,0: queue CPUs $(queue_cpus)"
    stop_dev
    start_dev --cpus queue --queues 2 --depth 32 loop /dev/ram0
    # Each queue thread on the CPUs blk-mq maps to its queue (one each here; 7.2 maps
    # CPU 1 to queue 0).
    local q want=()
    for q in 0 1; do
        want+=("$(tr -d ' ' </sys/block/"${DEV#/dev/}"/mq/$q/cpu_list)")
    done
    [[ $(queue_cpus) == "${want[*]}" ]] || fail "--cpus queue: queue CPUs $(queue_cpus), want ${want[*]} (the mq map)"
    log "--cpus queue: queue CPUs $(queue_cpus), as the mq map"
    stop_dev
    expect_error "--offload \"0\": expected a size" --offload 0 null --size 64M
    # --offload in copy and zero-copy (a worker's read into a fixed buffer and into the
    # request's registered pages) in the CI run; --full: every mode.
    local modes
    modes=$(available_modes)
    [[ -n ${UBD_E2E_FULL:-} ]] || modes=$(grep -xE "copy|zero-copy" <<<"$modes")
    for mode in $modes; do
        start_dev --queues 2 --depth 32 --buffer-mode "$mode" --offload 16K loop /dev/ram0
        before=$(iou_workers)
        fio_verify --rw=randwrite --bsrange=4k-256k --iodepth=32 --numjobs=2 --offset_increment=64M --size=24M
        local workers
        workers=$(iou_workers)
        ((workers > before)) || fail "--offload 16K: no io_uring worker thread appeared ($before before fio, $workers after)"
        check_roundtrip /dev/ram0
        grep -q "errors 0" "$LOG"
        log "buffer mode $mode, --offload 16K: verified, $workers io_uring workers"
    done
    # A report read by a pipe that closes early ends quietly (SIGPIPE), never a panic.
    # The reader closes its end at once; features writes after its GET_FEATURES.
    local rc
    set +o pipefail
    "$UBD" features 2>"$WORK/pipe.err" | { exec 0<&-; sleep 1; }
    rc=${PIPESTATUS[0]}
    set -o pipefail
    ! grep -q panicked "$WORK/pipe.err" || fail "features into a closed pipe: $(cat "$WORK/pipe.err")"
    ((rc == 0 || rc == 141)) || fail "features into a closed pipe exited $rc"
    log "features into a closed pipe: exit $rc, quiet"
}

# The target API for targets that are not a file, end to end: the sockram test target
# keeps the data in a thread reached over a socketpair (own header memory, linked
# sends, a standing receive on the queue, read data received for its request, FLUSH
# finished from another thread through a waker, stop ending the receive).
case_sockram() {
    start_dev --queues 2 --depth 32 sockram --size 128M
    grep -q "buffer mode copy (auto: the sockram target moves request data through memory of its own (a socket, a library); copying)" "$LOG" ||
        fail "buffer mode: $(grep "buffer mode" "$LOG")"
    fio_verify --rw=randwrite --bs=4k --iodepth=1 --size=4M
    fio_verify --rw=randwrite --bsrange=512-128k --iodepth=32 --numjobs=2 --offset_increment=48M --size=32M --fsync=16
    fio_verify --rw=write --bs=512k --iodepth=8 --size=64M
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=8 status=none
    dd if="$WORK/pat" of="$DEV" bs=64k seek=3149824 oflag=direct,seek_bytes conv=fsync status=none
    cmp <(dd if="$DEV" bs=1M iflag=direct,skip_bytes,count_bytes skip=3149824 count=8M status=none) "$WORK/pat"
    blkdiscard -z -o 4M -l 1M "$DEV"
    cmp -n 1048576 <(dd if="$DEV" bs=1M skip=4 count=1 iflag=direct status=none) /dev/zero
    stop_dev
    grep -qE "flushes [1-9]" "$LOG" || fail "no FLUSH reached the target: $(grep "stopped and deleted" "$LOG")"
    grep -qE "write-zeroes [1-9]" "$LOG" || fail "no WRITE_ZEROES reached the target"
    log "fio verify (4k qd1, 512-128k qd32 x2 with fsync, 512k seq), 8 MiB round trip, write-zeroes; $(grep "stopped and deleted" "$LOG" | sed 's/.*(SIGTERM received): //')"
    if "$UBD" features --json | grep -q '"AUTO_BUF_REG"'; then
        expect_error "buffer mode auto-reg keeps request data in the kernel's pages, which the sockram target cannot reach" \
            --buffer-mode auto-reg sockram --size 16M
    fi
    # Its data died with the daemon: recover refuses, and del removes the device.
    start_dev --queues 1 sockram --size 16M
    local id=${DEV#/dev/ublkb}
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    expect_error "sockram test target kept its data in the daemon that died: it cannot be recovered" recover "$id"
    "$UBD" del "$id" >/dev/null
    log "kill -9: recover refused, del done"
}

cases=(features null null_nocopy loop_file loop_file_buffered loop_bdev mkfs_mount discard_flush discard_bdev
    list_del bad_input hugepages buffer_modes placement batch_io recover sigterm_under_load fault_errors fault_delay_stall abort
    kill9_states cycles perf_smoke sockram read_only resize safe_stop unprivileged zoned threads shmem svc_config svc_run svc_upgrade svc_systemd
    nbd_nbdkit nbd_file nbd_qemu nbd_restart nbd_errors nbd_recover nbd_bad_input nbd_bad_server
    rbd_io rbd_ext4 rbd_snap rbd_recover rbd_stall rbd_bad_input)
# The rbd cases start a Ceph cluster (minutes under TCG): run-all.sh runs them on the
# newest kernel (UBD_E2E_CEPH=1 there), and on every kernel with --full.
if [[ ${UBD_E2E_CEPH:-1} != 1 ]]; then
    echo "--- rbd cases not run on this kernel (UBD_E2E_CEPH=0: the CI run has them on the newest kernel; --full everywhere)"
    for i in "${!cases[@]}"; do
        [[ ${cases[i]} == rbd_* ]] && unset 'cases[i]'
    done
fi
# The CI run (run-all.sh without --full) has 30 minutes for two TCG VMs: its first
# kernel (lts) runs CORE_CASES (UBD_E2E_SET=core): the parts whose kernel side differs
# between kernels (the data path and its buffer modes, recovery and the dead device's
# states, upgrade (quiesce), read-only, resize, safe stop, unprivileged devices and the
# refusals of what 6.12 lacks); the newest runs every case. --full runs every case on
# every kernel.
CORE_CASES=" features loop_file buffer_modes batch_io recover kill9_states svc_upgrade read_only resize safe_stop unprivileged threads shmem "
if [[ ${UBD_E2E_SET:-all} == core ]]; then
    echo "--- the core cases only on this kernel (UBD_E2E_SET=core: the CI run has every case on the newest kernel; --full everywhere):$CORE_CASES"
    for i in "${!cases[@]}"; do
        [[ $CORE_CASES == *" ${cases[i]} "* ]] || unset 'cases[i]'
    done
fi
for c in "${cases[@]}"; do
    [[ -n ${UBD_E2E_ONLY:-} && ! $c =~ $UBD_E2E_ONLY ]] && continue
    run_case "$c" "case_$c"
done

ceph_down
umount "$FS" 2>/dev/null
echo "=== e2e on $(uname -r): $PASSED passed, $FAILED failed, $SKIPPED skipped ${FAILED_NAMES[*]:+(failed: ${FAILED_NAMES[*]})}${KNOWN_KERNEL_BUGS:+ (known kernel bug reports: $KNOWN_KERNEL_BUGS)}"
echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
