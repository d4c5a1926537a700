# The NBD target's end-to-end cases (sourced by suite.sh). The servers run in the VM,
# started and stopped here, on 127.0.0.1 or Unix sockets under $WORK only; their
# images live on the VM's tmpfs ($WORK is in /tmp).

NBD_PORT=${UBD_NBD_PORT:-10809}

# nbdkit_start NAME ARGS...: starts nbdkit in the background (foreground mode, so $!
# is nbdkit), with ARGS (listen options, plugin, filters); waits until it listens.
# Sets NBDKIT_PID. NAME is used for its log.
nbdkit_start() {
    local name=$1 a prev=""
    shift
    # A socket left by an earlier server would look like this one listening.
    for a in "$@"; do
        [[ $prev == -U ]] && rm -f "$a"
        prev=$a
    done
    nbdkit -f -v "$@" >"$WORK/nbdkit-$name.log" 2>&1 &
    NBDKIT_PID=$!
    wait_listening "nbdkit $name" "$NBDKIT_PID" "$@"
}

# wait_listening WHAT PID ARGS...: waits until the server's socket (-U PATH, --socket
# PATH, or the TCP port -p PORT on 127.0.0.1) accepts connections.
wait_listening() {
    local what=$1 pid=$2 sock="" port=""
    shift 2
    while (($#)); do
        case $1 in
        -U | -k | --socket) sock=$2; shift ;;
        -p | --port) port=$2; shift ;;
        esac
        shift
    done
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        kill -0 "$pid" 2>/dev/null || fail "$what exited at start: $(tail -n 5 "$WORK"/nbdkit-*.log "$WORK"/qemu-nbd.log 2>/dev/null)"
        if [[ -n $sock ]]; then
            [[ -S $sock ]] && return 0
        elif [[ -n $port ]]; then
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        else
            fail "wait_listening: no socket or port in: $*"
        fi
        sleep 0.1
    done
    fail "$what does not listen after 60 s"
}

# server_stop PID: stops a server and waits for it.
server_stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# The device's largest request, in KiB (the kernel's max_sectors_kb).
max_kb() { cat "/sys/block/${DEV#/dev/}/queue/max_sectors_kb"; }

