# Helpers for the end-to-end suite (sourced by suite.sh; runs as root inside the VM).

UBD=${UBD_BIN:?UBD_BIN must name the ubd-engine binary}
WORK=${UBD_E2E_WORK:-/tmp/ubd-e2e}
# recover_rounds: extra fio options (a case sets them in its subshell).
REC_FIO_EXTRA=()
START_TIMEOUT=${UBD_START_TIMEOUT:-90}
PASSED=0 FAILED=0 SKIPPED=0 FAILED_NAMES=()

# Each line shows the seconds since its case began (where a case spends CI's time).
log() { printf '    [%3ds] %s\n' $((SECONDS - ${CASE_T0:-0})) "$*"; }
# Fails the current case (cases run in a subshell, so this ends just the case).
fail() { echo "    FAIL: $*" >&2; exit 1; }

# The ublk block devices that exist now.
ublk_devs() { ls /dev/ublkb* 2>/dev/null || true; }

# start_dev OUTVAR ARGS...: starts `ubd-engine ARGS` in the background and waits
# for it to print its device path. Sets DEV, PID, LOG.
start_dev() {
    local out
    out=$(mktemp "$WORK/out.XXXXXX")
    LOG=$(mktemp "$WORK/log.XXXXXX")
    "$UBD" "$@" >"$out" 2>"$LOG" &
    PID=$!
    local deadline=$((SECONDS + START_TIMEOUT))
    DEV=
    while ((SECONDS < deadline)); do
        DEV=$(head -n1 "$out")
        [[ -n $DEV ]] && break
        if ! kill -0 "$PID" 2>/dev/null; then
            cat "$LOG" >&2
            fail "ubd-engine $* exited before starting"
            return 1
        fi
        sleep 0.1
    done
    [[ -b $DEV ]] || { cat "$LOG" >&2; fail "no block device after ${START_TIMEOUT}s (got '$DEV')"; return 1; }
    log "started $DEV (pid $PID): ubd-engine $*"
}

# start_recover ID [OPTIONS...]: runs `ubd-engine [OPTIONS] recover ID` in the background
# and waits for it to print the device path. Sets PID and LOG (fresh files: a background
# job's redirections may happen after this shell goes on).
start_recover() {
    local id=$1 out
    shift
    out=$(mktemp "$WORK/rout.XXXXXX")
    LOG=$(mktemp "$WORK/rlog.XXXXXX")
    "$UBD" "$@" recover "$id" >"$out" 2>"$LOG" &
    PID=$!
    local deadline=$((SECONDS + START_TIMEOUT))
    until [[ -s $out ]]; do
        kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; fail "recover $id exited"; }
        ((SECONDS < deadline)) || fail "recover $id did not come up in ${START_TIMEOUT}s"
        sleep 0.1
    done
    grep -q "recovered device $id" "$LOG" || { cat "$LOG" >&2; fail "recover $id: no recovery reported"; }
}

# stop_dev [SIGNAL]: signals the daemon, waits for it, checks exit 0 and no device left.
stop_dev() {
    local sig=${1:-TERM} rc=0
    kill -"$sig" "$PID"
    # A daemon whose device is still open serves on until it is closed (safe stop): a
    # case that stops a device in use must say so (yank_dev); here that is a failure.
    if ! timeout 60 tail --pid="$PID" -f /dev/null; then
        grep -E "is in use" "$LOG" >&2
        kill -INT "$PID" 2>/dev/null
        wait "$PID" 2>/dev/null
        fail "daemon still running 60 s after SIG$sig"
    fi
    wait "$PID" || rc=$?
    if ((rc != 0)); then
        cat "$LOG" >&2
        fail "daemon exited with $rc after SIG$sig"
        return 1
    fi
    [[ ! -e $DEV ]] || fail "$DEV still exists after the daemon exited"
}

# yank_dev: stops the daemon of $DEV while something has the device open: the first
# SIGTERM makes it wait for the device to be closed (it says who holds it), a second
# signal stops it regardless; its users get errors. The device must be gone after.
yank_dev() {
    local rc=0 deadline=$((SECONDS + 30))
    kill -TERM "$PID"
    until grep -q "is in use" "$LOG" || ! kill -0 "$PID" 2>/dev/null; do
        ((SECONDS < deadline)) || { cat "$LOG" >&2; fail "the daemon neither stopped nor said the device is in use"; }
        sleep 0.1
    done
    kill -INT "$PID" 2>/dev/null || true
    timeout 60 tail --pid="$PID" -f /dev/null || fail "daemon still running 60 s after the second signal"
    wait "$PID" || rc=$?
    ((rc == 0)) || { cat "$LOG" >&2; fail "daemon exited with $rc after SIGTERM + SIGINT"; }
    [[ ! -e $DEV ]] || fail "$DEV still exists after the daemon exited"
}

