# The service cases (sourced by suite.sh): configuration files, `run` with systemd's
# notifications and recovery on restart, Prometheus metrics, `upgrade`.

SVC_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# svc_config DIR ID BACKING [KEY = VALUE lines...]: writes DIR/devices.toml with one loop device.
svc_config() {
    local dir=$1 id=$2 backing=$3
    shift 3
    mkdir -p "$dir"
    {
        echo "# written by the e2e suite"
        echo "[device.$id]"
        echo 'target = "loop"'
        echo "path = \"$backing\""
        printf '%s\n' "$@"
    } >"$dir/devices.toml"
}

# notify_listen FILE: a stand-in for systemd's notification socket; sets NOTIFY_SOCKET
# (exported: the daemons started after it inherit it) and NOTIFY_PID.
notify_listen() {
    local out=$1 sock=$WORK/notify.sock
    : >"$out"
    /usr/bin/python3 "$SVC_HERE/notify-listener.py" "$sock" "$out" &
    NOTIFY_PID=$!
    local deadline=$((SECONDS + 20))
    until grep -q LISTENING=1 "$out"; do
        ((SECONDS < deadline)) || fail "notify listener did not start"
        sleep 0.1
    done
    export NOTIFY_SOCKET=$sock
}

# fio_running PID WHAT: the fio job PID must still run at WHAT (else the case did not
# test what it says: the job ended before the event it was to span).
fio_running() {
    kill -0 "$1" 2>/dev/null || fail "the fio job had ended before $2: make it longer"
}

# kill9_under_fio OUT FIO-ARGS...: starts the verified fio job (output in OUT) in the
# background, and once it is under way kills the daemon $PID with -9. Sets FIO_PID.
kill9_under_fio() {
    local out=$1
    shift
    fio "$@" --verify_backlog=128 >"$out" 2>&1 &
    FIO_PID=$!
    sleep 1.5
    fio_running "$FIO_PID" "the kill -9"
    kill -KILL "$PID"
    wait "$PID" 2>/dev/null || true
}

# fio_max_ms JSON: the longest IO (completion latency, reads or writes) of fio's first
# job in its JSON output, in ms: the stall an event under the job caused at most.
fio_max_ms() {
    /usr/bin/python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print("%.0f" % (max(j["write"]["clat_ns"]["max"], j["read"]["clat_ns"]["max"]) / 1e6))' "$1"
}

# wait_gone DEV PID [LOG]: waits (60 s) for the daemon PID (not a child of this shell)
# to exit and its device DEV to go away; on failure shows LOG (the daemon's stderr).
wait_gone() {
    local dev=$1 pid=$2 log=${3:-} deadline=$((SECONDS + 60))
    # An orphan's zombie counts as gone: the VM's init does not reap orphans (systemd does).
    while { kill -0 "$pid" 2>/dev/null && ! grep -q '^State:.*Z' /proc/"$pid"/status 2>/dev/null; } || [[ -e $dev ]]; do
        if ((SECONDS >= deadline)); then
            [[ -z $log ]] || tail -n 30 "$log" >&2
            [[ -e /proc/$pid ]] && ! grep -q '^State:.*Z' /proc/"$pid"/status && fail "process $pid still runs 60 s after SIGTERM: $(tr '\0' ' ' </proc/"$pid"/cmdline), $(grep -E '^(State|SigBlk|SigIgn)' /proc/"$pid"/status | tr '\n' ' ')"
            fail "$dev still there 60 s after process $pid exited: $("$UBD" list)"
        fi
        sleep 0.1
    done
}

