#!/usr/bin/env bash
# Install and run fer-edge on a Raspberry Pi's own userland, without a Pi: a Debian Bookworm root for the
# Pi's architecture, built with debootstrap from Debian's packages and run under qemu-user-static.
#
#   sudo scripts/pi-userland-check.sh --arch arm64      # 64-bit Raspberry Pi OS userland (Pi 3/4/5, Zero 2 W)
#   sudo scripts/pi-userland-check.sh --arch armhf      # 32-bit Raspberry Pi OS userland (armv7l)
#
# What it does, in the root at DIR (default /var/tmp/fer-pi-ARCH; kept, so a second run skips debootstrap):
#   1. registers qemu-aarch64 / qemu-arm with binfmt_misc (the kernel then runs the root's binaries)
#   2. debootstrap --variant=minbase bookworm (python3 only; install.sh installs the rest with apt)
#   3. copies this checkout's tracked files to DIR/opt/src/fer-edge (git ls-files; the repo is never written)
#   4. downloads, outside the root, the wheels pip would pick on that architecture for Python 3.11
#      (pip inside an emulated root cannot verify TLS here; it installs from them with --no-index)
#   5. inside the root: scripts/install.sh --no-enable, then fer-edge version, fer-edge doctor,
#      fer-edge demo --no-mqtt --max-frames 30 and fer-edge predict on a face image (both model bundles)
# It proves the wheels, glibc, numpy pins, apt packages and the CLI on the target's architecture. It does not
# prove speed (every instruction is emulated: timings mean nothing), the camera stack (plain Debian has no
# python3-picamera2 or libcamera for the Pi) or systemd (nothing is PID 1 in a chroot).
# Slow: 10-30 minutes per architecture on 2 cores, most of it debootstrap and dpkg under emulation.
# The test suite runs it only when asked: FER_PI_USERLAND=1 python3 -m pytest -m pi_userland tests/test_install.py
# Options:
#   --arch arm64|armhf   target architecture (default arm64)
#   --dir DIR            where the root lives (default /var/tmp/fer-pi-ARCH); never inside the checkout
#   --mirror URL         Debian mirror (default http://deb.debian.org/debian)
#   --fresh              delete DIR and start again
set -euo pipefail

ARCH=arm64
DIR=""
MIRROR=http://deb.debian.org/debian
SUITE=bookworm
FRESH=0
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "pi-userland-check: error: $*" >&2; exit 1; }
say() { echo "pi-userland-check[$ARCH]: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --arch) [ $# -ge 2 ] || die "--arch needs arm64 or armhf"; ARCH="$2"; shift ;;
        --dir) [ $# -ge 2 ] || die "--dir needs a directory"; DIR="$2"; shift ;;
        --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; MIRROR="$2"; shift ;;
        --fresh) FRESH=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

case "$ARCH" in
    arm64) QEMU=aarch64; MACHINE=aarch64 ;;
    armhf) QEMU=arm; MACHINE=armv7l ;;
    *) die "--arch $ARCH: use arm64 or armhf" ;;
