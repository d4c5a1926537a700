# Unprivileged devices (UBLK_F_UNPRIVILEGED_DEV, Linux 6.5+): sourced by suite.sh.
#
# Two users without capabilities, A (uid 65534) and B (uid 65533), both in a group
# (gid 4242, standing for the "ublk" group of the README) that may open /dev/ublk-control.
# A creates, serves, lists, reads its stats and deletes its own device and runs fio
# verify on it; B's del, recover and stats of A's device fail in one line, and the
# device keeps serving A. What the udev rule does (packaging/udev/70-ubd-engine.rules:
# `ubd-engine udev-owner %k` names the owner, udev chowns the node) is done by a watcher
# here when the VM has no udevd, and said so.

UNPRIV_A=65534 UNPRIV_B=65533 UNPRIV_GROUP=4242

# as_user UID CMD...: runs CMD as UID (group UID, supplementary group UNPRIV_GROUP), with
# no capabilities (setuid from root to a non-zero uid clears them) and its own runtime dir.
as_user() {
    local uid=$1
    shift
    mkdir -p "$WORK/run-$uid"
    chown "$uid:$uid" "$WORK/run-$uid"
    chmod 0700 "$WORK/run-$uid"
    XDG_RUNTIME_DIR=$WORK/run-$uid setpriv --reuid="$uid" --regid="$uid" --groups="$UNPRIV_GROUP" -- "$@"
}

# A wrapper script that runs ubd-engine as UID, for start_dev and expect_error (which run "$UBD").
user_ubd() {
    local uid=$1 w=$WORK/ubd-as-$1
    cat >"$w" <<EOF
#!/bin/bash
export XDG_RUNTIME_DIR=$WORK/run-$uid
exec setpriv --reuid=$uid --regid=$uid --groups=$UNPRIV_GROUP -- $UBD "\$@"
EOF
    chmod 0755 "$w"
    mkdir -p "$WORK/run-$uid"
    chown "$uid:$uid" "$WORK/run-$uid"
    chmod 0700 "$WORK/run-$uid"
    echo "$w"
}

# What the udev rule does, for a VM without udevd: every new ublk node gets the owner
# `ubd-engine udev-owner` prints (nothing for root's devices). Runs until killed.
udev_watcher() {
    set +e
    local n key out
    declare -A seen
    while :; do
        for n in /dev/ublkc[0-9]* /dev/ublkb[0-9]*; do
            [[ -e $n ]] || continue
            key=$n:$(stat -c %i "$n" 2>/dev/null) || continue
            [[ -n ${seen[$key]:-} ]] && continue
            seen[$key]=1
            out=$("$UBD" udev-owner "${n#/dev/}" 2>/dev/null) || continue
            [[ -n $out ]] || continue
            local UBD_OWNER_UID= UBD_OWNER_GID=
            eval "$out"
            chown "$UBD_OWNER_UID:$UBD_OWNER_GID" "$n" 2>/dev/null && chmod 0600 "$n" 2>/dev/null
        done
        sleep 0.05
    done
}

# wait_owner NODE UID: waits (up to 10 s) for udev (or the watcher) to give NODE to UID.
wait_owner() {
    local deadline=$((SECONDS + 10))
    command -v udevadm >/dev/null && udevadm settle -t 5 2>/dev/null
    until [[ $(stat -c %u "$1") == "$2" ]]; do
        ((SECONDS < deadline)) || fail "$1 was not given to uid $2 within 10 s: $(ls -l "$1")"
        sleep 0.05
    done
}

