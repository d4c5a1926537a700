#!/usr/bin/env bash
# Where does a ublk server spend its time, per IO? Counts syscalls, context switches,
# io_uring task-work runs, io-wq punts... per IO for each system, and takes a
# system-wide cpu-clock profile. Runs as root where ublk_drv exists (the test VM):
#
#   tests/vm/run.sh --kernel newest --quiet -- perf/profile.sh [options]
#
# options:
#   --systems LIST     comma list of: engine-auto-reg, engine-zero-copy, engine-copy,
#                      engine-null, rublk-z, rublk, rublk-null, kloop, and over an
#                      engine-shmem-zc (--shmem on a hugetlbfs file, fio's buffers in
#                      it: UBLK_F_SHMEM_ZC, 7.1+), and over an
#                      nbdkit file server on a tmpfs image: engine-nbd-unix,
#                      engine-nbd-tcp, knbd-unix, knbd-tcp (nbd-client, 2 connections)
#                      (default engine-auto-reg,rublk-z,kloop); NAME+fifo runs the
#                      server's threads SCHED_FIFO 1
#   --workloads LIST   job names from perf/jobs (default randread-4k-qd64-2j,randrw-16k-70-30-qd32)
#   --runtime SEC      fio seconds per measurement (default 4)
#   --queues N         queues of the ublk servers (default 2)
#   --iomem SPEC       fio's buffers for every system (default malloc; engine-shmem-zc
#                      always uses its hugetlbfs file), e.g. mmaphuge:/path
#   --engine PATH      ubd-engine (default target/release/ubd-engine)
#   --engine-b PATH    a second ubd-engine, run as systems named engineb-MODE (A/B tests)
#   --engine-args STR  extra engine options before the target (e.g. "--recovery off")
#   --out DIR          results (default $UBD_VM_SHARED/profile-TIME, else /tmp/profile-TIME)
#   --no-record        skip perf record (counts only)
#
# Per system and workload it writes counts.txt (perf stat, system-wide and for the
# server process), ctxsw.txt (the server threads' context switches), fio.json,
# report-sym.txt / report-comm.txt (perf report of a second run) and one summary
# line per cell in summary.tsv: IOs and, per IO, io_uring_enter calls (all
# processes, and the server alone), context switches (system, server), task-work
# runs, io-wq punts, and the server's voluntary/involuntary switches.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PERF=${PERF:-/usr/bin/perf}
systems=engine-auto-reg,rublk-z,kloop
workloads=randread-4k-qd64-2j,randrw-16k-70-30-qd32
runtime=4 record=1 engine_args="" queues=2 iomem=malloc
engine=$ROOT/target/release/ubd-engine
engine_b=""
rublk=${UBD_RUBLK:-}
out=""
while (($#)); do
    case $1 in
    --systems) systems=$2; shift 2 ;;
    --workloads) workloads=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --queues) queues=$2; shift 2 ;;
    --iomem) iomem=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    --engine-b) engine_b=$2; shift 2 ;;
    --engine-args) engine_args=$2; shift 2 ;;
    --rublk) rublk=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --no-record) record=0; shift ;;
    *) echo "profile.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ -z $rublk ]]; then
    for r in "$UBD_VM_SHARED/perf/peers/rublk" /var/cache/ubd-engine/peers/bin/rublk "$(command -v rublk || true)"; do
        [[ -n $r && -x $r ]] && { rublk=$r; break; }
    done
fi
[[ -n $out ]] || out=${UBD_VM_SHARED:-/tmp}/profile-$(date +%H%M%S)
mkdir -p "$out"
echo "profile.sh: kernel $(uname -r), output in $out" >&2

modprobe ublk_drv
modprobe loop 2>/dev/null || true
if [[ ! -e /dev/ram0 ]]; then
    modprobe brd rd_nr=1 rd_size=$((512 * 1024))
    dd if=/dev/zero of=/dev/ram0 bs=1M count=512 oflag=direct status=none
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
{
    echo "kernel $(uname -r)"
    echo "cmdline $(cat /proc/cmdline)"
    echo "clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    echo "preempt $(cat /sys/kernel/debug/sched/preempt 2>/dev/null || echo '?')"
    grep -H . /sys/devices/system/cpu/vulnerabilities/* 2>/dev/null | sed 's#.*/##'
    grep -E 'PREEMPT|HZ=|RETPOLINE|MITIGATION' "/boot/config-$(uname -r)" 2>/dev/null || true
} >"$out/system.txt"
echo -1 >/proc/sys/kernel/perf_event_paranoid
echo 0 >/proc/sys/kernel/kptr_restrict

