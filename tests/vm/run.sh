#!/usr/bin/env bash
# Runs a command as root inside a QEMU VM (TCG) booted by virtme-ng with one of
# the kernels installed by tests/vm/setup.sh, and exits with its exit status.
#
# usage: tests/vm/run.sh [options] -- COMMAND [ARG...]
#   --kernel lts|newest|VER  kernel from $UBD_CACHE/kernels.txt (default lts)
#   --memory SIZE            guest memory (default 4G)
#   --cpus N                 guest CPUs (default 2)
#   --shared DIR             host dir shared read-write, same path in the guest,
#                            exported there as UBD_VM_SHARED
#                            (default $UBD_VM_SHARED or /tmp/ubd-vm)
#   --rwdir DIR              share another host dir read-write (repeatable)
#   --env NAME[=VALUE]       pass one more variable into the guest (repeatable)
#   --timeout SEC            kill the VM after SEC seconds (default 1500)
#   --quiet                  drop kernel log lines ("[   1.23] ...") from output
#
# The guest sees the host's whole filesystem read-only (9p), same paths, so
# binaries built on the host (e.g. target/...) run there as they are. Writable:
#   - /tmp, /etc, /home, /var, ...: overlays whose writes go to a guest tmpfs
#     and are lost at exit (/tmp shows the host's /tmp as the lower layer).
#     /tmp is kept that way on purpose: fast, private to each VM, no clutter
#     on the host; use it for scratch/backing files (O_DIRECT works there,
#     and on /dev/shm).
#   - the --shared dir and each --rwdir: the host's dirs, read-write (9p); use
#     them for results that must survive the VM.
#   - /var/cache, /var/tmp, /var/log are empty tmpfs in the guest.
# Guest environment: vng passes no host variables, so the command gets PATH,
# every UBD_* variable, RUST_BACKTRACE, RUST_LOG, CI (when set) and --env ones.
# Exit status: the command's; 124 if the VM timed out; 125 if the guest left no
# status (VM crashed, kernel panic, failed boot). vng itself always exits 255.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UBD_CACHE=${UBD_CACHE:-/var/cache/ubd-engine}
KERNELS_TXT=$UBD_CACHE/kernels.txt
VNG=$UBD_CACHE/venv/bin/vng

kernel=lts memory=4G cpus=2 timeout=${UBD_VM_TIMEOUT:-1500} quiet=0
shared=${UBD_VM_SHARED:-/tmp/ubd-vm}
rwdirs=() extra_env=()

usage() {
    sed -n '5,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
die() {
    echo "run.sh: $*" >&2
    exit 2
}

while (($#)); do
    case $1 in
    --kernel) kernel=${2:?}; shift 2 ;;
    --memory) memory=${2:?}; shift 2 ;;
    --cpus) cpus=${2:?}; shift 2 ;;
    --shared) shared=${2:?}; shift 2 ;;
    --rwdir) rwdirs+=("${2:?}"); shift 2 ;;
    --env) extra_env+=("${2:?}"); shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --quiet) quiet=1; shift ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) echo "run.sh: unknown option $1" >&2; usage ;;
    esac
