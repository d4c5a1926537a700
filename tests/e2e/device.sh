# Device features (issue 16): read-only devices, live resize. Sourced by suite.sh.

# sha of the first MiB of a backing (what must not change under a read-only device).
head_sum() { dd if="$1" bs=1M count=1 status=none | sha256sum | cut -d' ' -f1; }

# --read-only, and a backing that can only be opened read-only: the kernel marks the disk
# read-only, writes fail, the backing's bytes do not change, reads give them; a kill -9
# and recover keep the device read-only.
case_read_only() {
    local img=$FS/ro.img sum rc id
    dd if=/dev/urandom of="$img" bs=1M count=16 status=none
    sum=$(head_sum "$img")
    start_dev --queues 2 --depth 16 --read-only loop "$img"
    id=${DEV#/dev/ublkb}
    grep -q "read-only device (--read-only): writes fail with EROFS" "$LOG" || { cat "$LOG" >&2; fail "no read-only line"; }
    [[ $(blockdev --getro "$DEV") == 1 ]] || fail "$DEV is not read-only (blockdev --getro)"
    "$UBD" list | grep -qE "^$id +live .* ro +[0-9]+ alive" || fail "list does not say ro: $("$UBD" list)"
    grep -q '"read_only": true' <("$UBD" list --json) || fail "list --json does not say read_only"
    rc=0
    dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct status=none 2>"$WORK/dd.err" || rc=$?
    ((rc != 0)) || fail "a write to the read-only device succeeded"
    log "write refused: $(head -n1 "$WORK/dd.err")"
    rc=0
    blkdiscard -o 0 -l 1M "$DEV" 2>"$WORK/dd.err" || rc=$?
    ((rc != 0)) || fail "a discard on the read-only device succeeded"
    cmp <(dd if="$DEV" bs=1M count=16 iflag=direct status=none) "$img" || fail "reads differ from the backing"
    fio --name=ro --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=16 --numjobs=2 \
        --size=16M --io_size=8M --group_reporting >"$WORK/fio.out" || { cat "$WORK/fio.out" >&2; fail "fio randread"; }
    # kill -9 and recover: still read-only (the device's attribute), backing opened read-only.
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    start_recover "$id"
    grep -q "read-only device (as the device was created)" "$LOG" ||
        grep -q "read-only device (--read-only)" "$LOG" || { cat "$LOG" >&2; fail "recovered device not read-only"; }
    [[ $(blockdev --getro "$DEV") == 1 ]] || fail "recovered $DEV is not read-only"
    rc=0
    dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct status=none 2>/dev/null || rc=$?
    ((rc != 0)) || fail "a write to the recovered read-only device succeeded"
    stop_dev
    [[ $(head_sum "$img") == "$sum" ]] || fail "the backing changed under a read-only device"
    log "--read-only: blockdev --getro 1, list ro, write and discard refused, reads and fio randread match, kept across kill -9 + recover; backing unchanged"

    # A backing on a read-only bind mount: opened read-only, served read-only, said so.
    mkdir -p "$WORK/ro-src" "$WORK/ro-mnt"
    cp "$img" "$WORK/ro-src/ro.img"
    mount --bind "$WORK/ro-src" "$WORK/ro-mnt"
    mount -o remount,bind,ro "$WORK/ro-mnt"
    start_dev --queues 1 loop "$WORK/ro-mnt/ro.img"
    grep -q "can only be opened read-only" "$LOG" || { cat "$LOG" >&2; umount "$WORK/ro-mnt"; fail "no log line for the read-only backing"; }
    grep -q "read-only device (the target allows no writes)" "$LOG" || { cat "$LOG" >&2; umount "$WORK/ro-mnt"; fail "not served read-only"; }
    [[ $(blockdev --getro "$DEV") == 1 ]] || { umount "$WORK/ro-mnt"; fail "$DEV is not read-only"; }
    cmp <(dd if="$DEV" bs=1M count=16 iflag=direct status=none) "$img" || { umount "$WORK/ro-mnt"; fail "reads differ"; }
    stop_dev
    umount "$WORK/ro-mnt"
    log "a backing on a read-only mount: $(grep -o '[^ ]* can only be opened read-only.*' "$LOG" | head -n1)"
}

# `resize` (UBLK_F_UPDATE_SIZE, 6.16+). Without the feature: refused in one line, the
# device untouched. With it: ext4 on a loop file grows online (resize2fs) with its data
# intact; shrinking needs --force; null resizes; a block device backing bounds the size
# and a device shrunk below it recovers at its size after kill -9.
case_resize() {
    local img=$FS/rs.img id
    truncate -s 64M "$img"
    if [[ $("$UBD" features --json) != *'"UPDATE_SIZE"'* ]]; then
        start_dev --queues 1 loop "$img"
        id=${DEV#/dev/ublkb}
        expect_error "resizing a device needs the ublk feature UPDATE_SIZE \(Linux 6.16\+\), which this kernel does not offer" resize "$id" 128M
        [[ $(blockdev --getsize64 "$DEV") == $((64 << 20)) && $(stat -c %s "$img") == $((64 << 20)) ]] ||
            fail "a refused resize changed the device or its backing"
        stop_dev
        exit 77
    fi
    start_dev --queues 2 --depth 32 loop "$img"
    id=${DEV#/dev/ublkb}
    mkfs.ext4 -q -F "$DEV"
    mkdir -p "$WORK/mnt"
    mount "$DEV" "$WORK/mnt"
    make_tree
    cp -a "$WORK/tree" "$WORK/mnt/tree"
    (cd "$WORK/mnt/tree" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/sums"
    local before after
    before=$(df -k --output=size "$WORK/mnt" | tail -n1)
    "$UBD" resize "$id" 160M >"$WORK/rs.out" || { umount "$WORK/mnt"; fail "resize to 160M failed"; }
    [[ $(blockdev --getsize64 "$DEV") == $((160 << 20)) ]] || { umount "$WORK/mnt"; fail "device size $(blockdev --getsize64 "$DEV") after resize"; }
    [[ $(stat -c %s "$img") == $((160 << 20)) ]] || { umount "$WORK/mnt"; fail "the backing file did not grow"; }
    resize2fs "$DEV" >"$WORK/resize2fs.out" 2>&1 || { cat "$WORK/resize2fs.out" >&2; umount "$WORK/mnt"; fail "online resize2fs"; }
    after=$(df -k --output=size "$WORK/mnt" | tail -n1)
    ((after > before + 80000)) || { umount "$WORK/mnt"; fail "ext4 did not grow: $before -> $after KiB"; }
    # Fill the new space and check everything.
    dd if=/dev/urandom of="$WORK/mnt/big" bs=1M count=100 conv=fsync status=none || { umount "$WORK/mnt"; fail "writing into the grown filesystem"; }
    sha256sum "$WORK/mnt/big" >"$WORK/big.sum"
    umount "$WORK/mnt"
    fsck.ext4 -fn "$DEV" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; fail "fsck after the online grow"; }
    mount "$DEV" "$WORK/mnt"
    (cd "$WORK/mnt/tree" && sha256sum -c --quiet "$WORK/sums") && (cd / && sha256sum -c --quiet "$WORK/big.sum") ||
        { umount "$WORK/mnt"; fail "checksums after the grow"; }
    umount "$WORK/mnt"
    "$UBD" list | grep -qE "^$id +live .* 160\.0 MiB rw " || fail "list does not show 160 MiB: $("$UBD" list)"
    log "ext4 on loop 64M -> $(cat "$WORK/rs.out"); resize2fs online ${before} -> ${after} KiB, 100 MiB written into it, fsck clean, checksums intact"
    # Shrinking: refused without --force (nothing changes), done with it (backing too).
    expect_error "shrinking device $id from 160.0 MiB to 96.0 MiB cuts off the data past 100663296 bytes: use --force" resize "$id" 96M
    [[ $(blockdev --getsize64 "$DEV") == $((160 << 20)) ]] || fail "a refused shrink changed the size"
    expect_error "size 1000 bytes is not a positive multiple of device $id's 512-byte block size" resize "$id" 1000
    expect_error "device 9999 does not exist|no such device" resize 9999 1G
    "$UBD" resize "$id" 96M --force >/dev/null
    [[ $(blockdev --getsize64 "$DEV") == $((96 << 20)) && $(stat -c %s "$img") == $((96 << 20)) ]] ||
        fail "after --force: device $(blockdev --getsize64 "$DEV"), backing $(stat -c %s "$img")"
    # kill -9 after the resizes: recover takes the device at its new size.
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    start_recover "$id"
    [[ $(blockdev --getsize64 "$DEV") == $((96 << 20)) ]] || fail "recovered at $(blockdev --getsize64 "$DEV") bytes"
    fio_verify --rw=randwrite --bs=4k --iodepth=16 --size=8M --offset=80M
    stop_dev
    log "shrink refused without --force, done with it (device and file 96 MiB); kill -9 + recover at 96 MiB, fio verify at its end"
    # null: the size only; a block device backing: bounded by the block device, and a
    # device below it recovers at its own size.
    start_dev --queues 1 null --size 64M
    "$UBD" resize "${DEV#/dev/ublkb}" 1G >/dev/null
    [[ $(blockdev --getsize64 "$DEV") == $((1 << 30)) ]] || fail "null did not grow to 1G"
    dd if="$DEV" of=/dev/null bs=1M skip=1000 count=8 iflag=direct status=none || fail "read past the old end of null"
    stop_dev
    start_dev --queues 1 loop /dev/ram0
    id=${DEV#/dev/ublkb}
    expect_error "/dev/ram0 holds 256.0 MiB \(268435456 bytes\): it cannot back a 536870912-byte device \(grow it first\)" resize "$id" 512M
    "$UBD" resize "$id" 128M --force >/dev/null
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=4 status=none
    dd if="$WORK/pat" of="$DEV" bs=1M seek=124 oflag=direct status=none
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    start_recover "$id"
    [[ $(blockdev --getsize64 "$DEV") == $((128 << 20)) ]] || fail "brd-backed device recovered at $(blockdev --getsize64 "$DEV") bytes"
    cmp <(dd if="$DEV" bs=1M skip=124 count=4 iflag=direct status=none) "$WORK/pat" || fail "data at the end of the shrunk device"
    stop_dev
    log "null 64M -> 1G, read past the old end; loop /dev/ram0: 512M refused (256 MiB), 128M --force, kill -9 + recover at 128 MiB with its last 4 MiB intact"
}

# Safe stop: a device that is open is not removed by `del` (even --force) nor by its
# daemon's SIGTERM: the refusal names the holder (mount point, pid); the daemon serves
# on and stops once the device is closed; a second signal or `del --yank` removes it
# anyway. On 7.0+ the daemon's stop goes through TRY_STOP_DEV.
case_safe_stop() {
    local img=$FS/ss.img id holder rc=0 deadline
    truncate -s 64M "$img"
    start_dev --queues 1 loop "$img"
    id=${DEV#/dev/ublkb}
    mkfs.ext4 -q -F "$DEV"
    mkdir -p "$WORK/mnt"
    mount "$DEV" "$WORK/mnt"
    echo before >"$WORK/mnt/f" && sync
    expect_error "device $id is in use \(mounted on $WORK/mnt \(ublkb$id\)\): not deleted \(close it first, or --yank to remove it anyway\)" del "$id" --force
    expect_error "device $id is in use \(mounted on $WORK/mnt" del --all --force
    kill -TERM "$PID"
    deadline=$((SECONDS + 30))
    until grep -q "is in use (mounted on $WORK/mnt" "$LOG"; do
        ((SECONDS < deadline)) || { umount "$WORK/mnt"; cat "$LOG" >&2; fail "SIGTERM: the daemon did not say the device is in use"; }
        sleep 0.1
    done
    sleep 1
    kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; fail "the daemon stopped a mounted device on SIGTERM"; }
    echo after >>"$WORK/mnt/f" && sync || fail "the mounted filesystem stopped working after SIGTERM"
    umount "$WORK/mnt"
    timeout 30 tail --pid="$PID" -f /dev/null || fail "the daemon did not stop within 30 s of the umount"
    wait "$PID" || rc=$?
    ((rc == 0)) || { cat "$LOG" >&2; fail "daemon exited $rc"; }
    grep -q "stopped once the device was closed" "$LOG" || { cat "$LOG" >&2; fail "no 'stopped once closed' line"; }
    [[ ! -e $DEV ]] || fail "$DEV left after the daemon stopped"
    fsck.ext4 -fn "$img" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; fail "fsck of the backing"; }
    log "mounted: del --force refused naming the mount point; SIGTERM served on ($(grep -o 'is in use ([^)]*)' "$LOG" | head -n1)), stopped after umount; fsck clean"
    # A process holding it open: refused naming the pid; --yank removes it anyway.
    start_dev --queues 1 loop "$img"
    id=${DEV#/dev/ublkb}
    sleep 300 <"$DEV" &
    holder=$!
    deadline=$((SECONDS + 10))
    until [[ $(readlink "/proc/$holder/fd/0" 2>/dev/null) == "$DEV" ]]; do
        ((SECONDS < deadline)) || fail "the holder never opened $DEV"
        sleep 0.1
    done
    expect_error "device $id is in use \(open in process $holder \(sleep\) as $DEV\)" del "$id" --force
    timeout 60 "$UBD" del "$id" --yank >"$WORK/del.out" || { kill "$holder"; cat "$LOG" >&2; fail "del --yank failed"; }
    rc=0
    timeout 30 tail --pid="$PID" -f /dev/null || fail "the daemon did not stop after del --yank"
    wait "$PID" || rc=$?
    ((rc == 0)) || { cat "$LOG" >&2; fail "daemon exited $rc after del --yank"; }
    grep -q "stopping the device while it is in use" "$LOG" || { cat "$LOG" >&2; fail "no yank line in the daemon's log"; }
    kill "$holder" 2>/dev/null
    wait "$holder" 2>/dev/null || true
    [[ ! -e $DEV ]] || fail "$DEV left after del --yank"
    # A dead daemon's device, held open: `del` refuses, and works once it is closed.
    start_dev --queues 1 loop "$img"
    id=${DEV#/dev/ublkb}
    sleep 300 <"$DEV" &
    holder=$!
    sleep 0.5
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    expect_error "device $id is in use \(open in process $holder" del "$id"
    kill "$holder"
    wait "$holder" 2>/dev/null || true
    timeout 60 "$UBD" del "$id" >/dev/null || fail "del of the closed device failed"
    local how="holders from /proc and sysfs"
    [[ $("$UBD" features --json) == *'"SAFE_STOP_DEV"'* ]] && how="TRY_STOP_DEV (SAFE_STOP_DEV) after the holder check"
    log "held by a process: del --force refused naming pid $holder, del --yank removed it; a dead daemon's held device: del refused, then done once closed ($how)"
}

# The zoned target (UBLK_F_ZONED, 6.6+; buffer mode user-copy): the block layer sees a
# host-managed device of the geometry asked for; blkzone report/reset/open/close/finish
# do what they say; writes off the write pointer fail; fio zonemode=zbd verifies; btrfs
# in zoned mode (zone append) holds a file tree. Without ZONED: refused in one line.
case_zoned() {
    local id sys report sum
    if [[ $("$UBD" features --json) != *'"ZONED"'* ]]; then
        expect_error "a zoned device needs the ublk feature ZONED \(Linux 6.6\+\)" zoned --size 64M --zone-size 4M
        return 0
    fi
    expect_error "zoned: zone size 3145728 must be a power of two" zoned --size 64M --zone-size 3M
    expect_error "zoned: --max-open 20 exceeds the 16 sequential zones" zoned --size 64M --zone-size 4M --max-open 20
    expect_error "buffer mode copy cannot serve a zoned device" --buffer-mode copy zoned --size 64M --zone-size 4M
    expect_error "a zoned device is served with io protocol per-tag" --io-protocol batch zoned --size 64M --zone-size 4M
    start_dev --queues 2 --depth 32 zoned --size 256M --zone-size 8M --conventional 2 --max-open 6 --max-active 8
    id=${DEV#/dev/ublkb}
    grep -q "buffer mode user-copy (a zoned device" "$LOG" || { cat "$LOG" >&2; fail "no user-copy line"; }
    sys=/sys/block/ublkb$id/queue
    [[ $(cat $sys/zoned) == host-managed && $(cat $sys/nr_zones) == 32 && $(cat $sys/chunk_sectors) == 16384 ]] ||
        fail "zoned $(cat $sys/zoned), nr_zones $(cat $sys/nr_zones), chunk_sectors $(cat $sys/chunk_sectors)"
    [[ $(cat $sys/max_open_zones) == 6 && $(cat $sys/max_active_zones) == 8 ]] ||
        fail "max_open_zones $(cat $sys/max_open_zones), max_active_zones $(cat $sys/max_active_zones)"
    report=$(blkzone report "$DEV")
    [[ $(wc -l <<<"$report") == 32 ]] || fail "blkzone report: $(wc -l <<<"$report") zones"
    [[ $(grep -c "CONVENTIONAL" <<<"$report") == 2 && $(grep -c "1(em)" <<<"$report") == 30 ]] ||
        fail "blkzone report: $report"
    # Zone 2 (sector 32768): written at its write pointer; off it, refused.
    dd if=/dev/urandom of="$WORK/z.pat" bs=1M count=1 status=none
    dd if="$WORK/z.pat" of="$DEV" bs=1M seek=16 oflag=direct status=none
    # The zone at sector $1: "COND WPTR" (blkzone prints the write pointer from the zone start).
    zone_line() { blkzone report -o "$1" -c 1 "$DEV"; }
    zone_state() { zone_line "$1" | sed -E 's/.*wptr 0x0*([0-9a-f]*[0-9a-f]).*zcond: *([0-9]+)\(.*/\2 \1/'; }
    [[ $(zone_state 32768) == "2 800" ]] || fail "after 1M: $(zone_line 32768)"
    ! dd if="$WORK/z.pat" of="$DEV" bs=1M seek=20 oflag=direct status=none 2>/dev/null || fail "a write off the write pointer succeeded"
    cmp <(dd if="$DEV" bs=1M skip=16 count=1 iflag=direct status=none) "$WORK/z.pat" || fail "zone 2 reads back wrong"
    # The conventional zones take writes anywhere.
    dd if="$WORK/z.pat" of="$DEV" bs=1M seek=3 oflag=direct status=none
    cmp <(dd if="$DEV" bs=1M skip=3 count=1 iflag=direct status=none) "$WORK/z.pat" || fail "conventional zone reads back wrong"
    blkzone close -o 32768 -c 1 "$DEV"
    [[ $(zone_state 32768) == "4 800" ]] || fail "close: $(zone_line 32768)"
    blkzone finish -o 32768 -c 1 "$DEV"
    [[ $(zone_state 32768) == "14 "* ]] || fail "finish: $(zone_line 32768)"
    blkzone open -o 49152 -c 1 "$DEV"
    [[ $(zone_state 49152) == "3 0" ]] || fail "open: $(zone_line 49152)"
    blkzone reset -o 32768 -c 2 "$DEV"
    [[ $(zone_state 32768) == "1 0" && $(zone_state 49152) == "1 0" ]] || fail "reset: $(zone_line 32768) / $(zone_line 49152)"
    cmp -n 1048576 <(dd if="$DEV" bs=1M skip=16 count=1 iflag=direct status=none) /dev/zero || fail "a reset zone does not read zeroes"
    log "zoned: host-managed, 32 zones (2 conventional), limits 6/8; write pointer, refusal off it, close/finish/open/reset per blkzone"
    # fio's zoned mode: sequential writes over the sequential zones, verified; then random
    # writes that fio keeps at each zone's write pointer, verified.
    fio --name=zseq --filename="$DEV" --ioengine=psync --direct=1 --zonemode=zbd --offset=16M --size=96M \
        --rw=write --bs=128k --verify=crc32c --verify_fatal=1 --max_open_zones=4 >"$WORK/fio.out" ||
        { cat "$WORK/fio.out" >&2; fail "fio zonemode=zbd seq write + verify"; }
    blkzone reset "$DEV"
    fio --name=zrand --filename="$DEV" --ioengine=libaio --iodepth=8 --direct=1 --zonemode=zbd --offset=16M \
        --size=128M --io_size=48M --rw=randwrite --bs=16k --verify=crc32c --verify_fatal=1 --max_open_zones=6 \
        --numjobs=1 >"$WORK/fio.out" || { cat "$WORK/fio.out" >&2; fail "fio zonemode=zbd randwrite + verify"; }
    log "fio zonemode=zbd: seq write 96M and randwrite 48M (qd8) verified"
    # A zoned filesystem: btrfs writes its data with zone appends.
    if command -v mkfs.btrfs >/dev/null && modprobe btrfs 2>/dev/null; then
        blkzone reset "$DEV"
        mkfs.btrfs -q -f -O zoned -d single -m single "$DEV" >"$WORK/mkfs.out" 2>&1 ||
            { cat "$WORK/mkfs.out" >&2; fail "mkfs.btrfs -O zoned"; }
        mkdir -p "$WORK/zmnt"
        mount -t btrfs "$DEV" "$WORK/zmnt"
        dd if=/dev/urandom of="$WORK/zmnt/big" bs=1M count=24 status=none
        cp -r /usr/share/doc/util-linux "$WORK/zmnt/tree"
        sync
        sum=$(sha256sum <"$WORK/zmnt/big")
        umount "$WORK/zmnt"
        mount -t btrfs "$DEV" "$WORK/zmnt"
        [[ $(sha256sum <"$WORK/zmnt/big") == "$sum" ]] || { umount "$WORK/zmnt"; fail "btrfs file changed across a remount"; }
        diff -r /usr/share/doc/util-linux "$WORK/zmnt/tree" >/dev/null || { umount "$WORK/zmnt"; fail "btrfs tree differs"; }
        btrfs scrub start -B "$WORK/zmnt" >"$WORK/scrub.out" 2>&1 || { cat "$WORK/scrub.out" >&2; umount "$WORK/zmnt"; fail "btrfs scrub"; }
        umount "$WORK/zmnt"
        log "btrfs -O zoned: 24M file and a tree survive a remount, scrub clean ($(grep -o 'Error summary:.*' "$WORK/scrub.out"))"
    else
        log "NOTE: no mkfs.btrfs or btrfs module here: the zoned filesystem check is not run"
    fi
    grep -q '"zone_ops": [1-9]' <("$UBD" stats "$id" --json) || fail "stats --json counts no zone_ops"
    stop_dev
}

# More threads than queues (--threads, UBLK_F_PER_IO_DAEMON, 6.16+): one queue served by
# two threads, each with its own ring and half the tags, in every buffer mode: fio
# verify, both threads serving; kill -9 and recover with two threads under fio verify.
# Without the feature: refused in one line.
case_threads() {
    if [[ $("$UBD" features --json) != *'"PER_IO_DAEMON"'* ]]; then
        expect_error "--threads 2 needs the ublk feature PER_IO_DAEMON \(Linux 6.16\+\)" --threads 2 null --size 64M
        return 0
    fi
    expect_error "3 threads per queue: from 1 to the queue depth \(2\)" --threads 3 --depth 2 null --size 64M
    expect_error "several threads per queue are served with io protocol per-tag" --threads 2 --io-protocol batch null --size 64M
    local mode modes comms
    # The CI run: auto-reg (or copy) here, copy in the recovery round; --full: every
    # mode and two rounds.
    modes=$(available_modes)
    [[ -n ${UBD_E2E_FULL:-} ]] || modes=$(grep -x auto-reg <<<"$modes" || echo copy)
    for mode in $modes; do
        start_dev --queues 1 --threads 2 --depth 32 --buffer-mode "$mode" loop /dev/ram0
        grep -q "1 queues x 2 threads x depth 32" "$LOG" || { cat "$LOG" >&2; fail "no threads in the startup line"; }
        comms=$(cat /proc/"$PID"/task/*/comm | grep -c '^ubd-q0\.[01]$')
        ((comms == 2)) || fail "want threads ubd-q0.0 and ubd-q0.1, got: $(cat /proc/"$PID"/task/*/comm | tr '\n' ' ')"
        fio_verify --rw=randwrite --bsrange=4k-128k --iodepth=32 --numjobs=2 --offset_increment=64M --size=24M
        # Both threads served requests (the stats of the last second are published).
        sleep 1.2
        python3 -c 'import json,sys; q=json.load(sys.stdin)["stats"]["queues"]; sys.exit(not (len(q) == 2 and all(x["reads"] + x["writes"] > 0 for x in q)))' \
            < <("$UBD" stats "${DEV#/dev/ublkb}" --json) || fail "not both threads served: $("$UBD" stats "${DEV#/dev/ublkb}")"
        check_roundtrip /dev/ram0
        log "buffer mode $mode, 1 queue x 2 threads: verified, both threads served"
    done
    recover_rounds "$([[ -n ${UBD_E2E_FULL:-} ]] && echo 2 || echo 1)" --threads 2
}

# shmem_stats ID: "SHARED TOTAL" of device ID's reads and writes (the last second's stats).
shmem_stats() {
    sleep 1.2
    "$UBD" stats "$1" --json | python3 -c 'import json,sys; c=json.load(sys.stdin)["stats"]["total"]; print(c["shmem_zc"], c["reads"] + c["writes"])'
}

# shmem_both_paths ID: device ID served some reads and writes from the shared memory and
# some the buffer mode's way.
shmem_both_paths() {
    local shared total
    read -r shared total < <(shmem_stats "$1")
    ((shared > 0 && total > shared)) || fail "want both paths served: $shared of $total reads and writes from shared memory"
    log "$shared of $total reads and writes served from shared memory, the rest in the buffer mode"
}

# Shared-memory zero copy (UBLK_F_SHMEM_ZC, 7.1+): fio with its buffers in the registered
# file (hugetlbfs, tmpfs) and a second job with buffers of its own in the same run, both
# verified, in every buffer mode; read-only registration; ext4 with fio from the shared
# memory inside it, fsck clean; kill -9 + recover under fio verify from the shared memory.
case_shmem() {
    if [[ $("$UBD" features --json) != *'"SHMEM_ZC"'* ]]; then
        expect_error "--shmem needs the ublk feature SHMEM_ZC \(Linux 7.1\+\)" --shmem "$WORK/shm.buf,size=4M" null --size 64M
        return 0
    fi
    local huge=$WORK/huge shm=$WORK/shm
    mkdir -p "$huge" "$shm"
    # shellcheck disable=SC2064 # the paths now: the locals are gone when the subshell exits
    trap "umount -l '$huge' '$shm' 2>/dev/null; echo 0 >/proc/sys/vm/nr_hugepages" EXIT
    echo 48 >/proc/sys/vm/nr_hugepages
    (($(cat /proc/sys/vm/nr_hugepages) >= 48)) || fail "cannot reserve 48 hugepages for the hugetlbfs file"
    mount -t hugetlbfs none "$huge"
    mount -t tmpfs -o size=64M none "$shm"
    expect_error "shared memory $shm/missing: .*No such file" --shmem "$shm/missing" null --size 64M
    expect_error "is not a multiple of 2097152 \(the huge page size there\)" --shmem "$huge/odd,size=3M" null --size 64M
    expect_error "--shmem: unknown option \"rw\"" --shmem "$shm/b,rw" null --size 64M
    local mode modes
    # The CI run: auto-reg here (the mode that skips the most for shared requests) and
    # copy in the recovery round; --full: every mode, ext4 and 4 rounds.
    modes=$(available_modes)
    [[ -n ${UBD_E2E_FULL:-} ]] || modes=$(grep -x auto-reg <<<"$modes" || echo copy)
    for mode in $modes; do
        start_dev --queues 2 --depth 32 --buffer-mode "$mode" --shmem "$huge/buf,size=32M" loop /dev/ram0
        grep -q "shared memory $huge/buf (32.0 MiB, hugetlbfs): registered as buffer 0" "$LOG" ||
            { cat "$LOG" >&2; fail "no shared memory in the startup lines"; }
        # One fio run, two jobs: one from the shared file, one from its own memory (the
        # options before the first --name are global).
        fio --filename="$DEV" --ioengine=io_uring --direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 \
            --randrepeat=0 --rw=randwrite --bsrange=4k-128k --iodepth=16 --size=12M --output-format=terse \
            --name=shared --iomem=mmaphuge:"$huge/buf" --offset=0 \
            --name=private --iomem=malloc --offset=64M >"$WORK/fio.out" 2>&1 ||
            { cat "$WORK/fio.out" >&2; fail "fio from shared and private memory"; }
        shmem_both_paths "${DEV#/dev/ublkb}"
        # The data is in the backing too (once: the other modes are checked by fio).
        if [[ $mode == "${modes%%$'\n'*}" ]]; then check_roundtrip /dev/ram0; else stop_dev; fi
        grep -qE "shared memory: [1-9][0-9]* of [0-9]+ reads and writes served from it" "$LOG" ||
            fail "no shared-memory count in the stop summary"
        log "buffer mode $mode + hugetlbfs shared memory: both fio jobs verified"
    done
    # tmpfs, read-only registration (a write-sealed memfd's case): writes from it are
    # served from it, reads (which the kernel never matches to it) are copied.
    truncate -s 16M "$shm/buf"
    start_dev --queues 1 --depth 32 --shmem "$shm/buf,ro" loop /dev/ram0
    grep -q "tmpfs, read-only: writes only" "$LOG" || { cat "$LOG" >&2; fail "not read-only"; }
    fio_verify --rw=randwrite --bs=64k --iodepth=8 --size=8M --iomem=mmapshared:"$shm/buf"
    shmem_both_paths "${DEV#/dev/ublkb}"
    stop_dev
    expect_error "read-only shared memory cannot be" --shmem "$shm/buf,ro" sockram --size 16M
    # The README's client examples, Python and C: O_DIRECT IO from the mapped file.
    start_dev --queues 1 --depth 16 --shmem "$shm/ex,size=4M" loop /dev/ram0
    python3 "$HERE/../../examples/shmem/shmem_io.py" "$shm/ex" "$DEV" 4194304 >"$WORK/ex.out" ||
        { cat "$WORK/ex.out" >&2; fail "shmem_io.py"; }
    # Built with the binaries by tests/build-e2e.sh (next to UBD_BIN); else built here.
    local example=${UBD%/*}/shmem_io
    if [[ ! -x $example ]]; then
        example=$WORK/shmem_io
        gcc -O2 -o "$example" "$HERE/../../examples/shmem/shmem_io.c"
    fi
    "$example" "$shm/ex" "$DEV" >>"$WORK/ex.out" || { cat "$WORK/ex.out" >&2; fail "shmem_io.c"; }
    local shared total
    read -r shared total < <(shmem_stats "${DEV#/dev/ublkb}")
    # Two 1 MiB writes and two reads, in requests of at most 512 KiB, from shared memory
    # (the others: the kernel's partition scan at start).
    ((shared >= 8)) || fail "examples: $shared of $total requests from shared memory, want at least 8"
    stop_dev
    log "examples/shmem (Python, C): data read back equal, $shared of $total requests from shared memory"
    # ext4 on the device, fio O_DIRECT from the shared memory on a file inside it (--full).
    [[ -n ${UBD_E2E_FULL:-} ]] && shmem_ext4
    shmem_run_config
    # kill -9 in the middle of fio from the shared memory, recover: the registration
    # survives the daemon, and the new one serves from the same file.
    REC_FIO_EXTRA=(--iomem=mmaphuge:"$huge/buf")
    REC_CHECK=shmem_recovered
    recover_rounds "$([[ -n ${UBD_E2E_FULL:-} ]] && echo 4 || echo 1)" --shmem "$huge/buf"
}

# shmem_ext4 (in case_shmem: $huge is its hugetlbfs mount): ext4 on a device with the
# shared memory, fio O_DIRECT from it on a file inside, fsck clean through the device
# and in the backing.
shmem_ext4() {
    rm -f "$FS/fs.img"
    truncate -s 128M "$FS/fs.img"
    start_dev --queues 2 --depth 32 --shmem "$huge/buf" loop "$FS/fs.img"
    mkfs.ext4 -q -F "$DEV"
    mkdir -p "$WORK/mnt"
    mount "$DEV" "$WORK/mnt"
    fio --name=fs --directory="$WORK/mnt" --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-64k \
        --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1 --iomem=mmaphuge:"$huge/buf" \
        --output-format=terse >"$WORK/fio.out" 2>&1 || { cat "$WORK/fio.out" >&2; fail "fio on ext4"; }
    umount "$WORK/mnt"
    fsck.ext4 -fn "$DEV" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; fail "fsck"; }
    shmem_both_paths "${DEV#/dev/ublkb}"
    stop_dev
    fsck.ext4 -fn "$FS/fs.img" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; fail "fsck of the backing"; }
    log "ext4: fio verify from shared memory on a file inside it, fsck clean through the device and in the backing"
}

# shmem_run_config (in case_shmem): `run` of a configuration with the key `shmem`: served
# from the shared memory; kill -9 under fio verify from it, and the next `run` (systemd's
# restart) recovers the device with the same file: 0 verify errors.
shmem_run_config() {
    local c=$WORK/shm-run id=45 rc=0
    svc_config "$c" $id /dev/ram0 'queues = 2' 'depth = 32' "shmem = \"$huge/buf,size=32M\""
    start_dev run --config "$c" --id $id
    grep -q "shared memory $huge/buf (32.0 MiB, hugetlbfs): registered as buffer 0" "$LOG" ||
        { cat "$LOG" >&2; fail "run: no shared memory in the startup lines"; }
    local job=(--name=shrun --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
        --iodepth=16 --size=32M --verify=crc32c --verify_fatal=1 --randseed=45 --iomem=mmaphuge:"$huge/buf")
    kill9_under_fio "$WORK/fio-shrun.out" "${job[@]}"
    start_dev run --config "$c" --id $id
    grep -q "recovered device $id" "$LOG" || { cat "$LOG" >&2; fail "the next run did not recover device $id"; }
    wait "$FIO_PID" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-shrun.out" >&2; fail "fio across kill -9 and run exited $rc"; }
    fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 || { cat "$WORK/fio-ver.out" >&2; fail "verify after the run's recovery"; }
    shmem_recovered $id
    stop_dev
    log "run --config with shmem = \"$huge/buf,size=32M\": kill -9 under fio verify from it, the next run recovered with the same file, 0 errors"
}

# After a recovery: the new daemon served requests from the shared memory.
shmem_recovered() {
    local shared total
    read -r shared total < <(shmem_stats "$1")
    ((shared > 0)) || fail "the recovered daemon served nothing from shared memory ($shared of $total)"
    grep -q "shared memory $WORK/huge/buf .*registered as buffer 0" "$LOG" || { cat "$LOG" >&2; fail "recovered without its shared memory"; }
}