# Configuration files: check-config, and every kind of bad file refused in one line
# naming file, line and key, with nothing added.
case_svc_config() {
    local c=$WORK/svc-conf
    rm -rf "$c" && mkdir -p "$c"
    truncate -s 64M "$FS/svc.img"
    svc_config "$c/good" 40 "$FS/svc.img" 'queues = 2' 'depth = 32' 'no-hugepages = true'
    "$UBD" check-config --config "$c/good" >"$WORK/check.out"
    grep -qF -- "device 40 ($c/good/devices.toml:2): --id 40 --depth=32 --no-hugepages --queues=2 loop -- $FS/svc.img" "$WORK/check.out" ||
        { cat "$WORK/check.out" >&2; fail "check-config output"; }
    svc_config "$c/typo" 40 "$FS/svc.img" 'queus = 2'
    expect_error "^error: $c/typo/devices.toml:5: device 40: key .queus.: unknown key" run --config "$c/typo" --id 40
    svc_config "$c/badval" 40 "$FS/svc.img" 'depth = "deep"'
    expect_error "^error: $c/badval/devices.toml:5: device 40: key .depth.: invalid value 'deep'" run --config "$c/badval" --id 40
    svc_config "$c/dup" 40 "$FS/svc.img"
    cp "$c/dup/devices.toml" "$c/dup/more.toml"
    expect_error "^error: $c/dup/more.toml:2: device 40 is defined twice \(first at $c/dup/devices.toml:2\)" run --config "$c/dup" --id 40
    svc_config "$c/missing" 40 "$FS/no-such.img"
    expect_error "^error: $c/missing/devices.toml:4: device 40: key .path.: .*No such file" run --config "$c/missing" --id 40
    expect_error "^error: config $c/good: no device 41 \(it has 40\)" run --config "$c/good" --id 41
    expect_error "^error: run: --queues: a device's options come from its configuration" run --config "$c/good" --id 40 --queues 4
    expect_error "^error: run needs --id N" run --config "$c/good"
    # A metrics address in use: refused before the device is added.
    # The holder binds a free port (0) and says which; nothing else is listening there.
    /usr/bin/python3 -c 'import socket,sys,time; s=socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(120)' >"$WORK/port.txt" &
    local holder=$! port="" deadline=$((SECONDS + 20))
    until [[ -n $port ]]; do
        ((SECONDS < deadline)) || fail "port holder did not start"
        sleep 0.1
        port=$(cat "$WORK/port.txt")
    done
    svc_config "$c/inuse" 40 "$FS/svc.img" "metrics = \"127.0.0.1:$port\""
    expect_error "^error: --metrics 127.0.0.1:$port: cannot listen: .*in use" run --config "$c/inuse" --id 40
    kill "$holder"
    wait "$holder" 2>/dev/null || true
}

# `run` as systemd's ExecStart: READY/STATUS/MAINPID notifications once the device
# exists, metrics scraped and parsed, and after kill -9 under fio verify, the next `run`
# (systemd's restart) recovers the device instead of adding one: 0 verify errors.
case_svc_run() {
    local c=$WORK/svc-run id=41 notes=$WORK/notify.txt
    truncate -s 64M "$FS/svc.img"
    svc_config "$c" $id "$FS/svc.img" 'queues = 2' 'depth = 32' 'metrics = "127.0.0.1:9141"'
    notify_listen "$notes"
    start_dev run --config "$c" --id $id
    [[ $DEV == /dev/ublkb$id ]] || fail "run served $DEV, want /dev/ublkb$id"
    local deadline=$((SECONDS + 10))
    until grep -q '^READY=1' "$notes"; do
        ((SECONDS < deadline)) || { cat "$notes" >&2; fail "no READY=1 from the daemon"; }
        sleep 0.1
    done
    grep -qx "MAINPID=$PID" "$notes" || { cat "$notes" >&2; fail "no MAINPID=$PID"; }
    grep -q "^STATUS=serving /dev/ublkb$id (loop)" "$notes" || { cat "$notes" >&2; fail "no STATUS"; }
    fio_verify --rw=randwrite --bs=4k --size=8M --iodepth=8
    # The stats tick hands the counters to the metrics thread about once a second.
    sleep 2.5
    curl -sf http://127.0.0.1:9141/metrics >"$WORK/metrics.txt" || fail "curl /metrics failed"
    /usr/bin/python3 "$SVC_HERE/check-metrics.py" "$WORK/metrics.txt" $id 2048 2048 >"$WORK/check.txt" ||
        { head -c 3000 "$WORK/metrics.txt" >&2; fail "metrics do not check"; }
    log "$(cat "$WORK/check.txt")"
    grep -q "^STATUS=serving /dev/ublkb$id (loop): [0-9]* IOPS" "$notes" || { cat "$notes" >&2; fail "no STATUS with IOPS"; }
    # Kill -9 under fio verify; the next `run` recovers.
    local job=(--name=svc --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
        --iodepth=16 --size=32M --verify=crc32c --verify_fatal=1 --randseed=41)
    kill9_under_fio "$WORK/fio-svc.out" "${job[@]}"
    local fio_pid=$FIO_PID
    # A configuration that names another backing must not take the device over.
    truncate -s 64M "$FS/other.img"
    svc_config "$c-other" $id "$FS/other.img" 'queues = 2' 'depth = 32'
    expect_error "^error: device $id exists and serves .*svc.img.*; the configuration says .*other.img.*: not the same target" \
        run --config "$c-other" --id $id
    start_dev run --config "$c" --id $id
    grep -q "device $id exists (from process .*): recovering it" "$LOG" || { cat "$LOG" >&2; fail "run did not recover"; }
    grep -q "recovered device $id" "$LOG" || { cat "$LOG" >&2; fail "no recovery reported"; }
    local rc=0
    wait "$fio_pid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-svc.out" >&2; fail "fio across kill -9 and run exited $rc"; }
    fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 || { cat "$WORK/fio-ver.out" >&2; fail "verify after recovery"; }
    grep -qx "MAINPID=$PID" "$notes" || fail "the recovering daemon sent no MAINPID=$PID"
    stop_dev
    grep -q '^STOPPING=1' "$notes" || fail "no STOPPING=1"
    kill "$NOTIFY_PID"
    log "run: READY/STATUS/MAINPID sent, metrics parsed, kill -9 under fio verify recovered by the next run, 0 errors"
}