done
(($#)) || usage

# kernel_path: vmlinuz for $kernel (a label or version from kernels.txt, or
# an installed /lib/modules/VER), empty if unknown.
kernel_path() {
    local p=""
    [[ ! -s $KERNELS_TXT ]] ||
        p=$(awk -v k="$kernel" '$1 == k || $2 == k { print $3; exit }' "$KERNELS_TXT")
    [[ -n $p ]] || p=/lib/modules/$kernel/vmlinuz
    [[ -e $p ]] && echo "$p"
}

# Install on first use (setup.sh is a fast no-op otherwise, but skip even that).
vmlinuz=$(kernel_path || true)
if [[ -z $vmlinuz || ! -x $VNG ]]; then
    "$HERE/setup.sh" >&2
    vmlinuz=$(kernel_path || true)
fi
[[ -n $vmlinuz ]] || die "unknown kernel '$kernel'; known: $(awk '{printf "%s=%s ", $1, $2}' "$KERNELS_TXT")"

# One VM at a time: two TCG guests on a small host starve each other (and spoil
# any measurement). UBD_VM_PARALLEL=1 skips the lock.
if [[ ${UBD_VM_PARALLEL:-0} != 1 ]]; then
    exec 8>"$UBD_CACHE/.vm.lock"
    if ! flock -n 8; then
        echo "run.sh: another VM is running; waiting for it" >&2
        flock 8
    fi
fi

# Per-run dir in the shared dir: the guest script and its exit status.
mkdir -p "$shared"
shared=$(cd "$shared" && pwd -P)
run_dir=$(mktemp -d "$shared/.run.XXXXXX")
trap 'rm -rf "$run_dir"' EXIT

# Guest script: environment, cwd, the command, its status to a file.
{
    echo '#!/bin/bash'
    printf 'export PATH=%q\n' "$PATH:/usr/local/sbin:/usr/sbin:/sbin"
    printf 'export UBD_VM_SHARED=%q\n' "$shared"
    for name in $(compgen -e); do
        case $name in
        UBD_* | RUST_BACKTRACE | RUST_LOG | CI) printf 'export %s=%q\n' "$name" "${!name}" ;;
        esac
    done
    for kv in "${extra_env[@]}"; do
        if [[ $kv == *=* ]]; then
            printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
        else
            printf 'export %s=%q\n' "$kv" "${!kv-}"
        fi
    done
    printf 'status_file=%q\n' "$run_dir/status"
    printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
    # A subshell, so that builtins (exit, cd) work too.
    printf '('
    printf ' %q' "$@"
    printf ' )\n'
    cat <<'EOF'
rc=$?
echo "$rc" >"$status_file" && sync
echo "run.sh: guest command exited with status $rc"
EOF
} >"$run_dir/guest.sh"

# -cpu Nehalem (SSE4.2, no AVX) instead of vng's -cpu max: under TCG the guest then ran
# a Python loop 2.1x and 128k sequential IO to brd 1.9x faster (same VM, same kernel:
# glibc and the kernel pick AVX paths on `max`, which TCG emulates slowly); crc32c
# (fio's verify) keeps its SSE4.2 instruction.
vng_args=(-v -r "$vmlinuz" --disable-kvm --force-9p --qemu-opts="-cpu Nehalem" --cpus "$cpus" --memory "$memory"
    --rwdir="$shared")
for d in "${rwdirs[@]}"; do
    vng_args+=(--rwdir="$(cd "$d" && pwd -P)")
done
vng_args+=(--exec "bash $(printf %q "$run_dir/guest.sh")")

# vng finds its helpers (virtme-run) on PATH; the guest got PATH above.
export PATH=$UBD_CACHE/venv/bin:$PATH

# Stream the console: drop the serial console's CRs, maybe kernel lines.
filter=('s/\r$//')
((quiet == 0)) || filter+=('/^\[ *[0-9]\+\.[0-9]\+\] /d' '/^\(Probing EDD\|Memory KASLR\|Poking KASLR\)/d')
start=$SECONDS
exec 3> >(sed -u "$(printf '%s\n' "${filter[@]}")")
sed_pid=$!
# timeout puts vng, virtme-run and qemu in a process group of their own; if
# run.sh itself is interrupted or killed (Ctrl-C, an outer `timeout`), kill
# that group so no VM is left behind.
timeout -k 30 "$timeout" vng "${vng_args[@]}" </dev/null >&3 2>&1 &
vm_pid=$!
interrupted=0
trap 'interrupted=1; kill -TERM -- "-$vm_pid" 2>/dev/null || true' INT TERM HUP
trap 'kill -KILL -- "-$vm_pid" 2>/dev/null || true; rm -rf "$run_dir"' EXIT
vng_rc=0
wait "$vm_pid" || vng_rc=$?
if ((interrupted)); then
    wait "$vm_pid" 2>/dev/null || true
    echo "run.sh: interrupted, VM killed" >&2
    exit 130
fi
exec 3>&-
wait "$sed_pid" 2>/dev/null || true

if [[ -s $run_dir/status ]]; then
    exit "$(cat "$run_dir/status")"
fi
if ((vng_rc == 124 || vng_rc == 137)); then
    echo "run.sh: VM timed out after ${timeout}s" >&2
    exit 124
fi
echo "run.sh: no exit status from the guest after $((SECONDS - start))s (VM crashed or failed to boot; vng exited $vng_rc)" >&2
exit 125