EVENTS=syscalls:sys_enter_io_uring_enter,context-switches,cpu-migrations
EVENTS+=,io_uring:io_uring_submit_req,io_uring:io_uring_complete
EVENTS+=,io_uring:io_uring_task_work_run,io_uring:io_uring_local_work_run
EVENTS+=,io_uring:io_uring_queue_async_work,io_uring:io_uring_poll_arm,io_uring:io_uring_cqring_wait
EVENTS+=,sched:sched_wakeup,irq:softirq_entry,timer:hrtimer_start,syscalls:sys_enter_clock_gettime,irq_vectors:call_function_single_entry,irq_vectors:reschedule_entry
# Keep only events this kernel has.
ev_ok=()
IFS=, read -ra ev_all <<<"$EVENTS"
for e in "${ev_all[@]}"; do
    if [[ $e != *:* ]] || [[ -d /sys/kernel/tracing/events/${e/://} ]]; then ev_ok+=("$e"); fi
done
EVENTS=$(IFS=,; echo "${ev_ok[*]}")

server_pid="" dev="" eng_pid="" nbdkit_pid=""
NBD_SOCK=/tmp/profile-nbdkit.sock NBD_PORT=10898
# nbdkit's file plugin on a 512 MiB tmpfs image, on a Unix socket or 127.0.0.1.
start_nbdkit() {
    [[ -f /dev/shm/profile-nbd.img ]] || fallocate -l 512M /dev/shm/profile-nbd.img
    rm -f "$NBD_SOCK"
    local listen=(-U "$NBD_SOCK")
    [[ $1 == tcp ]] && listen=(-i 127.0.0.1 -p "$NBD_PORT")
    nbdkit -f "${listen[@]}" file /dev/shm/profile-nbd.img 2>"$out/nbdkit.log" &
    nbdkit_pid=$!
    for _ in $(seq 100); do
        if [[ $1 == tcp ]]; then (exec 3<>"/dev/tcp/127.0.0.1/$NBD_PORT") 2>/dev/null && return 0; else [[ -S $NBD_SOCK ]] && return 0; fi
        sleep 0.1
    done
    echo "profile.sh: nbdkit does not listen" >&2
    exit 1
}
# engine_started PID: the engine started in the background; waits for its device.
engine_started() {
    eng_pid=$1
    for _ in $(seq 100); do
        dev=$(head -n1 "$out/engine.stdout" 2>/dev/null || true)
        [[ -n $dev && -b $dev ]] && break
        sleep 0.1
    done
    server_pid=$eng_pid
}
# The hugetlbfs file engine-shmem-zc registers and fio's buffers live in (32 MiB).
shmem_file() {
    local dir=/tmp/profile-huge
    if ! grep -q " $dir hugetlbfs " /proc/mounts; then
        echo $(($(cat /proc/sys/vm/nr_hugepages) + 16)) >/proc/sys/vm/nr_hugepages
        mkdir -p "$dir"
        mount -t hugetlbfs none "$dir"
    fi
    echo "$dir/buf"
}
start() {
    sys_iomem=$iomem
    local fifo=0
    if [[ $1 == *+fifo ]]; then
        fifo=1
        set -- "${1%+fifo}"
    fi
    case $1 in
    engine-nbd-*)
        local t=${1#engine-nbd-}
        start_nbdkit "$t"
        local uri="nbd+unix:///?socket=$NBD_SOCK"
        [[ $t == tcp ]] && uri="nbd://127.0.0.1:$NBD_PORT"
        # shellcheck disable=SC2086
        "$engine" --queues 2 --depth 64 $engine_args nbd "$uri" >"$out/engine.stdout" 2>"$out/$1.log" &
        engine_started $!
        ;;
    knbd-*)
        local t=${1#knbd-}
        start_nbdkit "$t"
        modprobe nbd nbds_max=4
        dev=/dev/nbd0
        if [[ $t == tcp ]]; then
            nbd-client 127.0.0.1 "$NBD_PORT" "$dev" -N "" -connections 2 -block-size 512 >/dev/null
        else
            nbd-client -unix "$NBD_SOCK" "$dev" -N "" -connections 2 -block-size 512 >/dev/null
        fi
        for _ in $(seq 100); do (($(blockdev --getsize64 "$dev" 2>/dev/null || echo 0) > 0)) && break; sleep 0.1; done
        server_pid=""
        ;;
    engine-* | engineb-*)
        local mode=${1#engine-} bin=$engine
        if [[ $1 == engineb-* ]]; then
            mode=${1#engineb-} bin=$engine_b
        fi
        local tgt=(loop /dev/ram0) shm=()
        if [[ $mode == null ]]; then
            tgt=(null --size 512M)
            mode=auto
        fi
        if [[ $mode == shmem-zc ]]; then
            local f
            f=$(shmem_file)
            shm=(--shmem "$f,size=32M")
            sys_iomem=mmaphuge:$f
            mode=copy
        fi
        # shellcheck disable=SC2086
        "$bin" --queues "$queues" --depth 64 --buffer-mode "$mode" "${shm[@]}" $engine_args "${tgt[@]}" \
            >"$out/engine.stdout" 2>"$out/$1.log" &
        engine_started $!
        ;;
    rublk*)
        local a=(add loop -n 900 -q 2 -d 64 --quiet -f /dev/ram0)
        [[ $1 == rublk-z ]] && a+=(-z)
        [[ $1 == rublk-null ]] && a=(add null -n 900 -q 2 -d 64 --quiet)
        "$rublk" del -n 900 >/dev/null 2>&1 || true
        "$rublk" "${a[@]}"
        dev=/dev/ublkb900
        for _ in $(seq 100); do [[ -b $dev ]] && break; sleep 0.1; done
        server_pid=$("$engine" list --json | /usr/bin/python3 -c 'import json,sys; print([d["pid"] for d in json.load(sys.stdin) if d["dev_id"]==900][0])')
        ;;
    kloop)
        dev=$(losetup --find --show --direct-io=on /dev/ram0)
        server_pid=""
        ;;
    esac
    [[ -b $dev ]] || { echo "profile.sh: $1 gave no device" >&2; exit 1; }
    # NAME+fifo: the server's threads run SCHED_FIFO priority 1 (an experiment).
    if ((fifo)) && [[ -n $server_pid ]]; then chrt -f -a -p 1 "$server_pid" >/dev/null; fi
    if [[ $1 != kloop && $1 != knbd-* ]]; then
        "$engine" list --json >"$out/$1.list.json" 2>/dev/null || true
    fi
}
stop() {
    case ${1%+fifo} in
    engine-nbd-*) kill -TERM "$eng_pid"; wait "$eng_pid" || true; kill "$nbdkit_pid"; wait "$nbdkit_pid" || true ;;
    knbd-*) nbd-client -d /dev/nbd0 >/dev/null; kill "$nbdkit_pid"; wait "$nbdkit_pid" || true ;;
    engine*) kill -TERM "$eng_pid"; wait "$eng_pid" || true ;;
    rublk*) "$rublk" del -n 900 >/dev/null 2>&1 || true ;;
    kloop) losetup -d "$dev" ;;
    esac
}

