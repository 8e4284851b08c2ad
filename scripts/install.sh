#!/usr/bin/env bash
# Install fer-edge as a service on Raspberry Pi OS Bookworm (64-bit or 32-bit), or any Debian 12 with systemd.
#
#   git clone <fer-edge repository> && cd fer-edge
#   sudo scripts/install.sh --with-mosquitto      # local MQTT broker too
#   sudo fer-edge doctor                          # check camera, model, broker, clock, disk
#
# Steps (each is skipped when already done; running it again is safe and updates the package):
#   1. apt: python3-venv, python3-picamera2 (Raspberry Pi camera stack), optionally mosquitto; on a 32-bit ARM
#      userland (armv7l) also python3-numpy, python3-opencv, python3-cffi: PyPI has no armv7l wheels of them
#   2. venv at PREFIX/venv with --system-site-packages, so Raspberry Pi OS's picamera2/libcamera are visible
#   3. pip install this checkout into the venv, built in a temporary copy (nothing is written into the checkout);
#      with picamera2 present numpy stays at the system's version (picamera2's simplejpeg is built against it)
#   4. fer-edge install-service: /etc/fer-edge/config.toml (only if absent; source.kind from the cameras found:
#      picamera2 when libcamera lists a camera, else opencv when /dev/video0 exists, else the demo clip),
#      the fer-edge system user, fer-edge.service; enable and start it
# Architectures: x86_64 and aarch64 (64-bit Pi OS) use PyPI wheels (ai-edge-litert); armv7l (32-bit Pi OS,
# also on a 64-bit kernel) uses Debian's numpy/OpenCV and PyPI's tflite-runtime; ARMv6 (Pi 1, Zero W) is refused.
# Options:
#   --with-mosquitto   also install and enable the mosquitto broker (and mosquitto-clients)
#   --prefix DIR       install prefix (default /opt/fer-edge)
#   --user NAME        system user of the daemon (default fer-edge)
#   --no-apt           skip apt-get (packages already installed)
#   --no-enable        install everything but do not enable/start the service
#   --offline          pip without a package index (dependencies must already be installed)
#   --root DIR         stage everything below DIR instead of the live system (no apt, no user, no systemctl)
#   --print-requirements  print what pip installs on this architecture, one requirement a line, and exit
set -euo pipefail

PREFIX=/opt/fer-edge
SVC_USER=fer-edge
ROOT=/
WITH_MOSQUITTO=0
APT=1
ENABLE=1
OFFLINE=0
PRINT_REQS=0
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARGS="$*"

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --with-mosquitto) WITH_MOSQUITTO=1 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift ;;
        --user) [ $# -ge 2 ] || die "--user needs a name"; SVC_USER="$2"; shift ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT="$2"; shift ;;
        --no-apt) APT=0 ;;
        --no-enable) ENABLE=0 ;;
        --offline) OFFLINE=1 ;;
        --print-requirements) PRINT_REQS=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path (got $PREFIX)" ;; esac