# upgrade: refused cleanly (old daemon keeps serving) for a binary that is not
# ubd-engine, one that fails before taking over, a device that is not ours; then under
# fio verify the device moves to a new process: 0 verify errors, the longest IO reported.
case_svc_upgrade() {
    local c=$WORK/svc-up id=42
    truncate -s 128M "$FS/up.img"
    svc_config "$c" $id "$FS/up.img" 'queues = 2' 'depth = 32' 'metrics = "127.0.0.1:9142"'
    start_dev run --config "$c" --id $id
    local old=$PID
    expect_error "^error: /bin/false is not a working ubd-engine" upgrade $id --binary /bin/false
    printf '#!/bin/sh\n[ "$1" = --version ] && exec %q --version\nexit 3\n' "$UBD" >"$WORK/fake-ubd"
    chmod +x "$WORK/fake-ubd"
    expect_error "^error: the new daemon \($WORK/fake-ubd\) failed before taking over: it exited; device $id stays with process $old" \
        upgrade $id --binary "$WORK/fake-ubd"
    mv /run/ubd-engine/$id.json "$WORK/state.json"
    expect_error "^error: device $id is not served by ubd-engine \(no state file" upgrade $id
    mv "$WORK/state.json" /run/ubd-engine/$id.json
    kill -0 "$old" || fail "the old daemon died from a refused upgrade"
    dd if="$DEV" of=/dev/null bs=64k count=16 iflag=direct status=none || fail "device does not serve after refused upgrades"
    local job=(--name=up --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
        --iodepth=16 --size=32M --verify=crc32c --verify_fatal=1 --randseed=42)
    fio "${job[@]}" --verify_backlog=128 --output-format=json --output="$WORK/fio-up.json" >"$WORK/fio-up.out" 2>&1 &
    local fio_pid=$!
    sleep 1.5
    local t0=$SECONDS
    fio_running "$fio_pid" "the upgrade"
    "$UBD" upgrade $id >"$WORK/upgrade.out" 2>"$WORK/upgrade.log" || { cat "$WORK/upgrade.log" >&2; fail "upgrade failed"; }
    fio_running "$fio_pid" "the end of the upgrade"
    local took=$((SECONDS - t0)) new
    new=$(sed -n "s/^device $id upgraded: process $old -> \([0-9]*\) .*/\1/p" "$WORK/upgrade.out")
    [[ -n $new ]] || { cat "$WORK/upgrade.out" "$WORK/upgrade.log" >&2; fail "no upgrade line"; }
    wait "$old" 2>/dev/null || true
    kill -0 "$old" 2>/dev/null && fail "old daemon $old still runs"
    "$UBD" list | grep -E "^$id +live .* $new +alive" >/dev/null || fail "device not live with process $new: $("$UBD" list)"
    local rc=0
    wait "$fio_pid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-up.out" "$WORK/fio-up.json" >&2; fail "fio across the upgrade exited $rc"; }
    fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 || { cat "$WORK/fio-ver.out" >&2; fail "verify after upgrade"; }
    local how=kill
    grep -q "handing the device over (QUIESCE_DEV)" "$LOG" && how=quiesce
    if grep -qw QUIESCE <<<"$("$UBD" features)"; then
        [[ $how == quiesce ]] || { cat "$LOG" >&2; fail "the kernel has QUIESCE but the old daemon was not quiesced"; }
        grep -q "handed over to a new daemon" "$LOG" || { cat "$LOG" >&2; fail "old daemon did not report the hand-over"; }
    fi
    local stall
    stall=$(fio_max_ms "$WORK/fio-up.json")
    log "upgrade by $how in ${took}s under fio randwrite verify: 0 errors, longest IO ${stall} ms (p100)"
    echo "$(uname -r) $how $stall" >>"$WORK/upgrade-stalls.txt"
    kill -TERM "$new"
    wait_gone "$DEV" "$new" "$WORK/upgrade.log"
}