# nbdkit's memory plugin over a Unix socket: fio verify in the buffer modes a socket
# target takes (copy; auto picks copy), requests past nbd.ko's 64 KiB, structured
# replies, FLUSH/TRIM/WRITE_ZEROES reaching the server, zero-copy modes refused.
case_nbd_nbdkit() {
    local sock=$WORK/nbdkit.sock
    nbdkit_start mem -U "$sock" memory 256M
    local uri="nbd+unix:///?socket=$sock"
    start_dev --queues 2 --depth 32 nbd "$uri"
    grep -q "buffer mode copy (auto: the nbd target moves request data through memory of its own (a socket, a library); copying)" "$LOG" ||
        fail "buffer mode: $(grep "buffer mode" "$LOG")"
    grep -qE '"structured_replies": *true' <("$UBD" list --json) || fail "no structured replies: $("$UBD" list --json)"
    (($(max_kb) > 64)) || fail "max request $(max_kb) KiB: not past nbd.ko's 64 KiB"
    # Network devices skip the partition scan at start where the kernel can.
    if "$UBD" features --json | grep -q '"NO_AUTO_PART_SCAN"'; then
        grep -q '"NO_AUTO_PART_SCAN"' <<<"$("$UBD" list --json)" || fail "the device was made without NO_AUTO_PART_SCAN"
    fi
    fio_verify --rw=randwrite --bs=4k --iodepth=1 --size=4M
    fio_verify --rw=randwrite --bsrange=512-128k --iodepth=32 --numjobs=2 --offset_increment=96M --size=32M --fsync=16
    fio_verify --rw=write --bs=512k --iodepth=8 --size=64M
    blkdiscard -o 8M -l 4M "$DEV"
    blkdiscard -z -o 12M -l 1M "$DEV"
    cmp -n 5242880 <(dd if="$DEV" bs=1M skip=8 count=5 iflag=direct status=none) /dev/zero
    local id=${DEV#/dev/ublkb}
    stop_dev
    grep -qE "flushes [1-9]" "$LOG" || fail "no FLUSH reached the target: $(grep "stopped and deleted" "$LOG")"
    grep -qE "discards [1-9]" "$LOG" || fail "no DISCARD reached the target"
    grep -qE "write-zeroes [1-9]" "$LOG" || fail "no WRITE_ZEROES reached the target"
    log "2 connections, max request $(grep -o 'max IO [^,]*' "$LOG" | head -n1), fio verify 4k qd1 / 512-128k qd32x2 fsync / 512k seq; $(grep "stopped and deleted" "$LOG" | sed 's/.*(SIGTERM received): //')"
    start_dev --queues 1 --buffer-mode copy nbd "$uri"
    fio_verify --rw=randrw --bs=16k --iodepth=16 --size=16M
    stop_dev
    log "buffer mode copy (forced): fio verify 16k randrw"
    if "$UBD" features --json | grep -q '"AUTO_BUF_REG"'; then
        expect_error "buffer mode auto-reg keeps request data in the kernel's pages, which the nbd target cannot reach" \
            --buffer-mode auto-reg nbd "$uri"
    fi
    if "$UBD" features --json | grep -q '"SUPPORT_ZERO_COPY"'; then
        expect_error "buffer mode zero-copy keeps request data in the kernel's pages, which the nbd target cannot reach" \
            --buffer-mode zero-copy nbd "$uri"
    fi
    server_stop "$NBDKIT_PID"
}

# nbdkit's file plugin on a tmpfs image over TCP on 127.0.0.1: bytes written through
# the device are the image's bytes, discard punches the image, ext4 with fsck.
case_nbd_file() {
    local img=$WORK/nbd-file.img
    truncate -s 128M "$img"
    nbdkit_start file -i 127.0.0.1 -p "$NBD_PORT" file "$img"
    start_dev --queues 2 --depth 32 nbd "nbd://127.0.0.1:$NBD_PORT"
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=8 status=none
    dd if="$WORK/pat" of="$DEV" bs=64k seek=5 oflag=direct conv=fsync status=none
    cmp <(dd if="$img" bs=64k skip=5 count=128 status=none) "$WORK/pat" || fail "the image does not hold what was written"
    cmp <(dd if="$DEV" bs=64k skip=5 count=128 iflag=direct status=none) "$WORK/pat"
    local before after
    before=$(du -k "$img" | cut -f1)
    blkdiscard -o 0 -l 8M "$DEV"
    after=$(du -k "$img" | cut -f1)
    ((after <= before - 4096)) || fail "discard did not reach the image: ${before} -> ${after} KiB"
    make_tree
    mkfs.ext4 -q -F "$DEV"
    mkdir -p "$WORK/mnt"
    mount "$DEV" "$WORK/mnt"
    cp -a "$WORK/tree" "$WORK/mnt/tree"
    umount "$WORK/mnt"
    fsck.ext4 -fn "$DEV" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; fail "fsck through the device"; }
    stop_dev
    fsck.ext4 -fn "$img" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out" >&2; fail "fsck of the image"; }
    server_stop "$NBDKIT_PID"
    log "8 MiB equal in the image, discard ${before} -> ${after} KiB, ext4 copy + fsck clean (device and image)"
}

# qemu-nbd serving a qcow2 image over a Unix socket.
case_nbd_qemu() {
    local img=$WORK/q.qcow2 sock=$WORK/qemu-nbd.sock
    qemu-img create -q -f qcow2 "$img" 128M
    rm -f "$sock"
    qemu-nbd -t -k "$sock" -f qcow2 -x disk --cache=writeback --discard=unmap "$img" >"$WORK/qemu-nbd.log" 2>&1 &
    local qpid=$!
    wait_listening qemu-nbd "$qpid" -k "$sock"
    start_dev --queues 1 --depth 32 nbd "nbd+unix:///disk?socket=$sock"
    fio_verify --rw=randwrite --bsrange=4k-256k --iodepth=16 --size=32M
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=4 status=none
    dd if="$WORK/pat" of="$DEV" bs=1M seek=64 oflag=direct conv=fsync status=none
    stop_dev
    server_stop "$qpid"
    qemu-img convert -f qcow2 -O raw "$img" "$WORK/q.raw"
    cmp <(dd if="$WORK/q.raw" bs=1M skip=64 count=4 status=none) "$WORK/pat" || fail "the qcow2 image does not hold what was written"
    log "fio verify 4k-256k qd16, 4 MiB equal in the qcow2 image; $(grep -o 'serving nbd.*' "$LOG" | head -n1 | cut -c1-120)"
}

