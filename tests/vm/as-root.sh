# Sourced by the scripts that need root (packages, /lib/modules, /dev/ublk-control).
# Run as root they go on; otherwise they re-run themselves through sudo when the machine
# has it (keeping PATH, so that cargo and the venv are found), else stop with one line.
if [[ $(id -u) != 0 ]]; then
    if command -v sudo >/dev/null; then
        exec sudo -- env "PATH=$PATH" "$0" "$@"
    fi
    echo "${0##*/}: must run as root (and this machine has no sudo to get there)" >&2
    exit 1
fi
