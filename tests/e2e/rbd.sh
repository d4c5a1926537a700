# The rbd target's end-to-end cases (sourced by suite.sh), against a throwaway
# single-node Ceph (one mon, one memstore OSD, auth none) that the first rbd case
# starts on 127.0.0.1 inside the VM (tests/e2e/ceph-cluster.sh) and the suite stops at
# its end. Under TCG the OSD serves a few hundred IOPS: data sizes are small.

CEPH_DIR=$WORK/ceph
CEPH_CONF=$CEPH_DIR/ceph.conf
export UBD_CEPH_MON=${UBD_CEPH_MON:-$(dirname "$UBD")/ubd-ceph-mon}

# The cluster, started once for all rbd cases (cases run in subshells: the marker file
# says it is up).
ceph_up() {
    if [[ -e $CEPH_DIR/up ]] && kill -0 "$(cat "$CEPH_DIR"/run/mon.a.pid)" 2>/dev/null; then
        return 0
    fi
    [[ -x $UBD_CEPH_MON ]] || fail "no ubd-ceph-mon helper at $UBD_CEPH_MON (cargo build -p ubd-ceph)"
    local t0=$SECONDS
    rm -rf "$CEPH_DIR"
    mkdir -p "$CEPH_DIR"
    bash "$HERE/ceph-cluster.sh" start "$CEPH_DIR" >/dev/null 2>"$WORK/ceph-start.err" ||
        { cat "$WORK/ceph-start.err" >&2; fail "the Ceph cluster did not start"; }
    log "ceph cluster up on 127.0.0.1 in $((SECONDS - t0)) s"
    touch "$CEPH_DIR/up"
}

ceph_down() {
    [[ -d $CEPH_DIR ]] || return 0
    bash "$HERE/ceph-cluster.sh" stop "$CEPH_DIR" 2>/dev/null || true
    rm -rf "$CEPH_DIR"
}

rbdc() { timeout 300 rbd -c "$CEPH_CONF" --no-progress "$@"; }

# The OSD's pid.
osd_pid() { cat "$CEPH_DIR"/run/osd.*.pid; }

# rbd_image NAME SIZE: a fresh image.
rbd_image() {
    rbdc rm "rbd/$1" >/dev/null 2>&1 || true
    rbdc create --size "$2" "rbd/$1"
}

# fio verify in copy and auto (which picks copy) buffer modes; DISCARD, WRITE_ZEROES,
# FUA and FLUSH reach librbd; the device's bytes equal `rbd export`; the zero-copy
# modes are refused; no partition scan on network devices.
case_rbd_io() {
    ceph_up
    rbd_image io 96M
    start_dev --depth 32 rbd --conf "$CEPH_CONF" rbd/io
    grep -q "buffer mode copy (auto: the rbd target moves request data" "$LOG" ||
        fail "buffer mode: $(grep "buffer mode" "$LOG")"
    if "$UBD" features --json | grep -q '"NO_AUTO_PART_SCAN"'; then
        grep -q '"NO_AUTO_PART_SCAN"' <<<"$("$UBD" list --json)" || fail "the device was made without NO_AUTO_PART_SCAN"
    fi
    fio_verify --rw=randwrite --bs=4k --iodepth=16 --size=2M
    fio_verify --rw=randwrite --bsrange=512-128k --iodepth=16 --numjobs=2 --offset_increment=16M --size=4M --fsync=8
    # O_SYNC writes arrive as FUA (write + flush in librbd).
    fio_verify --rw=write --bs=64k --iodepth=4 --size=2M --offset=40M --sync=1
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=4 status=none
    dd if="$WORK/pat" of="$DEV" bs=1M seek=48 oflag=direct conv=fsync status=none
    # 64 KiB-aligned discards read back zero (librbd skips partial ones).
    blkdiscard -o 48M -l 1M "$DEV"
    blkdiscard -z -o 50M -l 512K "$DEV"
    cmp -n 1048576 <(dd if="$DEV" bs=1M skip=48 count=1 iflag=direct status=none) /dev/zero
    cmp -n 524288 <(dd if="$DEV" bs=512K skip=100 count=1 iflag=direct status=none) /dev/zero
    cmp <(dd if="$DEV" bs=1M skip=49 count=1 iflag=direct status=none) <(dd if="$WORK/pat" bs=1M skip=1 count=1 status=none)
    dd if="$DEV" of="$WORK/dev.img" bs=1M iflag=direct status=none
    stop_dev
    local n
    n=$(grep "stopped and deleted" "$LOG")
    for w in flushes discards write-zeroes; do
        grep -qE "$w [1-9]" <<<"$n" || fail "no ${w} reached the target: $n"
    done
    grep -q "errors 0" <<<"$n" || fail "errors: $n"
    rbdc export rbd/io "$WORK/export.img" >/dev/null
    cmp "$WORK/dev.img" "$WORK/export.img" || fail "the device's bytes differ from rbd export"
    rm -f "$WORK/dev.img" "$WORK/export.img"
    log "fio verify (4k qd16, 512-128k x2 with fsync, O_SYNC 64k), discard/write-zeroes read zero, device = rbd export (96 MiB)"
    start_dev --depth 16 --buffer-mode copy rbd --conf "$CEPH_CONF" --ceph-option rbd_cache=false \
        --ceph-option debug_rbd=0/0 rbd/io
    grep -q '"rbd_cache=false"' <("$UBD" list --json) || fail "list does not show the Ceph options"
    fio_verify --rw=randrw --bs=16k --iodepth=8 --size=2M --offset=64M
    stop_dev
    if "$UBD" features --json | grep -q '"ZERO_COPY"'; then
        expect_error "buffer mode zero-copy .* rbd target" --buffer-mode zero-copy rbd --conf "$CEPH_CONF" rbd/io
    fi
    log "buffer mode copy with --ceph-option rbd_cache=false: fio verify; zero-copy modes refused"
}