esac
DIR="${DIR:-/var/tmp/fer-pi-$ARCH}"
case "$(realpath -m "$DIR")/" in "$SRC"/*) die "--dir $DIR is inside the checkout; use /var/tmp" ;; esac
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts): sudo $0 $*"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
[ -e "/usr/lib/binfmt.d/qemu-$QEMU.conf" ] || die "qemu-$QEMU is missing: apt-get install qemu-user-static"

# --- 1. binfmt_misc ------------------------------------------------------------------------------
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$QEMU" ]; then
    /lib/systemd/systemd-binfmt "/usr/lib/binfmt.d/qemu-$QEMU.conf" \
        || die "cannot register qemu-$QEMU with binfmt_misc"
fi

# --- 2. the root -----------------------------------------------------------------------------------
[ "$FRESH" = 0 ] || rm -rf --one-file-system "$DIR"
if [ ! -e "$DIR/.fer-debootstrap-done" ]; then
    say "debootstrap $SUITE $ARCH into $DIR (slow under emulation)"
    rm -rf --one-file-system "$DIR"
    mkdir -p "$DIR"
    debootstrap --arch="$ARCH" --variant=minbase --include=python3,ca-certificates "$SUITE" "$DIR" "$MIRROR"
    touch "$DIR/.fer-debootstrap-done"
fi
[ "$(chroot "$DIR" uname -m)" = "$MACHINE" ] || die "the root does not run as $MACHINE under qemu"

mounted=()
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
# No /sys: it would describe this machine's x86 CPUs, and XNNPACK's CPU detection (inside LiteRT) reading that
# under qemu-aarch64 crashes the interpreter (SIGSEGV in Interpreter()), which a real Pi never sees.
mountpoint -q "$DIR/sys" && umount -l "$DIR/sys"
for m in proc dev; do
    if ! mountpoint -q "$DIR/$m"; then
        case "$m" in
            proc) mount -t proc proc "$DIR/proc" ;;
            dev) mount --bind /dev "$DIR/dev" ;;
        esac
        mounted+=("$DIR/$m")
    fi
done
cp /etc/resolv.conf "$DIR/etc/resolv.conf"
# apt inside the root uses the same mirror debootstrap used.
echo "deb $MIRROR $SUITE main" >"$DIR/etc/apt/sources.list"

# --- 3. the source ---------------------------------------------------------------------------------
say "copying the checkout's tracked files to $DIR/opt/src/fer-edge"
rm -rf "$DIR/opt/src/fer-edge"
mkdir -p "$DIR/opt/src/fer-edge"
(cd "$SRC" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) | tar -C "$DIR/opt/src/fer-edge" -xf -

# --- 4. wheels for the target ------------------------------------------------------------------------
WHEELS="$DIR/var/cache/fer-edge-wheels"
mkdir -p "$WHEELS"
plats=()
for g in 36 35 34 31 28 27 26 17; do plats+=(--platform "manylinux_2_${g}_$MACHINE"); done
plats+=(--platform "manylinux2014_$MACHINE" --platform "linux_$MACHINE")
# What install.sh asks pip for on this architecture (it prints the list), plus the build backend.
reqs_text="$(MACHINE_OVERRIDE="$MACHINE" bash "$SRC/scripts/install.sh" --print-requirements)" \
    || die "scripts/install.sh --print-requirements failed"
mapfile -t reqs <<<"$reqs_text"
# On armv7l numpy and cffi (the runtime's and cryptography's dependencies) come from Debian: no resolving.
nodeps=()
[ "$MACHINE" != armv7l ] || nodeps=(--no-deps)
say "downloading wheels for $MACHINE: ${reqs[*]}"
python3 -m pip download "${nodeps[@]}" --disable-pip-version-check --quiet --dest "$WHEELS" --only-binary=:all: \
    "${plats[@]}" --python-version 3.11 --implementation cp "${reqs[@]}" "setuptools>=68" "wheel"

# --- 5. install and run inside -------------------------------------------------------------------------
say "scripts/install.sh --no-enable inside the root"
run_in() { chroot "$DIR" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 PIP_NO_INDEX=1 PIP_FIND_LINKS=/var/cache/fer-edge-wheels "$@"; }
run_in /opt/src/fer-edge/scripts/install.sh --no-enable
say "fer-edge version"
run_in fer-edge version
say "fer-edge doctor (no broker, no camera here: those checks fail; the model and runtime lines matter)"
run_in fer-edge doctor || true
# Under emulation a frame takes seconds: the clip is read losslessly (realtime = false; paced, it would be sampled
# too sparsely to track a face) and a track may go 60 s without a detection (track.max_missed_s is 1 s, less than
# one emulated frame). The clip's first face (from frame 19) then becomes events, as on a Pi.
demo_args=(--no-mqtt --max-frames 30 --set source.realtime=false --set track.max_missed_s=60)
say "fer-edge demo ${demo_args[*]}"
demo_out="$(run_in fer-edge demo "${demo_args[@]}" 2>&1)" \
    || { echo "$demo_out"; die "fer-edge demo failed"; }
echo "$demo_out"
case "$demo_out" in *"; 0 events produced"*) die "fer-edge demo produced no events" ;; esac
say "fer-edge predict"
# A frame of the bundled clip with a face in it (the clip starts on an empty background).
run_in /opt/fer-edge/venv/bin/python -c 'import sys, cv2, edge.sources as s
cap = cv2.VideoCapture(str(s.DEMO_CLIP)); cap.set(cv2.CAP_PROP_POS_FRAMES, 25); ok, img = cap.read()
sys.exit(0 if ok and cv2.imwrite("/tmp/face.png", img) else "cannot read the demo clip")'
run_in fer-edge predict /tmp/face.png
say "fer-edge predict --set model.variant=small (the bundle for Pi 3 / Zero 2 W)"
run_in fer-edge predict /tmp/face.png --set model.variant=small
say "OK: fer-edge installs and runs on Debian $SUITE $ARCH ($(chroot "$DIR" /opt/fer-edge/venv/bin/python -c \
    'import platform, numpy, cv2; print(platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__, "opencv", cv2.__version__)'))"