case_unprivileged() {
    local ubd_a ubd_b dir img id out
    UNPRIV_WATCHER=
    if ! "$UBD" features --json | grep -q '"UNPRIVILEGED_DEV"'; then
        ubd_a=$(user_ubd "$UNPRIV_A")
        chmod 0666 /dev/ublk-control
        UBD=$ubd_a expect_error "devices of other users need the ublk feature UNPRIVILEGED_DEV \(Linux 6.5\+\)" null --size 16M
        chmod 0600 /dev/ublk-control
        log "no UNPRIVILEGED_DEV on $(uname -r): refused in one line"
        return 0
    fi
    command -v setpriv >/dev/null || fail "setpriv (util-linux) is missing"
    [[ $(as_user "$UNPRIV_A" grep CapEff /proc/self/status) == *0000000000000000 ]] || fail "user A has capabilities"
    ubd_a=$(user_ubd "$UNPRIV_A")
    ubd_b=$(user_ubd "$UNPRIV_B")
    UNPRIV_MODE=$(stat -c %a /dev/ublk-control) UNPRIV_GID=$(stat -c %g /dev/ublk-control)
    # The case runs in a subshell: whatever ends it puts the control device back.
    trap 'chgrp "$UNPRIV_GID" /dev/ublk-control; chmod "$UNPRIV_MODE" /dev/ublk-control; rm -f /run/udev/rules.d/70-ubd-engine.rules; [[ -z $UNPRIV_WATCHER ]] || kill "$UNPRIV_WATCHER"' EXIT
    # Without access to the control device: refused in one line, naming the way out.
    UBD=$ubd_a expect_error "permission denied opening /dev/ublk-control \(uid $UNPRIV_A\): run as root, or as a member of the group" null --size 16M
    # The README's setup: the group may open the control device.
    chgrp "$UNPRIV_GROUP" /dev/ublk-control
    chmod 0660 /dev/ublk-control
    if pgrep -x systemd-udevd >/dev/null; then
        mkdir -p /run/udev/rules.d
        sed "s|/usr/bin/ubd-engine|$UBD|" "$HERE/../../packaging/udev/70-ubd-engine.rules" |
            grep -v 'KERNEL=="ublk-control"' >/run/udev/rules.d/70-ubd-engine.rules
        udevadm control --reload
        log "udevd runs: the shipped rule installed in /run/udev/rules.d"
    else
        udev_watcher &
        UNPRIV_WATCHER=$!
        log "no udevd in this VM: a watcher runs what the udev rule runs (ubd-engine udev-owner NODE, then chown)"
    fi
    dir=$WORK/user-a
    mkdir -p "$dir"
    chown "$UNPRIV_A:$UNPRIV_A" "$dir"
    img=$dir/disk.img
    as_user "$UNPRIV_A" truncate -s 64M "$img"
    # Refusals first: what an unprivileged device cannot have, each in one line, no device left.
    UBD=$ubd_a expect_error "recovery reissue needs a privileged device" --recovery reissue loop "$img"
    if "$UBD" features --json | grep -q '"AUTO_BUF_REG"'; then
        UBD=$ubd_a expect_error "buffer mode auto-reg is not allowed on an unprivileged device" --buffer-mode auto-reg loop "$img"
    fi
    UBD=$ubd_a start_dev --queues 2 --depth 32 loop "$img"
    id=${DEV#/dev/ublkb}
    grep -q "buffer mode copy (an unprivileged device" "$LOG" || { cat "$LOG" >&2; fail "no copy-mode line for the unprivileged device"; }
    [[ $(stat -c %u "/dev/ublkc$id") == "$UNPRIV_A" ]] || fail "/dev/ublkc$id is not A's: $(ls -l "/dev/ublkc$id")"
    wait_owner "$DEV" "$UNPRIV_A"
    out=$(as_user "$UNPRIV_A" "$UBD" list --json)
    grep -q '"UNPRIVILEGED_DEV"' <<<"$out" || fail "list --json as A does not show UNPRIVILEGED_DEV: $out"
    grep -q "\"owner_uid\": $UNPRIV_A" <<<"$out" || fail "list --json as A does not show owner $UNPRIV_A: $out"
    "$UBD" list | grep -qE "^$id +live" || fail "root's list does not show A's device: $("$UBD" list)"
    # The daemon publishes statistics every second.
    local deadline=$((SECONDS + 10))
    until as_user "$UNPRIV_A" "$UBD" stats "$id" >"$WORK/stats.out" 2>&1 && grep -q "^device $id (loop" "$WORK/stats.out"; do
        ((SECONDS < deadline)) || fail "A cannot read its own stats: $(cat "$WORK/stats.out")"
        sleep 0.2
    done
    # A's IO: fio verify as A, then a pattern read back by root from the backing.
    as_user "$UNPRIV_A" fio --name=unpriv --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
        --iodepth=16 --numjobs=1 --size=32M --io_size=8M --verify=crc32c --verify_fatal=1 --verify_state_save=0 --eta=never --output="$dir/fio.out" ||
        { cat "$dir/fio.out" >&2; fail "fio verify as user A"; }
    dd if=/dev/urandom of="$WORK/pat" bs=1M count=4 status=none
    as_user "$UNPRIV_A" dd if="$WORK/pat" of="$DEV" bs=1M seek=40 oflag=direct conv=fsync status=none
    # B: in the group, so it may open the control device, but the device is not B's.
    UBD=$ubd_b expect_error "of device $id: permission denied: the device belongs to uid $UNPRIV_A" del --force "$id"
    UBD=$ubd_b expect_error "of device $id: permission denied: the device belongs to uid $UNPRIV_A" stats "$id"
    UBD=$ubd_b expect_error "of device $id: permission denied: the device belongs to uid $UNPRIV_A" recover "$id"
    kill -0 "$PID" || fail "A's daemon died after B's attempts"
    cmp <(dd if="$DEV" bs=1M skip=40 count=4 iflag=direct status=none) "$WORK/pat" || fail "A's data changed"
    # A deletes its own device: del --force signals its daemon, which stops and deletes it.
    as_user "$UNPRIV_A" "$UBD" del --force "$id" >/dev/null || fail "A cannot delete its own device"
    wait "$PID" || { cat "$LOG" >&2; fail "A's daemon did not exit 0 after del --force"; }
    [[ ! -e $DEV && ! -e /dev/ublkc$id ]] || fail "A's device still exists after its del"
    cmp <(dd if="$img" bs=1M skip=40 count=4 status=none) "$WORK/pat" || fail "the backing lacks A's data"
    log "user A: created, listed (UNPRIVILEGED_DEV, owner $UNPRIV_A), fio verify, stats, deleted its device; B's del/stats/recover refused, data intact"
    # A daemon killed: no recovery for an unprivileged device; A deletes what is left.
    UBD=$ubd_a start_dev --queues 1 null --size 32M
    id=${DEV#/dev/ublkb}
    kill -9 "$PID"
    wait "$PID" 2>/dev/null || true
    # Without recovery the kernel stops the disk once the daemon is gone (asynchronously).
    local deadline=$((SECONDS + 20))
    while [[ -e $DEV ]]; do
        ((SECONDS < deadline)) || fail "$DEV still exists 20 s after its daemon died"
        sleep 0.1
    done
    UBD=$ubd_a expect_error "device $id was created without recovery: it cannot be recovered" recover "$id"
    as_user "$UNPRIV_A" "$UBD" del "$id" >/dev/null || fail "A cannot delete its dead device"
    [[ ! -e /dev/ublkc$id ]] || fail "/dev/ublkc$id still exists after del"
    log "kill -9 of A's daemon: recover refused (no recovery for unprivileged devices), A's del removed it"
    # Root may command anyone's device: its del --force stops A's daemon, which deletes it.
    UBD=$ubd_a start_dev --queues 1 null --size 32M
    id=${DEV#/dev/ublkb}
    "$UBD" del --force "$id" >/dev/null || fail "root cannot delete A's device"
    wait "$PID" || { cat "$LOG" >&2; fail "A's daemon did not exit 0 after root's del --force"; }
    [[ ! -e /dev/ublkc$id ]] || fail "/dev/ublkc$id still exists after root's del"
    log "root's del --force of A's device: stopped by its daemon, gone"
}
