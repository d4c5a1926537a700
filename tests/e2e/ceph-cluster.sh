#!/usr/bin/env bash
# A throwaway single-node Ceph cluster on 127.0.0.1 for the rbd tests: one ceph-mon and
# one ceph-osd on memstore (data in RAM), auth none, pool size 1, no mgr. All its state
# (configuration, daemons' data, sockets, logs) lives under DIR (a tmpfs in the VM);
# nothing in /etc/ceph or /var/lib/ceph is read or written.
#
#   ceph-cluster.sh start DIR [POOL]   starts it, creates POOL (default rbd); prints the
#                                      configuration's path when the pool takes IO
#   ceph-cluster.sh stop DIR           stops the daemons (SIGTERM, then SIGKILL)
#
# Needs ceph-mon, ceph-osd, monmaptool, rbd (Debian: ceph-mon ceph-osd ceph-common) and
# UBD_CEPH_MON, the path of the suite's ubd-ceph-mon helper (monitor commands without
# the Python CLI, which costs 20-30 s a call under TCG).
set -euo pipefail

cmd=${1:?usage: ceph-cluster.sh start|stop DIR [POOL]}
dir=${2:?usage: ceph-cluster.sh start|stop DIR [POOL]}
pool=${3:-rbd}
conf=$dir/ceph.conf
log() { printf 'ceph-cluster: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

stop() {
    local f pid
    for f in "$dir"/run/*.pid; do
        [[ -e $f ]] || continue
        pid=$(cat "$f")
        kill -CONT "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        local alive=0
        for f in "$dir"/run/*.pid; do
            [[ -e $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.2
    done
    for f in "$dir"/run/*.pid; do
        [[ -e $f ]] && kill -9 "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
}

# mon JSON...: monitor commands through the helper.
mon() { "${UBD_CEPH_MON:?UBD_CEPH_MON: the ubd-ceph-mon helper}" --conf "$conf" --timeout 60 "$@"; }

start() {
    local b
    for b in ceph-mon ceph-osd monmaptool rbd; do
        command -v "$b" >/dev/null || die "$b is missing (Debian: apt-get install ceph-mon ceph-osd ceph-common)"
    done
    mkdir -p "$dir"/{run,log,mon,osd}
    ip link set lo up 2>/dev/null || true
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon warn on insecure global id reclaim allowed = false
mon warn on pool no redundancy = false
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
keyring = $dir/keyring
[client]
admin socket = $dir/run/\$name.\$pid.asok
log file = $dir/log/\$name.\$pid.log
[mon]
mon data = $dir/mon/\$name
[osd]
osd data = $dir/osd/\$name
osd objectstore = memstore
memstore device bytes = ${UBD_CEPH_OSD_BYTES:-2147483648}
osd crush initial weight = 1
osd memory target = 1073741824
EOF
    : >"$dir/keyring"
    monmaptool --create --fsid "$fsid" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mkfs-mon.out" 2>&1 ||
        die "ceph-mon --mkfs failed: $(tail -3 "$dir/log/mkfs-mon.out")"
    ceph-mon -c "$conf" -i a >>"$dir/log/start.out" 2>&1
    local uuid id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(mon "{\"prefix\": \"osd new\", \"uuid\": \"$uuid\"}") || die "osd new failed"
    [[ $id =~ ^[0-9]+$ ]] || die "osd new said: $id"
    mkdir -p "$dir/osd/osd.$id"
    ceph-osd -c "$conf" --mkfs -i "$id" --osd-uuid "$uuid" >"$dir/log/mkfs-osd.out" 2>&1 ||
        die "ceph-osd --mkfs failed: $(tail -3 "$dir/log/mkfs-osd.out")"
    ceph-osd -c "$conf" -i "$id" >>"$dir/log/start.out" 2>&1
    mon "{\"prefix\": \"osd pool create\", \"pool\": \"$pool\", \"pg_num\": 8, \"pgp_num\": 8}" \
        "{\"prefix\": \"osd pool application enable\", \"pool\": \"$pool\", \"app\": \"rbd\"}" >/dev/null ||
        die "creating pool $pool failed"
    # The pool takes IO once its placement groups are active on the OSD: an image's
    # creation waits for that.
    timeout 600 rbd -c "$conf" create --size 4M "$pool/ready-check" || die "the pool does not take IO (see $dir/log)"
    timeout 120 rbd -c "$conf" rm --no-progress "$pool/ready-check" >/dev/null 2>&1 || true
    echo "$conf"
}

case $cmd in
start) start ;;
stop) stop ;;
*) die "unknown command $cmd" ;;
esac