# ext4 on an image: files written, checksums after a remount, fsck clean.
case_rbd_ext4() {
    ceph_up
    rbd_image fs 64M
    start_dev --depth 32 rbd --conf "$CEPH_CONF" rbd/fs
    mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=1 "$DEV"
    mkdir -p "$WORK/mnt"
    mount "$DEV" "$WORK/mnt"
    dd if=/dev/urandom of="$WORK/mnt/a" bs=1M count=6 status=none
    cp "$WORK/mnt/a" "$WORK/mnt/b"
    sync
    local sum
    sum=$(sha256sum <"$WORK/mnt/a")
    umount "$WORK/mnt"
    mount "$DEV" "$WORK/mnt"
    [[ $(sha256sum <"$WORK/mnt/b") == "$sum" ]] || fail "checksum changed after remount"
    umount "$WORK/mnt"
    fsck.ext4 -f -n "$DEV" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; fail "fsck"; }
    stop_dev
    log "ext4: 12 MiB of files intact after remount, fsck clean"
}

# A snapshot maps read-only: the kernel refuses writes, the bytes are the snapshot's.
case_rbd_snap() {
    ceph_up
    rbd_image sn 16M
    start_dev --depth 16 rbd --conf "$CEPH_CONF" rbd/sn
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=2 status=none
    dd if="$WORK/pat" of="$DEV" bs=1M oflag=direct conv=fsync status=none
    stop_dev
    rbdc snap create rbd/sn@s1 >/dev/null
    start_dev --depth 16 rbd --conf "$CEPH_CONF" rbd/sn
    dd if=/dev/zero of="$DEV" bs=1M count=2 oflag=direct conv=fsync status=none
    stop_dev
    start_dev --depth 16 rbd --conf "$CEPH_CONF" rbd/sn@s1
    [[ $(blockdev --getro "$DEV") == 1 ]] || fail "snapshot device is not read-only"
    grep -q '"read_only": *true' <("$UBD" list --json) || fail "list does not say read-only"
    cmp <(dd if="$DEV" bs=1M count=2 iflag=direct status=none) "$WORK/pat" || fail "snapshot bytes differ"
    if dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
        fail "a write to the snapshot device succeeded"
    fi
    stop_dev
    grep -q "writes 0" <(grep "stopped and deleted" "$LOG") || fail "a write reached the target: $(grep "stopped and deleted" "$LOG")"
    log "rbd/sn@s1: read-only device, the snapshot's bytes, writes refused by the kernel"
}

