#!/usr/bin/env bash
# Installs what tests/vm/run.sh needs to boot a ublk-capable kernel in QEMU:
#   - Debian packages (qemu, kmod, fio, busybox, ...),
#   - virtme-ng (vng) in a venv at $UBD_CACHE/venv,
#   - two Debian kernels, their .debs kept in $UBD_CACHE/debs and unpacked to
#     /lib/modules/<ver> (real files, vmlinuz included; a symlink into
#     /var/cache would not do: vng hides /var/cache in the guest), depmod run:
#       lts    = newest bookworm 6.12 kernel (it comes via bookworm-security,
#                older builds via bookworm-backports)
#       newest = newest plain -amd64 kernel in sid
#   - $UBD_CACHE/kernels.txt: "<label> <version> <vmlinuz>" per line.
# Idempotent: when everything is present it does no network work.
# The system's apt sources and lists are never changed: all apt work uses
# private state under $UBD_CACHE/apt.
# Environment:
#   UBD_CACHE            cache dir (default /var/cache/ubd-engine)
#   UBD_REFRESH_KERNELS  =1 to look the kernels up again (e.g. sid moved on)
#   UBD_DEBIAN_MIRROR    default http://deb.debian.org
#   UBD_LTS_SERIES       default 6.12
set -euo pipefail