ctxsw() { # pid -> "voluntary nonvoluntary" summed over its threads
    local v=0 n=0 f
    for f in /proc/"$1"/task/*/status; do
        v=$((v + $(awk '/^voluntary_ctxt_switches/ {print $2}' "$f")))
        n=$((n + $(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$f")))
    done
    echo "$v $n"
}
# count EVENT FILE: the counter value from a perf stat -x, output
count() { awk -F, -v e="$2" '$3 == e { gsub(/ /, "", $1); print ($1 ~ /^[0-9]+$/) ? $1 : 0; exit }' "$1"; }

printf 'system\tworkload\tios\tenter/io\tenter_srv/io\tcs/io\tcs_srv/io\ttw/io\tlocal_tw/io\tiowq/io\tpoll/io\tsrv_vol/io\tsrv_invol/io\tsrv_cpu_us/io\tusr_us/io\tsys_us/io\tidle_us/io\thrtimer_srv/io\tclock_srv/io\twakeups/io\tipi/io\n' >"$out/summary.tsv"
IFS=, read -ra syss <<<"$systems"
IFS=, read -ra wls <<<"$workloads"
for s in "${syss[@]}"; do
    start "$s"
    for w in "${wls[@]}"; do
        d=$out/$s/$w
        mkdir -p "$d"
        job=$ROOT/perf/jobs/$w.fio
        [[ -f $job ]] || job=$ROOT/perf/jobs-nbd/$w.fio
        # Warm up a second, then count over one run.
        export IOMEM=$sys_iomem
        DEV=$dev RUNTIME=1 RAMP=0 fio "$job" --output=/dev/null
        before=(0 0)
        [[ -n $server_pid ]] && read -ra before <<<"$(ctxsw "$server_pid")"
        srv_stat=()
        if [[ -n $server_pid ]]; then
            "$PERF" stat -x, -e "$EVENTS" -e task-clock -p "$server_pid" -o "$d/counts-server.csv" &
            srv_stat=($!)
        fi
        read -ra cpu0 <<<"$(head -n1 /proc/stat)"
        DEV=$dev RUNTIME=$runtime RAMP=0 "$PERF" stat -x, -a -e "$EVENTS" -o "$d/counts-all.csv" -- \
            fio "$job" --output-format=json --output="$d/fio.json"
        read -ra cpu1 <<<"$(head -n1 /proc/stat)"
        # user nice system idle iowait irq softirq: busy jiffies (all CPUs) over the run
        echo "user $((cpu1[1] - cpu0[1])) system $((cpu1[3] - cpu0[3])) idle $((cpu1[4] - cpu0[4])) softirq $((cpu1[7] - cpu0[7])) hz $(getconf CLK_TCK)" >"$d/cpu.txt"
        if [[ -n $server_pid ]]; then
            kill -INT "${srv_stat[0]}"
            wait "${srv_stat[0]}" || true
        fi
        after=(0 0)
        [[ -n $server_pid ]] && read -ra after <<<"$(ctxsw "$server_pid")"
        echo "voluntary $((after[0] - before[0])) nonvoluntary $((after[1] - before[1]))" >"$d/ctxsw.txt"
        ios=$(/usr/bin/python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"]; print(sum(x["read"]["total_ios"]+x["write"]["total_ios"] for x in j))' "$d/fio.json")
        srv=$d/counts-server.csv
        [[ -f $srv ]] || : >"$srv"
        /usr/bin/python3 - "$s" "$w" "$ios" "$d/counts-all.csv" "$srv" "$((after[0] - before[0]))" "$((after[1] - before[1]))" "$d/cpu.txt" >>"$out/summary.tsv" <<'EOF'
import sys
s, w, ios, fa, fs, vol, inv, fc = sys.argv[1:]
c = dict(zip(*[iter(open(fc).read().split())] * 2))
hz = float(c["hz"])
ios = int(ios)
def load(f):
    d = {}
    for line in open(f):
        p = line.strip().split(",")
        if len(p) > 3 and not line.startswith("#"):
            try:
                d[p[2]] = float(p[0])
            except ValueError:
                pass
    return d
a, v = load(fa), load(fs)
per = lambda x: f"{x / ios:.2f}" if ios else "-"
row = [s, w, str(ios),
       per(a.get("syscalls:sys_enter_io_uring_enter", 0)),
       per(v.get("syscalls:sys_enter_io_uring_enter", 0)),
       per(a.get("context-switches", 0)), per(v.get("context-switches", 0)),
       per(a.get("io_uring:io_uring_task_work_run", 0)),
       per(a.get("io_uring:io_uring_local_work_run", 0)),
       per(a.get("io_uring:io_uring_queue_async_work", 0)),
       per(a.get("io_uring:io_uring_poll_arm", 0)),
       per(int(vol)), per(int(inv)),
       f"{v.get('task-clock', 0) / ios * 1000:.1f}" if ios else "-",
       # all CPUs' busy time per IO, user and system (µs)
       f"{int(c['user']) / hz / ios * 1e6:.1f}", f"{(int(c['system']) + int(c['softirq'])) / hz / ios * 1e6:.1f}",
       f"{int(c['idle']) / hz / ios * 1e6:.1f}",
       per(v.get("timer:hrtimer_start", 0)), per(v.get("syscalls:sys_enter_clock_gettime", 0)),
       per(a.get("sched:sched_wakeup", 0)),
       per(a.get("irq_vectors:call_function_single_entry", 0) + a.get("irq_vectors:reschedule_entry", 0))]
print("\t".join(row))
EOF
        if ((record)); then
            DEV=$dev RUNTIME=$runtime RAMP=0 "$PERF" record -a -g -e cpu-clock -F 499 -o /tmp/profile-perf.data -- \
                fio "$job" --output=/dev/null 2>"$d/record.err" || echo "profile.sh: perf record failed (see $d/record.err)" >&2
            "$PERF" report -i /tmp/profile-perf.data --no-children --sort sym --percent-limit 0.7 --stdio -g none \
                >"$d/report-sym.txt" 2>/dev/null || true
            "$PERF" report -i /tmp/profile-perf.data --no-children --sort comm,dso --percent-limit 1 --stdio -g none \
                >"$d/report-comm.txt" 2>/dev/null || true
            "$PERF" report -i /tmp/profile-perf.data --no-children --sort comm,sym --percent-limit 0.5 --stdio -g none \
                >"$d/report-comm-sym.txt" 2>/dev/null || true
            if [[ -n $server_pid ]]; then
                "$PERF" report -i /tmp/profile-perf.data --no-children --pid "$server_pid" --sort sym \
                    --percent-limit 0.2 --stdio -g none >"$d/report-server.txt" 2>/dev/null || true
            fi
            rm -f /tmp/profile-perf.data
        fi
    done
    stop "$s"
done
column -t -s $'\t' "$out/summary.tsv"