# kill -9 under fio verify, then recover: fio finishes with 0 errors, a verify pass after.
case_rbd_recover() {
    ceph_up
    rbd_image rec 32M
    local round rounds=${UBD_RBD_RECOVER_ROUNDS:-2}
    for ((round = 0; round < rounds; round++)); do
        start_dev --depth 16 rbd --conf "$CEPH_CONF" rbd/rec
        local id=${DEV#/dev/ublkb}
        local job=(--name=rec --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
            --iodepth=8 --size=2M --verify=crc32c --verify_fatal=1 --randseed=$round)
        fio "${job[@]}" --verify_backlog=64 >"$WORK/fio-rec.out" 2>&1 &
        local fio_pid=$!
        wait_writes "$id" 20
        kill -KILL "$PID"
        wait "$PID" 2>/dev/null || true
        "$UBD" list | grep -E "^$id +(quiesced|live) .* dead " >/dev/null ||
            fail "device $id not left for recovery: $("$UBD" list)"
        # The dead client's exclusive lock is broken by the new one (librbd blocklists it).
        START_TIMEOUT=240 start_recover "$id"
        local rc=0
        wait "$fio_pid" || rc=$?
        ((rc == 0)) || { cat "$WORK/fio-rec.out" >&2; fail "fio across the recovery exited $rc"; }
        fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 ||
            { cat "$WORK/fio-ver.out" >&2; fail "verify after recovery failed"; }
        stop_dev
    done
    log "$rounds kill -9 / recover rounds under fio verify: 0 errors across each and after"
}

# An OSD that stops answering (SIGSTOP): IO fails after --io-timeout instead of hanging;
# once the OSD is back the device serves again and stops cleanly.
case_rbd_stall() {
    ceph_up
    rbd_image st 16M
    start_dev --depth 16 rbd --conf "$CEPH_CONF" --io-timeout 4 rbd/st
    dd if=/dev/urandom of="$DEV" bs=1M count=2 oflag=direct conv=fsync status=none
    local osd t0
    osd=$(osd_pid)
    kill -STOP "$osd"
    t0=$SECONDS
    if timeout 120 dd if="$DEV" of=/dev/null bs=4k count=1 skip=17 iflag=direct status=none 2>"$WORK/dd.err"; then
        kill -CONT "$osd"
        fail "a read with the OSD stopped succeeded"
    fi
    local took=$((SECONDS - t0))
    kill -CONT "$osd"
    ((took < 100)) || fail "the read hung (${took} s) instead of failing after --io-timeout"
    grep -q "failing them with ETIMEDOUT" "$LOG" || { cat "$LOG" >&2; fail "no IO timeout logged"; }
    grep -qE "Input/output error|Connection timed out" "$WORK/dd.err" || fail "dd: $(cat "$WORK/dd.err")"
    # Served again once the OSD answers.
    cmp <(dd if="$DEV" bs=1M count=1 iflag=direct status=none) <(dd if="$DEV" bs=1M count=1 iflag=direct status=none)
    fio_verify --rw=randwrite --bs=4k --iodepth=8 --size=1M
    stop_dev
    log "OSD stopped: the read failed ($(cut -d: -f3- "$WORK/dd.err" | head -n1)) after ${took} s (--io-timeout 4); served again after SIGCONT"
}

# Bad input: one line naming the problem, exit 1, no device left.
case_rbd_bad_input() {
    ceph_up
    expect_error "pool nosuch: no such pool" rbd --conf "$CEPH_CONF" nosuch/img
    expect_error "rbd/nosuch: no such image or snapshot" rbd --conf "$CEPH_CONF" rbd/nosuch
    rbd_image bad 8M
    expect_error "rbd/bad@nosnap: no such image or snapshot" rbd --conf "$CEPH_CONF" rbd/bad@nosnap
    expect_error "Ceph configuration $WORK/missing.conf: No such file or directory" rbd --conf "$WORK/missing.conf" rbd/bad
    expect_error "keyring $WORK/missing.keyring: No such file or directory" \
        rbd --conf "$CEPH_CONF" --keyring "$WORK/missing.keyring" rbd/bad
    expect_error "expected POOL/IMAGE" rbd --conf "$CEPH_CONF" justimage
    expect_error "an rbd device has one queue" --queues 2 rbd --conf "$CEPH_CONF" rbd/bad
    expect_error "Ceph option no_such_option: no such option" rbd --conf "$CEPH_CONF" --ceph-option no_such_option=1 rbd/bad
    expect_error "--ceph-option \"junk\": expected NAME=VALUE" rbd --conf "$CEPH_CONF" --ceph-option junk rbd/bad
    # A monitor address nothing listens on.
    sed 's/^mon host = .*/mon host = [v2:127.0.0.1:3399,v1:127.0.0.1:6799]/' "$CEPH_CONF" >"$WORK/dead-mon.conf"
    expect_error "connecting to the Ceph cluster of $WORK/dead-mon.conf .*no monitor answered" \
        rbd --conf "$WORK/dead-mon.conf" --connect-timeout 3 rbd/bad
}
