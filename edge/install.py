"""Install fer-edge as a systemd service: config, unit, system user, state directory; and uninstall it.

Idempotent: every step compares what is there with what should be and reports ``created``, ``updated`` or
``unchanged``; a second run changes nothing and says so. The user's ``/etc/fer-edge/config.toml`` is
never overwritten. With ``root`` other than ``/`` (a staging tree, or tests) everything is written below
that root and nothing touches the running system: no user is created, no chown, no systemctl. With
``dry_run`` nothing is written at all.

The virtual environment itself (``<prefix>/venv`` with ``--system-site-packages`` and the package
installed into it) is made by ``scripts/install.sh`` before it calls ``fer-edge install-service``.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from edge.fsutil import atomic_write

log = logging.getLogger(__name__)

UNIT_NAME = "fer-edge.service"
DEFAULT_PREFIX = "/opt/fer-edge"
DEFAULT_USER = "fer-edge"
CONFIG_DIR = "/etc/fer-edge"
CONFIG_PATH = "/etc/fer-edge/config.toml"
STATE_DIR = "/var/lib/fer-edge"
UNIT_DIR = "/etc/systemd/system"
# The shipped unit names these; the installer substitutes the chosen prefix and user.
TEMPLATE_EXEC = "/opt/fer-edge/venv/bin/fer-edge"
TEMPLATE_USER = "fer-edge"
# Supplementary groups for camera access; only those that exist on this system are added.
CAMERA_GROUPS = ("video",)
# Video nodes of the Pi's own CSI receivers: a camera there is libcamera's (picamera2), not a USB webcam.
CSI_RECEIVERS = ("unicam", "rp1-cfe", "bcm2835-isp", "pispbe")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class InstallError(Exception):
    """The installation cannot proceed; the message says what to do."""


@dataclass
class InstallOptions:
    """What to install where (the ``install-service`` command line)."""

    root: str = "/"  # install below this directory instead of the live system
    prefix: str = DEFAULT_PREFIX  # the venv is <prefix>/venv
    user: str = DEFAULT_USER  # system user the daemon runs as
    dry_run: bool = False  # report what would change, write nothing
    source: Optional[str] = None  # fer-edge source checkout holding systemd/ and config/ (default: auto)
    source_kind: str = "auto"  # source.kind written into a new config: auto | picamera2 | opencv | demo
    enable: bool = True  # on the live system: enable and start the unit

    @property
    def live(self) -> bool:
        """True when installing onto the running system (root "/" and not a dry run)."""
        return os.path.realpath(self.root) == "/" and not self.dry_run

    def validate(self) -> None:
        if not _NAME_RE.match(self.user):
            raise InstallError(f"--user {self.user!r}: not a valid system user name (lower case letters, digits, "
                               "'-' and '_', at most 32 characters)")
        if not os.path.isabs(self.prefix):
            raise InstallError(f"--prefix {self.prefix!r}: must be an absolute path such as {DEFAULT_PREFIX}")
        if any(c.isspace() for c in self.prefix):
            raise InstallError(f"--prefix {self.prefix!r}: must not contain spaces (it goes into ExecStart=)")
        if self.source_kind not in ("auto", "picamera2", "opencv", "demo"):
            raise InstallError(f"--source-kind {self.source_kind!r}: use auto, picamera2, opencv or demo")


# Past -> present tense of the verbs Report.change lines start with, for dry runs.
PRESENT = {"created": "create", "added": "add", "set": "set", "updated": "update", "reloaded": "reload",
           "enabled": "enable", "started": "start", "restarted": "restart", "stopped": "stop", "disabled": "disable",
           "removed": "remove"}


@dataclass
class Report:
    """What a run did (or would do): one line per step, and whether anything changed."""

    dry_run: bool = False
    lines: list[str] = field(default_factory=list)
    changed: int = 0
    warnings: int = 0

    def change(self, text: str) -> None:
        """``text`` in the past tense ("created /etc/x"); a dry run reports it as "would create /etc/x"."""
        self.changed += 1
        if self.dry_run:
            words = text.split(" ")
            for i in (0, 2) if len(words) > 2 and words[1] == "and" else (0,):
                words[i] = PRESENT.get(words[i], words[i])
            text = "would " + " ".join(words)
        self.lines.append(text)

    def same(self, text: str) -> None:
        self.lines.append(text)

    def warn(self, text: str) -> None:
        self.warnings += 1
        self.lines.append(f"warning: {text}")


# --- resources -------------------------------------------------------------------------------------

def _candidate_roots(explicit: Optional[str]) -> list[Path]:
    if explicit:
        return [Path(explicit)]
    here = Path(__file__).resolve().parent
    # A checkout (editable install or running from the tree), then data shipped inside the package.
    return [here.parent, here / "data"]


def find_resource(rel: str, source: Optional[str] = None) -> Path:
    """Locate ``systemd/fer-edge.service`` or ``config/default.toml``; InstallError naming --source if absent."""
    tried = []
    for base in _candidate_roots(source):
        for cand in (base / rel, base / Path(rel).name):
            tried.append(str(cand))
            if cand.is_file():
                return cand
    raise InstallError(f"cannot find {rel} (looked at {', '.join(tried)}); pass --source DIR, the fer-edge "
                       "source checkout (scripts/install.sh does this)")


def render_unit(template: str, prefix: str, user: str) -> str:
    """The unit text for this prefix and user (the shipped file names /opt/fer-edge and fer-edge)."""
    if TEMPLATE_EXEC not in template:
        raise InstallError(f"unit template has no ExecStart={TEMPLATE_EXEC}: is it the fer-edge unit?")
    exec_path = str(Path(prefix) / "venv" / "bin" / "fer-edge")
    text = template.replace(TEMPLATE_EXEC, exec_path)
    text = re.sub(rf"^(User|Group)={re.escape(TEMPLATE_USER)}$", rf"\1={user}", text, flags=re.M)
    return text


def set_toml_key(text: str, section: str, key: str, value: str) -> tuple[str, bool]:
    """Replace the value of the first uncommented ``key = ...`` line in ``[section]``, keeping comments."""
    lines = text.splitlines(keepends=True)
    current = None
    for i, line in enumerate(lines):
        head = re.match(r"^\s*\[([^\]]+)\]\s*(#.*)?$", line)
        if head:
            current = head.group(1).strip()
            continue
        if current == section and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            end = "\n" if line.endswith("\n") else ""
            lines[i] = f"{key} = {value}{end}"
            return "".join(lines), True
    return text, False


def render_config(default_toml: str, source_kind: str) -> str:
    """The first /etc/fer-edge/config.toml: the documented defaults with [source] set up for this device."""
    settings = {"kind": f'"{source_kind}"'}
    if source_kind == "demo":
        # One pass of the clip would end the service (exit 0, which Restart=on-failure does not restart).
        settings["loop"] = "true"
    elif source_kind == "opencv":
        settings["uri"] = '"0"'
    text = default_toml
    for key, value in settings.items():
        text, found = set_toml_key(text, "source", key, value)
        if not found:
            raise InstallError(f"config/default.toml has no [source] {key} line to set; is it the fer-edge default config?")
    return text


def list_cameras(python: str = sys.executable, env: Optional[dict] = None,
                 timeout: float = 60.0) -> Optional[list[str]]:
    """Models of the cameras libcamera lists (Picamera2.global_camera_info(), which opens none), or None when
    picamera2 cannot be imported there. Runs in a child: libcamera logs to stderr and can be slow to start."""
    code = ("import json; from picamera2 import Picamera2; "
            "print(json.dumps([str(c.get('Model', '?')) for c in Picamera2.global_camera_info()]))")
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("LIBCAMERA_LOG_LEVELS", "*:ERROR")
    try:
        res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, env=child_env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    try:
        models = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return [str(m) for m in models] if isinstance(models, list) else None


def _video0_name(root: Path) -> Optional[str]:
    """The driver's name for /dev/video0 ("" if unknown), None when there is no /dev/video0."""
    if not (root / "dev" / "video0").exists():
        return None
    try:
        return (root / "sys/class/video4linux/video0/name").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def detect_source(root: Path, cameras: Optional[list[str]]) -> tuple[str, str]:
    """(source.kind, why) from the cameras actually there: picamera2 when libcamera lists a camera (``cameras``
    from list_cameras, None = picamera2 not installed or not asked), else opencv when /dev/video0 is a camera
    (a USB webcam), else demo. An installed python3-picamera2 alone says nothing: Raspberry Pi OS always has it."""
    if cameras:
        return "picamera2", f"libcamera lists {', '.join(cameras)}"
    libcamera = "picamera2 not available" if cameras is None else "libcamera lists no camera"
    name = _video0_name(root)
    if name is not None and not any(r in name.lower() for r in CSI_RECEIVERS):
        return "opencv", f"{libcamera}; /dev/video0 is a V4L2 camera" + (f" ({name})" if name else "")
    return "demo", f"no camera found ({libcamera}, no USB camera at /dev/video0)"