[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/edge" ] || die "$SRC does not look like a fer-edge checkout"
PY="${PYTHON:-python3}"

# --- 0. architecture: decided by the interpreter, not uname ---------------------------------------------
# A 32-bit Raspberry Pi OS on a 64-bit kernel reports aarch64 in uname -m (and in pip's platform_machine), but
# its python3 is a 32-bit ARM program: wheels and runtimes must be armv7l ones.
if [ -n "${MACHINE_OVERRIDE:-}" ]; then
    MACHINE="$MACHINE_OVERRIDE"
else
    command -v "$PY" >/dev/null 2>&1 || die "python3 is missing: apt-get install python3 (Bookworm's is 3.11)"
    MACHINE="$("$PY" -c 'import platform, struct
m, bits = platform.machine(), struct.calcsize("P") * 8
print("armv7l" if bits == 32 and m in ("aarch64", "armv8l", "arm64") else m)')"
fi
# What pip installs: pyproject's dependencies with platform_machine markers evaluated for $MACHINE (not by pip:
# uname says aarch64 under a 32-bit userland, and pip download for another platform evaluates them for the machine
# it runs on). On armv7l numpy and OpenCV come from Debian (step 1: PyPI has no armv7l wheels of them), the
# runtime is tflite-runtime (ai-edge-litert has no armv7l wheels) and cryptography stays below 46, the last with
# armv7l wheels that accept Debian's cffi 1.15; fer-edge itself is then installed with --no-deps.
requirements() {
    "$PY" -c 'import re, sys, tomllib
machine = sys.argv[2]
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    req, _, marker = (x.strip() for x in dep.partition(";"))
    machines = re.findall(r"platform_machine\s*==\s*.([\w.-]+).", marker)
    if machines and machine not in machines:
        continue
    name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
    if machine == "armv7l" and name in ("numpy", "opencv-python-headless"):
        continue
    if machine == "armv7l" and name == "cryptography":
        req += ",<46" if re.search(r"[<>=!~]", req) else "<46"
    print(req)
if machine == "armv7l":
    print("tflite-runtime>=2.14")' "$SRC/pyproject.toml" "$MACHINE"
}
case "$MACHINE" in
    x86_64|aarch64|armv7l) ;;
    armv6l) die "ARMv6 (Raspberry Pi 1, Zero, Zero W) is not supported: no TFLite runtime is built for it; use a Pi Zero 2 W, 3, 4 or 5" ;;
    *) die "unsupported architecture $MACHINE: fer-edge installs on x86_64, aarch64 (64-bit Pi OS) and armv7l (32-bit Pi OS)" ;;
esac
if [ "$PRINT_REQS" = 1 ]; then
    requirements
    exit 0
fi

LIVE=1
if [ "$(cd "$ROOT" 2>/dev/null && pwd -P)" != "/" ]; then
    [ -d "$ROOT" ] || die "--root $ROOT: not a directory"
    LIVE=0
    APT=0
fi
if [ "$LIVE" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "run it as root: sudo $0 $ARGS"
fi

# --- 1. system packages ------------------------------------------------------------------------
if [ "$APT" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    say "installing system packages (apt-get)"
    apt-get update -qq
    pkgs=(python3-venv)
    # The Raspberry Pi camera stack comes from Raspberry Pi OS's archive; plain Debian has no such package.
    if apt-cache show python3-picamera2 >/dev/null 2>&1; then
        pkgs+=(python3-picamera2)
    else
        say "python3-picamera2 is not available here (not Raspberry Pi OS?): USB/V4L2 cameras still work"
    fi
    if [ "$MACHINE" = armv7l ]; then
        # opencv-data: Debian's cv2 has no cv2.data; its Haar cascades are in /usr/share/opencv4.
        pkgs+=(python3-numpy python3-opencv python3-cffi opencv-data)
        say "32-bit ARM userland: numpy, OpenCV and cffi from Debian (PyPI has no armv7l wheels of them)"
    fi
    if [ "$WITH_MOSQUITTO" = 1 ]; then
        pkgs+=(mosquitto mosquitto-clients)
    fi
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
    if [ "$WITH_MOSQUITTO" = 1 ] && [ -d /run/systemd/system ]; then
        systemctl enable --now mosquitto.service
    fi
fi

# --- 2. virtual environment ----------------------------------------------------------------------
VENV="${ROOT%/}$PREFIX/venv"
if [ -x "$VENV/bin/python" ]; then
    say "using existing venv $VENV"
else
    say "creating venv $VENV (with system site packages, for picamera2)"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || die "fer-edge needs Python >= 3.11 in the venv; Bookworm's python3 is 3.11"
if [ "$MACHINE" = armv7l ]; then
    "$VENV/bin/python" -c 'import numpy, cv2' 2>/dev/null \
        || die "32-bit ARM: numpy and OpenCV come from Debian: apt-get install python3-numpy python3-opencv opencv-data python3-cffi (or run without --no-apt)"
fi

# --- 3. the package --------------------------------------------------------------------------------
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/fer-edge-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
# Build from a copy: pip builds a local directory in place (build/, *.egg-info), and as root those files
# would be root-owned in the user's checkout.
mkdir "$BUILD/src"
if command -v git >/dev/null 2>&1 && git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
        | tar -C "$BUILD/src" -xf -
else
    tar -C "$SRC" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=./runs \
        -cf - . | tar -C "$BUILD/src" -xf -
fi
pip_args=(--disable-pip-version-check --quiet)
if [ "$OFFLINE" = 1 ]; then
    pip_args+=(--no-index --no-build-isolation)
fi
constraints="$BUILD/constraints.txt"
: >"$constraints"
if "$VENV/bin/python" -c 'import picamera2' >/dev/null 2>&1; then
    # picamera2's simplejpeg (like python3-opencv, python3-av) is built against the system's numpy: another numpy
    # in the venv breaks `import picamera2` ("numpy.dtype size changed"). Keep the system's version, whichever it is
    # (1.24 on Bookworm, 2.x on Trixie).
    sysnp="$("$VENV/bin/python" -c 'import sys, importlib.metadata as md
outside = [p for p in sys.path if p and not p.startswith(sys.prefix)]
print(next((d.version for d in md.distributions(name="numpy", path=outside)), ""))')"
    if [ -n "$sysnp" ]; then
        echo "numpy==$sysnp" >>"$constraints"
        # OpenCV wheels from 4.12 on need numpy 2.
        case "$sysnp" in 1.*) echo "opencv-python-headless<4.12" >>"$constraints" ;; esac
        say "picamera2 found: numpy pinned to the system's $sysnp (binary compatibility with the camera stack)"
    fi
fi
pip_args+=(--constraint "$constraints")
was_active=0
if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ] && systemctl is-active --quiet fer-edge.service; then
    was_active=1
