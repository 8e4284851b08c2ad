"""The installer, into a temporary root: files, permissions, the user's config never overwritten, a second run
changes nothing, uninstall (and --purge); the CLI commands; scripts/install.sh end to end into a staging root.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from edge.install import (InstallError, InstallOptions, Installer, list_cameras, render_config, render_unit,
                          set_toml_key)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOML = (ROOT / "config" / "default.toml").read_text()
UNIT_TEXT = (ROOT / "systemd" / "fer-edge.service").read_text()


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o7777


def snapshot_tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path below root -> (mode, mtime_ns, content for files)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


def install(root: Path, **kw):
    return Installer(InstallOptions(root=str(root), source=str(ROOT), **kw)).install()


def fake_venv(root: Path, prefix: str = "/opt/fer-edge") -> Path:
    exe = root / prefix.lstrip("/") / "venv" / "bin" / "fer-edge"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return exe


def test_fresh_install_files_and_permissions(tmp_path):
    fake_venv(tmp_path)
    report = install(tmp_path)
    cfg = tmp_path / "etc/fer-edge/config.toml"
    unit = tmp_path / "etc/systemd/system/fer-edge.service"
    state = tmp_path / "var/lib/fer-edge"
    assert mode(cfg) == 0o640  # may hold the MQTT password: not world-readable
    assert mode(cfg.parent) == 0o755
    assert mode(unit) == 0o644
    assert mode(state) == 0o750
    # No camera in the temporary root: the demo clip, looped so the service keeps running.
    assert cfg.read_text() == set_toml_key(DEFAULT_TOML, "source", "loop", "true")[0]
    assert unit.read_text() == UNIT_TEXT
    assert report.changed == 4 and not any(l.startswith("would") for l in report.lines)
    text = "\n".join(report.lines)
    assert "skipped: system user fer-edge" in text and "skipped: systemctl" in text
    assert not list(tmp_path.rglob(".*.tmp*")) and not [p for p in tmp_path.rglob(".config.toml.*")]


def test_second_run_changes_nothing(tmp_path):
    fake_venv(tmp_path)
    install(tmp_path)
    before = snapshot_tree(tmp_path)
    report = install(tmp_path)
    assert report.changed == 0
    assert report.lines[-1].startswith("nothing to change")
    assert snapshot_tree(tmp_path) == before


def test_existing_config_is_never_overwritten(tmp_path):
    cfg = tmp_path / "etc/fer-edge/config.toml"
    cfg.parent.mkdir(parents=True)
    mine = '[mqtt]\nhost = "broker.lan"\npassword = "s3cret"\nusername = "pi"\n'
    cfg.write_text(mine)
    cfg.chmod(0o644)
    report = install(tmp_path, source_kind="picamera2")
    assert cfg.read_text() == mine and mode(cfg) == 0o644  # content and mode are the user's
    text = "\n".join(report.lines)
    assert f"kept existing {cfg}" in text
    assert "readable by every user" in text and "chmod 0640" in text  # but the user is told
    assert report.warnings >= 1


def test_changed_unit_is_updated_and_mode_repaired(tmp_path):
    install(tmp_path)
    unit = tmp_path / "etc/systemd/system/fer-edge.service"
    unit.write_text(UNIT_TEXT.replace("WatchdogSec=30s", "WatchdogSec=1s"))
    report = install(tmp_path)
    assert unit.read_text() == UNIT_TEXT and report.changed == 1
    assert any(l.startswith("updated unit") for l in report.lines)
    unit.chmod(0o600)
    report = install(tmp_path)
    assert mode(unit) == 0o644 and report.changed == 1


def test_prefix_and_user_are_rendered(tmp_path):
    fake_venv(tmp_path, "/srv/fer")
    report = install(tmp_path, prefix="/srv/fer", user="emotion")
    unit = (tmp_path / "etc/systemd/system/fer-edge.service").read_text()
    assert "ExecStart=/srv/fer/venv/bin/fer-edge run -c /etc/fer-edge/config.toml" in unit
    settings = [l for l in unit.splitlines() if l and not l.startswith("#")]
    assert "User=emotion" in settings and "Group=emotion" in settings
    assert not [l for l in settings if "/opt/fer-edge" in l or l.endswith("=fer-edge") and "Directory" not in l]
    assert report.warnings == 1  # only the demo-source note: the venv exists
    assert render_unit(UNIT_TEXT, "/opt/fer-edge", "fer-edge") == UNIT_TEXT


def test_rendered_unit_still_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (sudo apt-get install systemd): the rendered unit is not verified")
    fake = fake_venv(tmp_path, str(tmp_path / "prefix"))
    unit = tmp_path / "fer-edge.service"
    unit.write_text(render_unit(UNIT_TEXT, str(fake.parents[2]), "emotion"))
    res = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_dry_run_writes_nothing(tmp_path):
    report = install(tmp_path, dry_run=True)
    assert list(tmp_path.iterdir()) == []
    assert report.changed == 4 and all(l.startswith(("would", "warning", "skipped")) for l in report.lines)


def test_source_kind_in_new_config():
    pi = render_config(DEFAULT_TOML, "picamera2")
    assert 'kind = "picamera2"' in pi and pi.count("\n") == DEFAULT_TOML.count("\n")
    usb = render_config(DEFAULT_TOML, "opencv")
    assert 'kind = "opencv"' in usb and '\nuri = "0"\n' in usb
    import tomllib

    assert tomllib.loads(usb)["source"] == {**tomllib.loads(DEFAULT_TOML)["source"], "kind": "opencv", "uri": "0"}
    # Only the [source] section is touched, comments kept.
    text, found = set_toml_key('[a]\nkind = 1\n# kind = 2\n[source]\n# kind = "x"\nkind = "demo"\n', "source", "kind", '"y"')
    assert found and text == '[a]\nkind = 1\n# kind = 2\n[source]\n# kind = "x"\nkind = "y"\n'


FAKE_PICAMERA2 = Path(__file__).resolve().parent / "fake_picamera2"


def written_kind(root: Path) -> str:
    import tomllib

    return tomllib.loads((root / "etc/fer-edge/config.toml").read_text())["source"]["kind"]


@pytest.mark.parametrize("cameras,video0,kind", [
    (["imx708"], None, "picamera2"),
    ([], None, "demo"),  # python3-picamera2 installed (always, on Pi OS) but no camera: not picamera2
    (None, None, "demo"),  # no picamera2 at all
    ([], "UVC Camera (046d:0825)", "opencv"),  # a USB webcam
    (None, "", "opencv"),
    ([], "unicam", "demo"),  # the Pi 4's CSI receiver node without a sensor libcamera can use: not a webcam
    (["imx219"], "UVC Camera (046d:0825)", "picamera2"),
])
def test_source_detection_looks_for_cameras_not_packages(tmp_path, cameras, video0, kind):
    pkg = tmp_path / "usr/lib/python3/dist-packages/picamera2/__init__.py"
    pkg.parent.mkdir(parents=True)
    pkg.write_text("")
    if video0 is not None:
        (tmp_path / "dev").mkdir()
        (tmp_path / "dev/video0").write_text("")  # stands in for the device node
        name = tmp_path / "sys/class/video4linux/video0/name"
        name.parent.mkdir(parents=True)
        name.write_text(video0 + "\n")
    report = Installer(InstallOptions(root=str(tmp_path), source=str(ROOT)), cameras=lambda: cameras).install()
    assert written_kind(tmp_path) == kind
    line = next(l for l in report.lines if "config.toml" in l and "created" in l)
    assert f'source.kind = "{kind}": ' in line  # says which and why
    if kind == "picamera2":
        assert f"libcamera lists {cameras[0]}" in line
    elif kind == "opencv":
        assert "/dev/video0 is a V4L2 camera" in line


def test_staging_root_does_not_list_this_machines_cameras(tmp_path):
    install(tmp_path)
    assert written_kind(tmp_path) == "demo"


def test_list_cameras_asks_libcamera_through_picamera2():
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("FAKE_PICAMERA2")}
    fake = {**base, "PYTHONPATH": str(FAKE_PICAMERA2)}
    assert list_cameras(env={**fake, "FAKE_PICAMERA2_CAMERAS": "2"}) == ["imx708", "imx708"]
    assert list_cameras(env={**fake, "FAKE_PICAMERA2_CAMERAS": "0"}) == []
    try:
        import picamera2  # noqa: F401 - only on a Pi
    except ImportError:
        assert list_cameras(env=base) is None  # picamera2 not installed: unknown, not "no camera"


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(InstallError, match="--user"):
        Installer(InstallOptions(root=str(tmp_path), user="Bad User"))
    with pytest.raises(InstallError, match="--prefix"):
        Installer(InstallOptions(root=str(tmp_path), prefix="opt/fer"))
    with pytest.raises(InstallError, match="--source"):
        Installer(InstallOptions(root=str(tmp_path), source=str(tmp_path))).install()
    assert not (tmp_path / "etc").exists()


def test_uninstall_keeps_config_unless_purged(tmp_path):
    install(tmp_path)
    opts = InstallOptions(root=str(tmp_path))
    report = Installer(opts).uninstall()
    assert not (tmp_path / "etc/systemd/system/fer-edge.service").exists()
    assert (tmp_path / "etc/fer-edge/config.toml").is_file() and (tmp_path / "var/lib/fer-edge").is_dir()
    assert any("--purge" in l for l in report.lines)
    report = Installer(opts).uninstall(purge=True)
    assert not (tmp_path / "etc/fer-edge").exists() and not (tmp_path / "var/lib/fer-edge").exists()
    report = Installer(opts).uninstall(purge=True)
    assert report.changed == 0 and report.lines[-1].startswith("nothing to remove")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_")}
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)


def test_cli_install_and_uninstall(tmp_path):
    res = run_cli("install-service", "--root", str(tmp_path), "--source-kind", "opencv")
    assert res.returncode == 0, res.stderr
    assert "created" in res.stdout and "Traceback" not in res.stderr
    assert 'kind = "opencv"' in (tmp_path / "etc/fer-edge/config.toml").read_text()
    res = run_cli("install-service", "--root", str(tmp_path))
    assert res.returncode == 0 and "nothing to change" in res.stdout, res.stdout + res.stderr
    res = run_cli("uninstall-service", "--root", str(tmp_path), "--purge")
    assert res.returncode == 0 and "removed" in res.stdout
    res = run_cli("install-service", "--root", str(tmp_path / "missing"))
    assert res.returncode == 1 and res.stderr.startswith("error: --root") and "Traceback" not in res.stderr
    res = run_cli("install-service", "--root", str(tmp_path), "--user", "Bad User")
    assert res.returncode == 2 and "--user" in res.stderr


def build_outputs() -> dict[str, int]:
    """What an in-place setuptools build writes into the checkout (build/, *.egg-info), with mtimes."""
    found = [ROOT / "build", *ROOT.glob("*.egg-info")]
    return {str(p): p.stat().st_mtime_ns for d in found if d.exists() for p in [d, *d.rglob("*")]}


def test_install_sh_into_staging_root(tmp_path):
    """scripts/install.sh end to end: venv with system site packages, the package, the service files.

    Offline (--offline): the test's interpreter already has every dependency, so pip needs no index. The staged
    venv sees the base interpreter's packages through --system-site-packages; when the tests run in a venv of
    their own, PYTHONPATH adds that venv's (a venv made from a venv links to the base interpreter, not to it).
    """
    if shutil.which("bash") is None:
        pytest.skip("bash not installed (sudo apt-get install bash): scripts/install.sh is not run")
    stage = tmp_path / "root"
    stage.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_EDGE_", "PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env["PYTHON"] = sys.executable
    if sys.prefix != sys.base_prefix:
        env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    cmd = ["bash", str(ROOT / "scripts" / "install.sh"), "--root", str(stage), "--offline"]
    before = build_outputs()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert build_outputs() == before  # built in a temporary copy: no build/ or egg-info written into the checkout
    venv = stage / "opt/fer-edge/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    out = subprocess.run([str(venv / "bin/fer-edge"), "--version"], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0 and out.stdout.startswith("fer-edge "), out.stderr
    assert mode(stage / "etc/fer-edge/config.toml") == 0o640
    assert (stage / "etc/systemd/system/fer-edge.service").read_text() == UNIT_TEXT
    # Again: the venv is reused and nothing about the service changes.
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "using existing venv" in res.stdout and "nothing to change" in res.stdout


def test_install_sh_pins_numpy_for_picamera2_and_says_when_no_wheel_can_be_built(tmp_path):
    """With picamera2 importable, numpy is pinned to the version outside the venv (the camera stack's); an offline
    build that fails names the fix. Before, `ls dist/*.whl` failing under pipefail ended the script silently."""
    if shutil.which("bash") is None or shutil.which("git") is None:
        pytest.skip("bash and git needed (sudo apt-get install bash git): scripts/install.sh is not run")
    import numpy

    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file() and not rel.startswith("tests/"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    pyproject = src / "pyproject.toml"  # a build backend nobody has: no interpreter can build the wheel
    pyproject.write_text(pyproject.read_text().replace('"setuptools.build_meta"', '"no_such_backend.build"'))
    stage = tmp_path / "root"
    stage.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_EDGE_", "PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "fake_picamera2"), *site.getsitepackages()])
    res = subprocess.run(["bash", str(src / "scripts" / "install.sh"), "--root", str(stage), "--offline"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert f"numpy pinned to the system's {numpy.__version__}" in res.stdout, res.stdout + res.stderr
    assert res.returncode == 1, res.stdout + res.stderr
    assert "--offline: no build backend to build fer-edge" in res.stderr and "no_such_backend" in res.stderr


def test_install_sh_rejects_bad_usage(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 1 and "unknown option --bogus" in res.stderr
    res = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--with-mosquitto" in res.stdout


@pytest.mark.pi_userland
@pytest.mark.parametrize("arch,qemu", [("arm64", "qemu-aarch64-static"), ("armhf", "qemu-arm-static")])
def test_install_and_run_on_the_pi_userland(arch, qemu):
    """scripts/pi-userland-check.sh: install.sh, demo and predict inside Debian Bookworm arm64/armhf under qemu."""
    if os.environ.get("FER_PI_USERLAND") != "1":
        pytest.skip("slow (10-30 minutes an architecture): run it with "
                    "FER_PI_USERLAND=1 python3 -m pytest -m pi_userland tests/test_install.py (as root)")
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, chroot, mounts): run it with sudo")
    missing = [t for t in ("debootstrap", qemu) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: sudo apt-get install debootstrap qemu-user-static")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "pi-userland-check.sh"), "--arch", arch],
                         capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    assert f"OK: fer-edge installs and runs on Debian bookworm {arch}" in res.stdout


def install_sh(*args: str, machine: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_EDGE_", "PIP_"))}
    env["MACHINE_OVERRIDE"] = machine  # what the interpreter would say on that board
    return subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_install_sh_refuses_armv6_at_the_start_in_one_line(tmp_path):
    res = install_sh("--root", str(tmp_path), "--offline", machine="armv6l")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "ARMv6 (Raspberry Pi 1, Zero, Zero W) is not supported" in res.stderr
    assert "Zero 2 W, 3, 4 or 5" in res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing done before the refusal


def test_install_sh_requirements_per_architecture():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    arm64 = install_sh("--print-requirements", machine="aarch64").stdout.split()
    assert arm64 == [d.split(";")[0].strip() for d in deps]  # every marker on pyproject's list matches aarch64
    armv7 = install_sh("--print-requirements", machine="armv7l").stdout.split()
    names = {re.match(r"[\w.-]+", r).group(0).lower().replace("_", "-") for r in armv7}
    assert not names & {"numpy", "opencv-python-headless", "ai-edge-litert"}  # from Debian / no armv7l wheels
    assert "tflite-runtime>=2.14" in armv7 and any(r.startswith("cryptography") and r.endswith(",<46") for r in armv7)
    assert names - {"tflite-runtime"} == {re.match(r"[\w.-]+", d).group(0).lower().replace("_", "-")
                                           for d in deps} - {"numpy", "opencv-python-headless", "ai-edge-litert"}