UBD_CACHE=${UBD_CACHE:-/var/cache/ubd-engine}
MIRROR=${UBD_DEBIAN_MIRROR:-http://deb.debian.org}
LTS_SERIES=${UBD_LTS_SERIES:-6.12}
VNG_VERSION=1.42
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
KERNELS_TXT=$UBD_CACHE/kernels.txt
VENV=$UBD_CACHE/venv

# qemu-utils: this machine kind ships qemu-utils 10.x from backports; a
# qemu-system-x86 of another version would make apt remove it (see below).
PKGS=(qemu-system-x86 qemu-utils kmod fio busybox-static xz-utils e2fsprogs binutils file
    util-linux procps python3-venv ca-certificates fonts-dejavu-core
    nbdkit nbd-client python3-prometheus-client curl btrfs-progs
    ceph-mon ceph-osd ceph-common rbd-nbd)

CODENAME=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
CODENAME=${CODENAME:-bookworm}

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
summary=()

# Root: installs packages, writes /lib/modules.
source "$(dirname "${BASH_SOURCE[0]}")/as-root.sh"
[[ -r $KEYRING ]] || die "missing $KEYRING (package debian-archive-keyring)"
mkdir -p "$UBD_CACHE"

# One setup at a time (CI and a developer may race).
exec 9>"$UBD_CACHE/.setup.lock"
flock 9

# --- apt helpers ----------------------------------------------------------------

# aptp NAME apt-get|apt-cache ARGS...: apt with private lists/cache NAME.
# Check-Valid-Until=false: sid's Release file was seen here past its
# Valid-Until (the machine's clock vs. the mirror); signatures still count.
aptp() {
    local d=$UBD_CACHE/apt/$1 tool=$2
    shift 2
    "$tool" -q -o Dir::Etc::sourcelist="$d/sources.list" -o Dir::Etc::sourceparts=- \
        -o Dir::State::Lists="$d/lists" -o Dir::Cache="$d/cache" \
        -o APT::Sandbox::User=root -o Acquire::Check-Valid-Until=false "$@"
}

# apt_init NAME "SUITE PATH" ...: write NAME's sources list and update it.
apt_init() {
    local name=$1 d=$UBD_CACHE/apt/$1 s
    shift
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
    for s in "$@"; do
        # Packages indices only: no Translations, DEP-11, Contents.
        echo "deb [signed-by=$KEYRING target=Packages] $MIRROR/${s#* } ${s%% *} main"
    done >"$d/sources.list"
    aptp "$name" apt-get update >&2
}

# pkg_names NAME REGEX: real (not virtual) package names matching REGEX.
pkg_names() { aptp "$1" apt-cache search --names-only "$2" | cut -d' ' -f1; }

# pkg_version PKG: version if installed, else empty.
pkg_version() {
    { dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null || true; } |
        sed -n 's/^installed //p'
}

# --- 1. Debian packages -----------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
    [[ -n $(pkg_version "$p") ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    apt_init sys "$CODENAME debian" "$CODENAME-updates debian" \
        "$CODENAME-security debian-security" "$CODENAME-backports debian"
    # Keep the qemu packages at one version: if the installed qemu-utils (or
    # qemu-system-x86) came from backports, take the whole qemu set from there.
    qver=$(pkg_version qemu-utils)
    [[ -n $qver ]] || qver=$(pkg_version qemu-system-x86)
    want=("${missing[@]}")
    if [[ $qver == *bpo* && " ${missing[*]} " == *" qemu-"* ]]; then
        want=()
        for p in "${missing[@]}"; do
            [[ $p == qemu-* ]] || want+=("$p")
        done
        for p in qemu-system-x86 qemu-system-common qemu-system-data seabios qemu-utils; do
            want+=("$p/$CODENAME-backports")
        done
    fi
    DEBIAN_FRONTEND=noninteractive aptp sys apt-get install -y \
        --no-install-recommends --no-remove "${want[@]}" >&2
    summary+=("apt installed: ${want[*]}")
fi

# --- 2. virtme-ng in a venv -------------------------------------------------------
if [[ ! -x $VENV/bin/vng || ! -e $VENV/.virtme-ng-$VNG_VERSION ]]; then
    log "creating venv with virtme-ng==$VNG_VERSION"
    rm -rf "$VENV"
    # Debian's python, not whatever pyenv & co put first on PATH.
    py=/usr/bin/python3
    [[ -x $py ]] || py=$(command -v python3)
    "$py" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION" >&2
    touch "$VENV/.virtme-ng-$VNG_VERSION"
    summary+=("venv: virtme-ng $VNG_VERSION at $VENV")
fi

# --- 3. kernels -----------------------------------------------------------------------

# fetch NAME PKG...: download .debs into $UBD_CACHE/debs unless already there.
fetch() {
    local name=$1 p
    shift
    mkdir -p "$UBD_CACHE/debs"
    for p in "$@"; do
        if ! compgen -G "$UBD_CACHE/debs/${p}_*.deb" >/dev/null; then
            log "downloading $p"
            (cd "$UBD_CACHE/debs" && aptp "$name" apt-get download "$p" >&2)
        fi
    done
}

# install_kernel VER PKG...: unpack the PKGs' .debs and move the modules tree
# (with the image as vmlinuz) to /lib/modules/VER, then depmod.
# Prints the vmlinuz path.
install_kernel() {
    local ver=$1 dest=/lib/modules/$1 stage=$UBD_CACHE/stage p deb mods="" d f merge=0
    shift
    if [[ ! -e $dest/.ubd-engine && -d $dest && ! -L $dest ]]; then
        # The machine has this kernel version already (installed the ordinary way, or
        # only its headers). Use what is there, or add ours beside it; never delete it.
        local image="" ublk
        ublk=$(find "$dest/kernel/drivers/block" -maxdepth 1 -name 'ublk_drv.ko*' 2>/dev/null | head -n1)
        for f in "$dest/vmlinuz" "/boot/vmlinuz-$ver"; do
            if [[ -r $f ]]; then
                image=$f
                break
            fi
        done
        if [[ -n $ublk && -n $image && -e $dest/modules.dep ]]; then
            log "using the installed kernel $ver ($image, $ublk)"
            echo "$image"
            return 0
        fi
        if [[ -d $dest/kernel || -e $dest/modules.dep ]]; then
            local lacks="the ublk_drv module"
            [[ -z $ublk ]] || lacks="a readable kernel image (vmlinuz or /boot/vmlinuz-$ver)"
            die "$dest is an installed kernel without $lacks; install the package linux-image-$ver with apt (setup.sh then uses it)"
        fi
        # Only headers (build/source links) or other packages' files: unpack ours into it.
        merge=1
    fi
    if [[ ! -e $dest/.ubd-engine ]]; then
        if [[ -L $dest ]]; then
            rm -f "$dest"
        fi
        rm -rf "$stage"
        mkdir -p "$stage" /lib/modules
        for p in "$@"; do
            for deb in "$UBD_CACHE/debs/${p}"_*.deb; do
                [[ -e $deb ]] || die "missing $p .deb"
                dpkg-deb -x "$deb" "$stage"
            done
        done
        for d in "$stage/usr/lib/modules/$ver" "$stage/lib/modules/$ver"; do
            if [[ -d $d ]]; then
                mods=$d
                break
            fi
        done
        [[ -n $mods ]] || die "no modules tree for $ver in $*"
        # Old-style packages keep the image in /boot; linux-binary-unsigned
        # names it vmlinuz.unsigned.
        if [[ -e $stage/boot/vmlinuz-$ver ]]; then
            mv "$stage/boot/vmlinuz-$ver" "$mods/vmlinuz"
            for f in config System.map; do
                [[ ! -e $stage/boot/$f-$ver ]] || mv "$stage/boot/$f-$ver" "$mods/$f"
            done
        elif [[ ! -e $mods/vmlinuz && -e $mods/vmlinuz.unsigned ]]; then
            mv "$mods/vmlinuz.unsigned" "$mods/vmlinuz"
        fi
        [[ -e $mods/vmlinuz ]] || die "no vmlinuz for $ver in $*"
        if ((merge)); then
            # Beside what is there: only names it does not have, listed in .ubd-engine so
            # that a later clean-up removes ours and nothing else.
            for f in "$mods"/* "$mods"/.[!.]*; do
                [[ -e $f ]] || continue
                [[ -e $dest/${f##*/} || -L $dest/${f##*/} ]] && continue
                mv "$f" "$dest/"
                echo "${f##*/}" >>"$dest/.ubd-engine"
            done
            log "installed kernel $ver beside what $dest had"
        else
            touch "$mods/.ubd-engine"
            mv "$mods" "$dest"
        fi
        rm -rf "$stage"
    fi
    if [[ ! -e $dest/.depmod-done ]]; then
        log "depmod $ver"
        depmod "$ver"
        touch "$dest/.depmod-done"
    fi
    echo "$dest/vmlinuz"
}

# kernels.txt is usable if it has both labels and their kernels are installed.
kernels_ok() {
    [[ -s $KERNELS_TXT ]] || return 1
    local ver vmlinuz n=0
    while read -r _ ver vmlinuz; do
        [[ -e $vmlinuz && -e /lib/modules/$ver/modules.dep ]] || return 1
        [[ ! -e /lib/modules/$ver/.ubd-engine || -e /lib/modules/$ver/.depmod-done ]] || return 1
        n=$((n + 1))
    done <"$KERNELS_TXT"
    ((n == 2))
}

if [[ ${UBD_REFRESH_KERNELS:-0} != 1 ]] && kernels_ok; then
    : # cached, nothing to do
else
    # lts: newest linux-image-6.12.N+debNN-amd64-unsigned in the bookworm suites.
    apt_init lts "bookworm debian" "bookworm-updates debian" \
        "bookworm-security debian-security" "bookworm-backports debian"
    re="^linux-image-${LTS_SERIES//./\\.}\\.[0-9]+\\+deb[0-9.]+-amd64-unsigned\$"
    lts_pkg=$(pkg_names lts "$re" | sort -V | tail -n1)
    [[ -n $lts_pkg ]] || die "no $LTS_SERIES kernel package found in bookworm suites"
    lts_ver=${lts_pkg#linux-image-}
    lts_ver=${lts_ver%-unsigned}
    fetch lts "$lts_pkg"
    lts_vmlinuz=$(install_kernel "$lts_ver" "$lts_pkg")

    # newest: newest plain -amd64 kernel in sid. Newer sid kernels are split
    # into linux-{binary,modules,base}-VER; older ones are linux-image-VER-unsigned.
    apt_init sid "sid debian"
    new_ver=$({
        pkg_names sid '^linux-modules-[0-9][^ ]*-amd64$' | sed 's/^linux-modules-//'
        pkg_names sid '^linux-image-[0-9][^ ]*-amd64-unsigned$' | sed 's/^linux-image-//; s/-unsigned$//'
    } | grep -Ev -- '-(rt|cloud)-amd64$' | sort -Vu | tail -n1)
    [[ -n $new_ver ]] || die "no kernel package found in sid"
    names=$(pkg_names sid "^linux-(binary|binary-unsigned|modules|base|image)-${new_ver//+/\\+}(-unsigned)?\$")
    if grep -qx "linux-modules-$new_ver" <<<"$names"; then
        # The unsigned binary is built with the modules; the signed one can lag.
        bin=linux-binary-unsigned-$new_ver
        grep -qx "$bin" <<<"$names" || bin=linux-binary-$new_ver
        # linux-base has config, System.map, modules.builtin* (depmod needs them).
        new_pkgs=("$bin" "linux-modules-$new_ver" "linux-base-$new_ver")
    else
        new_pkgs=("linux-image-$new_ver-unsigned")
    fi
    for p in "${new_pkgs[@]}"; do
        grep -qx "$p" <<<"$names" || die "sid lacks $p"
    done
    fetch sid "${new_pkgs[@]}"
    new_vmlinuz=$(install_kernel "$new_ver" "${new_pkgs[@]}")

    printf 'lts %s %s\nnewest %s %s\n' "$lts_ver" "$lts_vmlinuz" "$new_ver" "$new_vmlinuz" \
        >"$KERNELS_TXT.tmp"
    mv "$KERNELS_TXT.tmp" "$KERNELS_TXT"
    # Drop kernels and .debs of earlier runs (e.g. an older sid kernel).
    for d in /lib/modules/*/.ubd-engine; do
        d=${d%/.ubd-engine}
        [[ ! -d $d || $d == "/lib/modules/$lts_ver" || $d == "/lib/modules/$new_ver" ]] && continue
        if [[ -s $d/.ubd-engine ]]; then
            # Installed beside another package's files: remove only ours.
            log "removing setup.sh's files from old $d"
            while read -r f; do
                [[ -n $f && $f != */* ]] && rm -rf "${d:?}/$f"
            done <"$d/.ubd-engine"
            rm -f "$d/.ubd-engine" "$d/.depmod-done"
        else
            log "removing old $d"
            rm -rf "$d"
        fi
    done
    for deb in "$UBD_CACHE"/debs/*.deb; do
        [[ ! -e $deb || $deb == *"$lts_ver"* || $deb == *"$new_ver"* ]] ||
            { log "removing old $deb"; rm -f "$deb"; }
    done
    summary+=("kernels: lts from $lts_pkg; newest from ${new_pkgs[*]}")
fi

# --- summary -------------------------------------------------------------------------
((${#summary[@]})) || summary=("nothing to do")
printf 'setup.sh: %s\n' "${summary[@]}"
echo "setup.sh: vng $VNG_VERSION: $VENV/bin/vng"
sed 's/^/setup.sh: kernel /' "$KERNELS_TXT"