# A server killed and restarted under load: fio verify sees no error; past the
# reconnect timeout requests fail with EIO, and the device works again once the
# server is back.
case_nbd_restart() {
    local img=$WORK/nbd-r.img
    truncate -s 128M "$img"
    nbdkit_start r1 -i 127.0.0.1 -p "$NBD_PORT" file "$img"
    start_dev --queues 2 --depth 32 nbd --reconnect-timeout 30 "nbd://127.0.0.1:$NBD_PORT"
    fio --name=restart --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
        --numjobs=2 --offset_increment=48M --size=24M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --randrepeat=0 --group_reporting >"$WORK/fio-r.out" 2>&1 &
    local fpid=$!
    local id=${DEV#/dev/ublkb}
    wait_writes "$id" 500
    kill -9 "$NBDKIT_PID"
    wait "$NBDKIT_PID" 2>/dev/null || true
    sleep 2
    nbdkit_start r2 -i 127.0.0.1 -p "$NBD_PORT" file "$img"
    local rc=0
    wait "$fpid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-r.out" >&2; fail "fio across the server restart exited $rc"; }
    grep -q "err= 0" "$WORK/fio-r.out" || { cat "$WORK/fio-r.out" >&2; fail "fio saw errors"; }
    grep -q "connection lost" "$LOG" || fail "the connection was never lost (the kill came too late?)"
    grep -q "reconnected after" "$LOG" || fail "no reconnect: $(grep nbd "$LOG" | tail -n 3)"
    log "fio verify across kill -9 + restart: 0 errors; $(grep -m1 -o 'reconnected after [^;]*' "$LOG")"
    stop_dev
    # Past the reconnect timeout: EIO, the device stays, and recovers with the server.
    start_dev --queues 1 --depth 16 nbd --reconnect-timeout 2 "nbd://127.0.0.1:$NBD_PORT"
    kill -9 "$NBDKIT_PID"
    wait "$NBDKIT_PID" 2>/dev/null || true
    rc=0
    timeout 60 dd if="$DEV" of=/dev/null bs=4k count=1 skip=77 iflag=direct status=none 2>"$WORK/dd.err" || rc=$?
    ((rc == 1)) && grep -q "Input/output error" "$WORK/dd.err" || { cat "$WORK/dd.err" >&2; fail "read with the server gone: rc $rc"; }
    [[ -b $DEV ]] || fail "the device went away"
    nbdkit_start r3 -i 127.0.0.1 -p "$NBD_PORT" file "$img"
    local deadline=$((SECONDS + 30))
    until dd if="$DEV" of=/dev/null bs=4k count=1 skip=78 iflag=direct status=none 2>/dev/null; do
        ((SECONDS < deadline)) || fail "the device did not recover after the server came back"
        sleep 0.5
    done
    fio_verify --rw=randwrite --bs=4k --iodepth=8 --size=4M
    stop_dev
    server_stop "$NBDKIT_PID"
    log "server gone past --reconnect-timeout 2: EIO, device kept; server back: fio verify passes"
}

# Waits until device ID has served N writes.
wait_writes() {
    local id=$1 n=$2 deadline=$((SECONDS + 60))
    until (($("$UBD" stats "$id" --json 2>/dev/null | grep -oE '"writes": *[0-9]+' | head -n1 | grep -oE '[0-9]+$' || echo 0) >= n)); do
        ((SECONDS < deadline)) || fail "fio never got going on device $id"
        sleep 0.2
    done
}