fi
target="$BUILD/src"
if [ "$OFFLINE" = 1 ]; then
    # Without an index pip cannot fetch the build backend: build the wheel with an interpreter that has one,
    # the venv's or the caller's (a venv sees the base interpreter's setuptools, which may be too old).
    mkdir "$BUILD/dist"
    for builder in "$VENV/bin/python" "$PY"; do
        if "$builder" -m pip wheel --disable-pip-version-check --quiet --no-index --no-build-isolation --no-deps \
            -w "$BUILD/dist" "$BUILD/src" >"$BUILD/wheel.log" 2>&1; then
            break
        fi
    done
    # A glob, not `ls | head`: under pipefail a failed ls would end the script here without a word.
    wheels=("$BUILD"/dist/fer_edge-*.whl)
    target=""
    [ -e "${wheels[0]}" ] && target="${wheels[0]}"
    [ -n "$target" ] || die "--offline: no build backend to build fer-edge without an index: neither $VENV/bin/python nor $PY can build a wheel (pip install 'setuptools>=70.1' into $PY, or run without --offline); pip said: $(grep -v '^[[:space:]]*$' "$BUILD/wheel.log" | tail -n 1)"
fi
say "installing fer-edge from $SRC into $VENV"
if [ "$MACHINE" = armv7l ]; then
    mapfile -t armv7_reqs < <(requirements)
    "$VENV/bin/pip" install "${pip_args[@]}" "${armv7_reqs[@]}"
    # --no-warn-conflicts: pip would call opencv-python-headless missing; Debian's python3-opencv provides cv2.
    "$VENV/bin/pip" install "${pip_args[@]}" --no-deps --no-warn-conflicts "$target"
else
    "$VENV/bin/pip" install "${pip_args[@]}" "$target"
fi

# --- 4. service --------------------------------------------------------------------------------------
svc_args=(--source "$SRC" --prefix "$PREFIX" --user "$SVC_USER")
[ "$LIVE" = 1 ] || svc_args+=(--root "$ROOT")
[ "$ENABLE" = 1 ] || svc_args+=(--no-enable)
"$VENV/bin/fer-edge" install-service "${svc_args[@]}"

if [ "$LIVE" = 1 ]; then
    # `fer-edge doctor`, `fer-edge snapshot` etc. for the admin, without activating the venv.
    if [ ! -e /usr/local/bin/fer-edge ]; then
        ln -s "$PREFIX/venv/bin/fer-edge" /usr/local/bin/fer-edge
        say "linked /usr/local/bin/fer-edge -> $PREFIX/venv/bin/fer-edge"
    fi
    if [ "$was_active" = 1 ]; then
        systemctl try-restart fer-edge.service
        say "restarted fer-edge.service with the new package"
    fi
    say "done. Check it with: sudo fer-edge doctor; logs: journalctl -u fer-edge -f"
else
    say "done (staged below $ROOT)"
fi