# Runs fio with crc32c verification; extra args are passed on. Without UBD_E2E_FULL
# (the CI run) a --size of 16M or more is halved: the same pattern of block sizes, depths
# and offsets over fewer bytes (TCG moves a few MB/s; --full moves them all).
fio_verify() {
    if [[ -z ${UBD_E2E_FULL:-} ]]; then
        local a args=()
        for a in "$@"; do
            if [[ $a =~ ^--size=([0-9]+)M$ ]] && ((BASH_REMATCH[1] >= 16)); then
                a="--size=$((BASH_REMATCH[1] / 2))M"
            fi
            args+=("$a")
        done
        set -- "${args[@]}"
    fi
    fio --name=verify --filename="$DEV" --ioengine=io_uring --direct=1 \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
        --group_reporting --output-format=terse --terse-version=3 "$@" >"$WORK/fio.out" 2>&1 ||
        { cat "$WORK/fio.out" >&2; fail "fio $*"; return 1; }
}

# expect_error PATTERN ARGS...: ubd-engine ARGS must fail with exit 1 and print one
# line on stderr that matches PATTERN, and must leave no device.
expect_error() {
    local pattern=$1 rc=0
    shift
    local before
    before=$(ublk_devs)
    "$UBD" "$@" >"$WORK/err.out" 2>"$WORK/err.txt" || rc=$?
    ((rc == 1)) || { cat "$WORK/err.txt" >&2; fail "ubd-engine $* exited $rc, want 1"; return 1; }
    [[ $(wc -l <"$WORK/err.txt") == 1 ]] || { cat "$WORK/err.txt" >&2; fail "want one line of error for: $*"; return 1; }
    grep -qE -- "$pattern" "$WORK/err.txt" || { cat "$WORK/err.txt" >&2; fail "error for '$*' does not match /$pattern/"; return 1; }
    [[ $(ublk_devs) == "$before" ]] || fail "ubd-engine $* left a device behind"
    log "ok: $* -> $(cat "$WORK/err.txt")"
}

# run_case NAME FUNCTION: runs one case in a subshell with errexit; afterwards no
# ublk device may remain (any left is deleted and the case fails).
run_case() {
    local name=$1 fn=$2 rc=0 t0=$SECONDS
    CASE_T0=$SECONDS
    echo "--- case $name"
    # Not `( ... ) || rc=$?`: errexit is ignored inside a subshell on the left of ||.
    (set -eE -o pipefail; trap 'echo "    line $LINENO: $BASH_COMMAND failed" >&2' ERR; "$fn")
    rc=$?
    # Each case's backing images go with it: the shared ext4 holds 256 MiB, and images
    # left from earlier cases filled it (later writes then failed with ENOSPC).
    rm -f "$WORK"/fs/*.img
    # The kernel must not have complained (WARNING, BUG, UBSAN, KASAN, hung task).
    local complaints
    complaints=$(dmesg | grep -E "WARNING:|BUG:|UBSAN:|KASAN:|blocked for more than|Oops" | grep -vxF -f "$WORK/dmesg.seen" 2>/dev/null)
    # Known kernel bug, not ours: kernels up to at least 7.2.13 size a registered request
    # buffer's bvec table by its physical segments and can write one entry past it
    # (fixed upstream: "io_uring/rsrc: ... contiguous bvecs"). Any ublk server using
    # AUTO_BUF_REG or REGISTER_IO_BUF triggers it; reported, not failed.
    local known='UBSAN: array-index-out-of-bounds in .*io_uring/rsrc\.c'
    if grep -qE "$known" <<<"$complaints"; then
        echo "    KNOWN KERNEL BUG: $(grep -E "$known" <<<"$complaints" | head -n1)"
        KNOWN_KERNEL_BUGS=$((${KNOWN_KERNEL_BUGS:-0} + 1))
        dmesg | grep -E "WARNING:|BUG:|UBSAN:|KASAN:|blocked for more than|Oops" >"$WORK/dmesg.seen"
        complaints=$(grep -vE "$known" <<<"$complaints")
    fi
    if [[ -n $complaints ]]; then
        echo "    FAIL: kernel log: $complaints" >&2
        dmesg | grep -E "WARNING:|BUG:|UBSAN:|KASAN:|blocked for more than|Oops" >"$WORK/dmesg.seen"
        rc=1
    fi
    local left
    left=$(ublk_devs)
    if [[ -n $left ]]; then
        echo "    FAIL: devices left behind: $left" >&2
        umount -l "$WORK/mnt" 2>/dev/null
        # Ask the daemons to clean up; kill what is still there after that.
        timeout 60 "$UBD" del --all --force --yank >/dev/null 2>&1 || true
        pkill -KILL -f "$UBD" 2>/dev/null || true
        timeout 60 "$UBD" del --all --yank >/dev/null 2>&1 || true
        rc=1
    fi
    if ((rc == 0)); then
        echo "PASS $name ($((SECONDS - t0)) s)"
        PASSED=$((PASSED + 1))
    elif ((rc == 77)); then
        echo "SKIP $name"
        SKIPPED=$((SKIPPED + 1))
    else
        echo "FAIL $name ($((SECONDS - t0)) s)"
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
    fi
}