# sd_boot: boots systemd (/lib/systemd/systemd, the distribution's) as PID 1 of a PID and
# mount namespace of its own, since the VM's PID 1 is virtme-ng's init: its own /run (a
# tmpfs), the VM's cgroup2 tree, `container=` set so that it acts as in a container,
# and a minimal target (journald only). Sets SD_PID (its PID outside); `sdctl` and
# `sdns` run systemctl and other commands inside.
sd_boot() {
    [[ -x /lib/systemd/systemd ]] || fail "no /lib/systemd/systemd in the VM"
    cat >"$WORK/sd-inner.sh" <<'INNER'
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/systemd/system
cat >/run/systemd/system/ubd-e2e.target <<'T'
[Unit]
Description=ubd-engine e2e: journald and the units the test starts
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service
T
# A booted system has long reached sysinit/basic.target; here, pulling them in would run
# the distribution's boot services in the VM (systemd-tmpfiles --boot empties /tmp, where
# the suite and a CI checkout live). So the unit under test gets DefaultDependencies=no
# (its own After=/Wants= stay), and network-online.target, which it wants, is masked.
mkdir -p /run/systemd/system/ubd-engine@.service.d
printf '[Unit]\nDefaultDependencies=no\n' >/run/systemd/system/ubd-engine@.service.d/e2e.conf
ln -s /dev/null /run/systemd/system/network-online.target
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
exec /lib/systemd/systemd --system --unit=ubd-e2e.target --log-target=kmsg --show-status=false
INNER
    container=ubd-e2e unshare --pid --fork --mount --propagation private --mount-proc \
        bash "$WORK/sd-inner.sh" >"$WORK/sd-boot.out" 2>&1 &
    local deadline=$((SECONDS + 120)) st=""
    SD_PID=""
    until [[ $st == running || $st == degraded ]]; do
        ((SECONDS < deadline)) || { cat "$WORK/sd-boot.out" >&2; fail "systemd did not come up in 120 s (state '$st')"; }
        sleep 1
        [[ -n $SD_PID ]] || SD_PID=$(pgrep -x systemd | head -n1)
        [[ -z $SD_PID ]] || st=$(sdctl is-system-running 2>/dev/null || true)
    done
    log "systemd $(sdns systemctl --version | sed -n '1s/^systemd //p') is PID 1 of its own namespace (state $st)"
}
sdns() { nsenter -t "$SD_PID" -m -p "$@"; }
sdctl() { sdns systemctl --no-pager "$@"; }
sd_main_pid() { sdctl show -p MainPID --value "$1"; }