# Server errors (nbdkit's error filter) reach the application as their errno; a server
# that stops answering (delay filter) fails requests after --io-timeout.
case_nbd_errors() {
    local sock=$WORK/nbdkit-e.sock
    nbdkit_start err -U "$sock" --filter=error memory 64M error=ENOSPC error-pwrite-rate=100% error-pwrite-file="$WORK/enospc" \
        error-pread-rate=100% error-pread-file="$WORK/enospc"
    start_dev --queues 1 --depth 16 nbd "nbd+unix:///?socket=$sock"
    dd if=/dev/urandom of="$DEV" bs=64k count=4 oflag=direct status=none
    touch "$WORK/enospc"
    local rc=0
    dd if=/dev/urandom of="$DEV" bs=64k count=1 seek=10 oflag=direct status=none 2>"$WORK/dd.err" || rc=$?
    ((rc == 1)) && grep -q "No space left on device" "$WORK/dd.err" || { cat "$WORK/dd.err" >&2; fail "write with ENOSPC injected: rc $rc"; }
    # A read's error comes in a structured reply's error chunk.
    rc=0
    dd if="$DEV" of=/dev/null bs=64k count=1 skip=2 iflag=direct status=none 2>"$WORK/dd.err" || rc=$?
    ((rc == 1)) && grep -q "No space left on device" "$WORK/dd.err" || { cat "$WORK/dd.err" >&2; fail "read with ENOSPC injected: rc $rc"; }
    rm -f "$WORK/enospc"
    dd if=/dev/zero of="$DEV" bs=64k count=1 seek=10 oflag=direct status=none
    stop_dev
    grep -q "the server failed a request: No space left on device" "$LOG" || fail "the server's error was not logged"
    server_stop "$NBDKIT_PID"
    log "ENOSPC from the server reached dd (a write's simple reply, a read's error chunk); writes work again after"
    # Writes take 120 s: they fail after the IO timeout instead, and reads still work.
    nbdkit_start delay -U "$sock" --filter=delay memory 64M delay-write=120
    start_dev --queues 1 --depth 16 nbd --io-timeout 3 "nbd+unix:///?socket=$sock"
    rc=0
    timeout 90 dd if=/dev/urandom of="$DEV" bs=4k count=1 seek=33 oflag=direct status=none 2>"$WORK/dd.err" || rc=$?
    ((rc == 1)) && grep -q "Input/output error" "$WORK/dd.err" || { cat "$WORK/dd.err" >&2; fail "write to a stalled server: rc $rc"; }
    dd if="$DEV" of=/dev/null bs=4k count=1 skip=40 iflag=direct status=none
    stop_dev
    grep -q "had no reply in 3 s" "$LOG" || fail "no IO timeout logged: $(grep nbd "$LOG" | tail -n 3)"
    server_stop "$NBDKIT_PID"
    log "a stalled server: the write failed with EIO after --io-timeout 3 (no hang), and the connection was re-made for the next read"
}

