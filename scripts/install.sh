#!/usr/bin/env bash
# Install fer-edge as a service on Raspberry Pi OS Bookworm (64-bit), or any Debian 12 with systemd.
#
#   git clone <fer-edge repository> && cd fer-edge
#   sudo scripts/install.sh --with-mosquitto      # local MQTT broker too
#   fer-edge doctor                               # check camera, model, broker, clock, disk
#
# Steps (each is skipped when already done; running it again is safe and updates the package):
#   1. apt: python3-venv, python3-picamera2 (Raspberry Pi camera stack), optionally mosquitto
#   2. venv at PREFIX/venv with --system-site-packages, so Raspberry Pi OS's picamera2/libcamera are visible
#   3. pip install this checkout into the venv
#   4. fer-edge install-service: /etc/fer-edge/config.toml (only if absent), the fer-edge system user,
#      fer-edge.service; enable and start it
# Options:
#   --with-mosquitto   also install and enable the mosquitto broker (and mosquitto-clients)
#   --prefix DIR       install prefix (default /opt/fer-edge)
#   --user NAME        system user of the daemon (default fer-edge)
#   --no-apt           skip apt-get (packages already installed)
#   --no-enable        install everything but do not enable/start the service
#   --offline          pip without a package index (dependencies must already be installed)
#   --root DIR         stage everything below DIR instead of the live system (no apt, no user, no systemctl)
set -euo pipefail

PREFIX=/opt/fer-edge
SVC_USER=fer-edge
ROOT=/
WITH_MOSQUITTO=0
APT=1
ENABLE=1
OFFLINE=0
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
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path (got $PREFIX)" ;; esac
[ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/edge" ] || die "$SRC does not look like a fer-edge checkout"
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
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ]; then
    say "using existing venv $VENV"
else
    say "creating venv $VENV (with system site packages, for picamera2)"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || die "fer-edge needs Python >= 3.11 in the venv; Bookworm's python3 is 3.11"

# --- 3. the package --------------------------------------------------------------------------------
pip_args=(--disable-pip-version-check --quiet)
if [ "$OFFLINE" = 1 ]; then
    pip_args+=(--no-index --no-build-isolation)
fi
constraints=""
if "$VENV/bin/python" -c 'import picamera2' >/dev/null 2>&1; then
    # Raspberry Pi OS builds picamera2's simplejpeg against its numpy 1.x; numpy 2 in the venv would break
    # `import picamera2` ("numpy.dtype size changed"), and OpenCV wheels >= 4.12 require numpy 2.
    constraints="$(mktemp)"
    printf 'numpy<2\nopencv-python-headless<4.12\n' >"$constraints"
    pip_args+=(--constraint "$constraints")
    say "picamera2 found: keeping numpy < 2 in the venv (binary compatibility with the system camera stack)"
fi
was_active=0
if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ] && systemctl is-active --quiet fer-edge.service; then
    was_active=1
fi
say "installing fer-edge from $SRC into $VENV"
"$VENV/bin/pip" install "${pip_args[@]}" "$SRC"
[ -z "$constraints" ] || rm -f "$constraints"

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
    say "done. Check it with: fer-edge doctor; logs: journalctl -u fer-edge -f"
else
    say "done (staged below $ROOT)"
fi