def detect_source_kind(root: Path, cameras: Optional[list[str]] = None) -> str:
    """source.kind only; see detect_source."""
    return detect_source(root, cameras)[0]


# --- file helpers ----------------------------------------------------------------------------------

def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _atomic_write(path: Path, data: str, mode: int) -> None:
    """Write via a temporary file + fsync + rename, so a power cut leaves the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode, tmp_prefix=f".{path.name}.")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def _ids(user: str, group: str) -> tuple[int, int]:
    """(uid, gid) by name, -1 for any that does not exist (os.chown leaves those unchanged)."""
    try:
        uid = pwd.getpwnam(user).pw_uid if user else -1
    except KeyError:
        uid = -1
    try:
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        gid = -1
    return uid, gid


class Installer:
    """Performs install/uninstall steps for one set of options; ``run_cmd`` runs system commands."""

    def __init__(self, opts: InstallOptions, run_cmd: Optional[Callable[[list[str]], subprocess.CompletedProcess]] = None,
                 cameras: Optional[Callable[[], Optional[list[str]]]] = None):
        opts.validate()
        self.opts = opts
        # Cameras can only be listed on the system they are attached to; a staging root gets the demo or
        # whatever --source-kind says.
        self._cameras = cameras or (list_cameras if opts.live else (lambda: None))
        self.root = Path(opts.root)
        self.report = Report(dry_run=opts.dry_run)
        self._run = run_cmd or _run_cmd

    # --- install --------------------------------------------------------------------------------

    def install(self) -> Report:
        """Install (or bring up to date) everything; returns the report."""
        o = self.opts
        if not self.root.is_dir():
            raise InstallError(f"--root {o.root}: not a directory")
        if o.live and os.geteuid() != 0:
            raise InstallError("installing the service needs root: run it with sudo (or use --root DIR / --dry-run)")
        unit_text = render_unit(find_resource("systemd/fer-edge.service", o.source).read_text(encoding="utf-8"),
                                o.prefix, o.user)
        default_toml = find_resource("config/default.toml", o.source).read_text(encoding="utf-8")
        self._check_venv()
        self._user()
        # World-traversable like the unit's ConfigurationDirectoryMode; the file itself is 0640 root:<user>.
        self._dir(CONFIG_DIR, 0o755, owner="root", group=o.user)
        self._config(default_toml)
        self._dir(STATE_DIR, 0o750, owner=o.user, group=o.user)
        unit_changed = self._file(_under(self.root, UNIT_DIR) / UNIT_NAME, unit_text, 0o644, "unit")
        self._systemd_enable(unit_changed)
        if not self.report.changed:
            self.report.same("nothing to change: fer-edge service already installed and up to date")
        return self.report

    def _check_venv(self) -> None:
        exe = _under(self.root, self.opts.prefix) / "venv" / "bin" / "fer-edge"
        if exe.is_file() and os.access(exe, os.X_OK):
            self.report.same(f"found {exe}")
            return
        msg = (f"{exe} does not exist: create the venv first (scripts/install.sh, or python3 -m venv "
               f"--system-site-packages {self.opts.prefix}/venv && {self.opts.prefix}/venv/bin/pip install .)")
        if self.opts.live:
            raise InstallError(msg)
        self.report.warn(msg)

    def _user(self) -> None:
        o = self.opts
        groups = [g for g in CAMERA_GROUPS if _group_exists(g)]
        try:
            entry = pwd.getpwnam(o.user)
        except KeyError:
            entry = None
        if not o.live:
            if entry is None:
                self.report.same(f"skipped: system user {o.user} (created only when installing onto / for real)")
            return
        if entry is None:
            cmd = ["useradd", "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
                   "--shell", _nologin(), "--comment", "fer-edge daemon"]
            if groups:
                cmd += ["--groups", ",".join(groups)]
            self._check(cmd + [o.user])
            self.report.change(f"created system user {o.user}" + (f" in group {', '.join(groups)}" if groups else ""))
            return
        member = {g.gr_name for g in grp.getgrall() if o.user in g.gr_mem}
        missing = [g for g in groups if g not in member]
        if missing:
            self._check(["usermod", "--append", "--groups", ",".join(missing), o.user])
            self.report.change(f"added user {o.user} to group {', '.join(missing)}")
        else:
            self.report.same(f"unchanged: system user {o.user}")

    def _dir(self, path: str, mode: int, owner: str, group: str) -> None:
        p = _under(self.root, path)
        if p.is_dir():
            if _mode(p) != mode:
                if not self.opts.dry_run:
                    os.chmod(p, mode)
                self.report.change(f"set mode {mode:04o} on {p}")
            else:
                self.report.same(f"unchanged: {p}")
        else:
            if not self.opts.dry_run:
                p.mkdir(parents=True, exist_ok=True)
                os.chmod(p, mode)  # mkdir's mode is filtered by the umask
            self.report.change(f"created {p} (mode {mode:04o})")
        self._chown(p, owner, group)

    def _chown(self, p: Path, owner: str, group: str) -> None:
        if not self.opts.live:
            return  # a staging root's ownership is for whoever packs it
        uid, gid = _ids(owner, group)
        st = p.stat()
        if (uid in (-1, st.st_uid)) and (gid in (-1, st.st_gid)):
            return
        os.chown(p, uid, gid)
        self.report.change(f"set owner {owner}:{group} on {p}")

    def _config(self, default_toml: str) -> None:
        o = self.opts
        p = _under(self.root, CONFIG_PATH)
        if p.exists():
            self.report.same(f"kept existing {p} (never overwritten; compare with config/default.toml for new keys)")
            if p.is_file() and _mode(p) & 0o007:
                self.report.warn(f"{p} is readable by every user and may hold the MQTT password: chmod 0640 {p}")
            return
        if o.source_kind == "auto":
            kind, why = detect_source(self.root, self._cameras())
        else:
            kind, why = o.source_kind, "--source-kind"
        text = render_config(default_toml, kind)
        if not o.dry_run:
            _atomic_write(p, text, 0o640)
        self.report.change(f"created {p} (mode 0640, source.kind = \"{kind}\": {why})")
        if kind == "demo":
            self.report.warn(f"no camera found, so source.kind is \"demo\" (the bundled clip): set [source] kind in {p}")
        self._chown(p, "root", o.user)

    def _file(self, p: Path, text: str, mode: int, what: str) -> bool:
        """Make ``p`` hold exactly ``text`` with ``mode``; True if anything changed."""
        if p.is_file() and p.read_text(encoding="utf-8") == text:
            if _mode(p) == mode:
                self.report.same(f"unchanged: {p}")
                return False
            if not self.opts.dry_run:
                os.chmod(p, mode)
            self.report.change(f"set mode {mode:04o} on {p}")
            return True
        existed = p.exists()
        if not self.opts.dry_run:
            _atomic_write(p, text, mode)
        self.report.change(f"{'updated' if existed else 'created'} {what} {p}")
        return True

    def _systemd_enable(self, unit_changed: bool) -> None:
        o = self.opts
        if not o.live:
            self.report.same("skipped: systemctl daemon-reload / enable --now (only when installing onto / for real)")
            return
        if not _systemd_running():
            self.report.warn("systemd is not running here: enable the service later with "
                             "systemctl enable --now fer-edge")
            return
        if unit_changed:
            self._check(["systemctl", "daemon-reload"])
            self.report.change("reloaded systemd (daemon-reload)")
        if not o.enable:
            self.report.same("not enabled (--no-enable): start it with systemctl enable --now fer-edge")
            return
        enabled = self._run(["systemctl", "is-enabled", "--quiet", UNIT_NAME]).returncode == 0
        active = self._run(["systemctl", "is-active", "--quiet", UNIT_NAME]).returncode == 0
        if not enabled or not active:
            self._check(["systemctl", "enable", "--now", UNIT_NAME])
            self.report.change("enabled and started fer-edge.service (starts on boot)")
        elif unit_changed:
            self._check(["systemctl", "restart", UNIT_NAME])
            self.report.change("restarted fer-edge.service (unit changed)")
        else:
            self.report.same("unchanged: fer-edge.service enabled and running")

    # --- uninstall ------------------------------------------------------------------------------

    def uninstall(self, purge: bool = False) -> Report:
        """Stop, disable and remove the unit; with ``purge`` also the config, state and system user."""
        o = self.opts
        if o.live and os.geteuid() != 0:
            raise InstallError("removing the service needs root: run it with sudo (or use --root DIR / --dry-run)")
        unit = _under(self.root, UNIT_DIR) / UNIT_NAME
        if o.live and _systemd_running() and unit.exists():
            self._run(["systemctl", "disable", "--now", UNIT_NAME])  # fails harmlessly if already stopped
            self.report.change("stopped and disabled fer-edge.service")
        self._remove(unit)
        if o.live and _systemd_running() and self.report.changed:
            self._run(["systemctl", "daemon-reload"])
        if purge:
            self._remove(_under(self.root, CONFIG_DIR))
            self._remove(_under(self.root, STATE_DIR))
            if o.live:
                try:
                    pwd.getpwnam(o.user)
                except KeyError:
                    pass
                else:
                    self._check(["userdel", o.user])
                    self.report.change(f"removed system user {o.user}")
        else:
            cfg = _under(self.root, CONFIG_DIR)
            if cfg.exists():
                self.report.same(f"kept {cfg} and {_under(self.root, STATE_DIR)} (use --purge to remove them)")
        if not self.report.changed:
            self.report.same("nothing to remove: fer-edge service is not installed")
        return self.report

    def _remove(self, p: Path) -> None:
        if not p.exists() and not p.is_symlink():
            return
        if not self.opts.dry_run:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        self.report.change(f"removed {p}")

    # --- commands -------------------------------------------------------------------------------

    def _check(self, cmd: list[str]) -> None:
        res = self._run(cmd)
        if res.returncode != 0:
            why = (res.stderr or res.stdout or "").strip().splitlines()
            raise InstallError(f"{' '.join(cmd)} failed (exit {res.returncode})" + (f": {why[-1]}" if why else ""))


def _run_cmd(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]}: timed out")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _nologin() -> str:
    for p in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"):
        if os.path.exists(p):
            return p
    return "/bin/false"


def _systemd_running() -> bool:
    """True if systemd is PID 1 here (not in a container or chroot without it)."""
    return os.path.isdir("/run/systemd/system")


def install_service(opts: InstallOptions) -> Report:
    """Install or update the fer-edge service as described by ``opts``."""
    return Installer(opts).install()


def uninstall_service(opts: InstallOptions, purge: bool = False) -> Report:
    """Remove the fer-edge service (and with ``purge`` its config, state and user)."""
    return Installer(opts).uninstall(purge)