# kill -9 of ubd-engine, then recover: the state file keeps the URI.
case_nbd_recover() {
    local sock=$WORK/nbdkit-k.sock
    nbdkit_start k -U "$sock" memory 64M
    start_dev --queues 1 --depth 16 nbd "nbd+unix:///?socket=$sock"
    local id=${DEV#/dev/ublkb}
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=4 status=none
    dd if="$WORK/pat" of="$DEV" bs=1M oflag=direct conv=fsync status=none
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    start_recover "$id"
    cmp <(dd if="$DEV" bs=1M count=4 iflag=direct status=none) "$WORK/pat"
    fio_verify --rw=randwrite --bs=4k --iodepth=8 --size=4M
    stop_dev
    server_stop "$NBDKIT_PID"
    log "kill -9, recover $id: data intact, fio verify after"
}

# Bad input: one line naming the URI, exit 1, no device left.
case_nbd_bad_input() {
    expect_error "nbd://127.0.0.1:1: cannot connect to 127.0.0.1:1: Connection refused" nbd nbd://127.0.0.1:1
    expect_error "not an NBD URI: .*needs \?socket=PATH" nbd "nbd+unix:///x"
    expect_error "not an NBD URI" nbd "127.0.0.1:10809"
    touch "$WORK/not-a-socket"
    expect_error "$WORK/not-a-socket is not a socket" nbd "nbd+unix:///?socket=$WORK/not-a-socket"
    expect_error "No such file or directory" nbd "nbd+unix:///?socket=$WORK/missing.sock"
    local sock=$WORK/q-bad.sock
    qemu-img create -q -f raw "$WORK/q-bad.img" 16M
    rm -f "$sock"
    qemu-nbd -t -k "$sock" -f raw -x disk "$WORK/q-bad.img" >"$WORK/qemu-nbd.log" 2>&1 &
    local qpid=$!
    wait_listening qemu-nbd "$qpid" -k "$sock"
    expect_error "has no export \"other\"" nbd "nbd+unix:///other?socket=$sock"
    server_stop "$qpid"
    # A server that accepts and closes during the handshake.
    python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(4)
while True:
    c, _ = s.accept()
    c.send(b"NBDMAGIC")
    c.close()
' "$WORK/closer.sock" &
    local cpid=$!
    wait_listening closer "$cpid" -U "$WORK/closer.sock"
    expect_error "closed the connection during the handshake" nbd "nbd+unix:///?socket=$WORK/closer.sock"
    kill "$cpid"
    wait "$cpid" 2>/dev/null || true
    # Several connections only where the server allows them (NBD_FLAG_CAN_MULTI_CONN).
    rm -f "$WORK/single.sock"
    python3 "$HERE/nbd-bad-server.py" "$WORK/single.sock" $((16 << 20)) good &
    local spid=$!
    wait_listening "single-connection server" "$spid" -U "$WORK/single.sock"
    expect_error "does not allow several connections \(no NBD_FLAG_CAN_MULTI_CONN\): use --connections 1" \
        nbd --connections 2 "nbd+unix:///?socket=$WORK/single.sock"
    expect_error "--connections 2 and --queues 3 differ" --queues 3 nbd --connections 2 "nbd+unix:///?socket=$WORK/single.sock"
    start_dev --queues 2 nbd "nbd+unix:///?socket=$WORK/single.sock"
    grep -q "one queue, one connection" "$LOG" || fail "no note of the single connection: $(cat "$LOG")"
    grep -q "1 queues x depth" "$LOG" || fail "not one queue: $(grep serving "$LOG")"
    stop_dev
    kill "$spid"
    wait "$spid" 2>/dev/null || true
    log "a server without multi-conn: --connections 2 refused; --queues 2 gives one queue"
}

# A server that breaks the protocol (tests/e2e/nbd-bad-server.py): a reply with an
# unknown handle, bytes that are not a reply, a read's data cut short. Each drops the
# connection (never completing a request with the wrong reply), the client
# reconnects and sends the requests again, and the data read back is what was written.
case_nbd_bad_server() {
    local mode want sock=$WORK/bad.sock
    for mode in wrong-handle garbage short; do
        case $mode in
        wrong-handle) want="reply for unknown handle" ;;
        garbage) want="garbled reply: bad reply magic" ;;
        short) want="receiving a read's data: the server closed the connection|the server closed the connection" ;;
        esac
        rm -f "$sock"
        python3 "$HERE/nbd-bad-server.py" "$sock" $((64 << 20)) "$mode" &
        local spid=$!
        wait_listening "bad server" "$spid" -U "$sock"
        start_dev --queues 1 --depth 16 nbd --reconnect-timeout 30 "nbd+unix:///?socket=$sock"
        dd if=/dev/urandom of="$WORK/pat" bs=64k count=32 status=none
        dd if="$WORK/pat" of="$DEV" bs=64k oflag=direct conv=fsync status=none
        cmp <(dd if="$DEV" bs=4k count=512 iflag=direct status=none) "$WORK/pat" || fail "$mode: data read back differs"
        stop_dev
        kill "$spid"
        wait "$spid" 2>/dev/null || true
        grep -qE "connection lost: ($want)" "$LOG" || { cat "$LOG" >&2; fail "$mode: no '$want' in the log"; }
        grep -q "reconnected after" "$LOG" || fail "$mode: no reconnect"
        log "$mode: $(grep -m1 -oE "connection lost: [^;]*" "$LOG"); reconnected, 2 MiB read back equal"
    done
}