# The Debian package under systemd: dpkg -i of the package the test command built
# (binary, unit, man pages, completions), then `systemctl start ubd-engine@N`: READY
# once the device exists, STATUS with IOPS; kill -9 of the daemon under fio verify and
# systemd's restart recovers the device (0 errors); `systemctl reload` (upgrade) under
# fio verify; `systemctl stop` deletes it; dpkg -r.
case_svc_systemd() {
    local deb=${UBD_DEB:-} id=44 unit=ubd-engine@44.service
    [[ -f $deb ]] || fail "no Debian package to install (UBD_DEB='$deb': tests/run-all.sh builds it with packaging/build-deb.sh)"
    # The VM's /usr, /etc and /var are overlays on tmpfs: the install goes with the VM.
    # man-db's trigger would index every manual over 9p (minutes under TCG).
    rm -f /var/lib/man-db/auto-update
    dpkg -i "$deb" >"$WORK/dpkg.out" 2>&1 || { cat "$WORK/dpkg.out" >&2; fail "dpkg -i $deb"; }
    /usr/bin/ubd-engine --version | grep -q '^ubd-engine ' || fail "installed binary has no version"
    local f
    for f in /lib/systemd/system/ubd-engine@.service /usr/share/man/man1/ubd-engine.1.gz \
        /usr/share/man/man1/ubd-engine-run.1.gz /usr/share/man/man1/ubd-engine-upgrade.1.gz \
        /usr/share/bash-completion/completions/ubd-engine /usr/share/zsh/vendor-completions/_ubd-engine \
        /usr/share/fish/vendor_completions.d/ubd-engine.fish /usr/share/doc/ubd-engine/examples/devices.toml; do
        [[ -s $f ]] || fail "the package did not install $f"
    done
    grep -q 'ubd\\-engine\\-upgrade' <<<"$(zcat /usr/share/man/man1/ubd-engine.1.gz)" || fail "ubd-engine.1 does not list upgrade"
    # bash completion offers the subcommands.
    local words
    words=$(bash -c 'source /usr/share/bash-completion/completions/ubd-engine; COMP_WORDS=(ubd-engine ""); COMP_CWORD=1; fn=$(complete -p ubd-engine | sed -n "s/.*-F \([^ ]*\).*/\1/p"); "$fn" ubd-engine "" ubd-engine; echo "${COMPREPLY[*]}"')
    [[ " $words " == *" upgrade "* && " $words " == *" check-config "* ]] || fail "bash completion offers: $words"
    /usr/bin/ubd-engine check-config --config /usr/share/doc/ubd-engine/examples/devices.toml >/dev/null 2>"$WORK/ex.err" ||
        grep -q "disk0.img" "$WORK/ex.err" || { cat "$WORK/ex.err" >&2; fail "the example configuration does not check"; }
    log "dpkg -i: binary, unit, man pages, bash/zsh/fish completions, example configuration"

    truncate -s 128M "$FS/sd.img"
    mkdir -p /etc/ubd-engine
    printf '[device.%s]\ntarget = "loop"\npath = "%s"\nqueues = 2\ndepth = 32\nmetrics = "127.0.0.1:9144"\n' \
        $id "$FS/sd.img" >/etc/ubd-engine/devices.toml
    sd_boot
    # Type=notify: start returns once READY came, which the daemon sends once the device exists.
    sdctl start $unit || { sdctl status $unit >&2; sdns journalctl -u $unit --no-pager >&2; fail "systemctl start $unit"; }
    DEV=/dev/ublkb$id
    [[ -b $DEV ]] || fail "systemctl start returned before $DEV existed"
    local main
    main=$(sd_main_pid $unit)
    [[ $main -gt 0 ]] || fail "no main pid"
    fio_verify --rw=randwrite --bs=4k --size=8M --iodepth=8
    sleep 1.5
    sdctl status $unit >"$WORK/status.txt" || true
    grep -q "Status: \"serving /dev/ublkb$id (loop): [0-9]* IOPS" "$WORK/status.txt" || { cat "$WORK/status.txt" >&2; fail "no STATUS with IOPS in systemctl status"; }
    curl -sf http://127.0.0.1:9144/metrics >"$WORK/sd-metrics.txt" || fail "curl /metrics"
    grep -q "^ubd_up{device=\"$id\"} 1" "$WORK/sd-metrics.txt" || fail "metrics: ubd_up"
    # The README's sample: the totals.
    log "metrics sample:"
    grep -E '^(# (HELP|TYPE) )?ubd_(up|device_info|requests_total|bytes_total|errors_total|inflight|request_duration_seconds)' "$WORK/sd-metrics.txt" |
        grep -Ev 'errno="(ENOSPC|ETIMEDOUT|EROFS|EINVAL|EOPNOTSUPP|ENOMEM|EAGAIN|ENODEV|other)"|op="(other|flush|discard|write_zeroes)"' |
        sed 's/^/      /' | head -n 60

    # kill -9 under fio verify: systemd restarts the unit, which recovers the device.
    local job=(--name=sd --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
        --iodepth=16 --size=64M --verify=crc32c --verify_fatal=1 --randseed=44)
    fio "${job[@]}" --verify_backlog=128 >"$WORK/fio-sd.out" 2>&1 &
    local fio_pid=$! rc=0 deadline new
    sleep 1.5
    fio_running "$fio_pid" "the kill -9"
    sdns kill -KILL "$main"
    deadline=$((SECONDS + 120))
    while :; do
        new=$(sd_main_pid $unit)
        [[ $(sdctl is-active $unit) == active && $new -gt 0 && $new != "$main" ]] && break
        ((SECONDS < deadline)) || { sdctl status $unit >&2; fail "systemd did not restart $unit"; }
        sleep 0.5
    done
    wait "$fio_pid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-sd.out" >&2; fail "fio across kill -9 and systemd's restart exited $rc"; }
    fio "${job[@]}" --verify_only >"$WORK/fio-ver.out" 2>&1 || { cat "$WORK/fio-ver.out" >&2; fail "verify after the restart"; }
    sdns journalctl -u $unit --no-pager >"$WORK/journal.txt"
    grep -q "recovered device $id" "$WORK/journal.txt" || { tail -n 30 "$WORK/journal.txt" >&2; fail "the restarted unit did not recover the device"; }
    log "kill -9 of process $main under fio verify: systemd restarted the unit (process $new), which recovered $DEV: 0 errors"

    # systemctl reload = upgrade, under fio verify.
    main=$new
    fio "${job[@]}" --verify_backlog=128 --randseed=45 --output-format=json --output="$WORK/fio-sd.json" >"$WORK/fio-sd.out" 2>&1 &
    fio_pid=$!
    sleep 1.5
    local t_reload t_stop
    t_reload=$(date '+%Y-%m-%d %H:%M:%S')
    fio_running "$fio_pid" "the reload"
    sdctl reload $unit || { sdns journalctl -u $unit --no-pager | tail -n 30 >&2; fail "systemctl reload $unit"; }
    fio_running "$fio_pid" "the end of the reload"
    new=$(sd_main_pid $unit)
    [[ $new -gt 0 && $new != "$main" && $(sdctl is-active $unit) == active ]] ||
        { sdctl status $unit >&2; sdns journalctl -u $unit --no-pager | tail -n 40 >&2; fail "after reload: main pid $new (was $main), $(sdctl is-active $unit)"; }
    rc=0
    wait "$fio_pid" || rc=$?
    ((rc == 0)) || { cat "$WORK/fio-sd.out" "$WORK/fio-sd.json" >&2; fail "fio across systemctl reload exited $rc"; }
    fio "${job[@]}" --randseed=45 --verify_only >"$WORK/fio-ver.out" 2>&1 || { cat "$WORK/fio-ver.out" >&2; fail "verify after reload"; }
    local stall
    stall=$(fio_max_ms "$WORK/fio-sd.json")
    log "systemctl reload under fio verify: process $main -> $new, 0 errors, longest IO ${stall} ms (p100)"

    t_stop=$(date '+%Y-%m-%d %H:%M:%S')
    sdctl stop $unit || fail "systemctl stop"
    [[ ! -e $DEV ]] || fail "$DEV still there after systemctl stop"
    # The daemon that reload started stopped by itself on SIGTERM (systemd supervised it
    # as its child: no "not our child", no SIGKILL). journald may take a moment.
    local deadline=$((SECONDS + 15))
    until grep -q "device $id stopped and deleted" <<<"$(sdns journalctl -u $unit --no-pager)"; do
        ((SECONDS < deadline)) || { sdns journalctl -u $unit --no-pager | tail -n 20 >&2; fail "no stop in the journal"; }
        sleep 1
    done
    sdns journalctl -u $unit --no-pager --since "$t_reload" >"$WORK/journal.txt"
    ! grep -q "not our child" "$WORK/journal.txt" || { tail -n 20 "$WORK/journal.txt" >&2; fail "systemd got a main process that is not its child"; }
    sdns journalctl -u $unit --no-pager --since "$t_stop" >"$WORK/journal.txt"
    ! grep -qE "SIGKILL|code=killed|Failed with result" "$WORK/journal.txt" || { tail -n 20 "$WORK/journal.txt" >&2; fail "the stop after reload was not clean"; }
    kill -KILL "$SD_PID"
    dpkg -r ubd-engine >"$WORK/dpkg.out" 2>&1 || { cat "$WORK/dpkg.out" >&2; fail "dpkg -r"; }
    [[ ! -e /usr/bin/ubd-engine ]] || fail "dpkg -r left /usr/bin/ubd-engine"
    [[ -x $UBD ]] || fail "$UBD is gone after the case (something under systemd removed it)"
    [[ -d $WORK ]] || fail "$WORK is gone after the case"
    log "systemctl stop deleted $DEV; dpkg -r"
}
