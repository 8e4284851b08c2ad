"""systemd integration: the unit file passes `systemd-analyze verify` and keeps its hardening, and the daemon
speaks the notify/watchdog protocol to a real unix datagram socket standing in for systemd: READY=1 after start,
WATCHDOG=1 at half of WATCHDOG_USEC while frames flow, none while the frame loop is stalled, again after it
recovers; every datagram from the main PID (NotifyAccess=main); STOPPING=1 and exit 0 on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "fer-edge.service"
EXEC = "/opt/fer-edge/venv/bin/fer-edge"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} of a unit file (keys may repeat, as DeviceAllow= does)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit_path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (sudo apt-get install systemd)")
    # --man=no: the Pi image and CI have no man pages to check Documentation= against.
    return subprocess.run([exe, "verify", "--man=no", str(unit_path)], capture_output=True, text=True, timeout=60)


# --- the unit file -----------------------------------------------------------------------------------

def test_unit_passes_systemd_analyze_verify(tmp_path):
    """Verify the shipped unit with ExecStart pointed at a binary that exists (it is installed only on the Pi)."""
    text = UNIT.read_text()
    assert text.count(EXEC) == 1
    fake = tmp_path / "fer-edge"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copy = tmp_path / "fer-edge.service"
    copy.write_text(text.replace(EXEC, str(fake)))
    res = verify(copy)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def test_unit_verify_complains_only_about_the_missing_binary():
    """As shipped, the one thing verify rejects here is that /opt/fer-edge/venv/bin/fer-edge is not installed."""
    res = verify(UNIT)
    if Path(EXEC).exists():
        assert res.returncode == 0, res.stderr
        return
    lines = [l for l in (res.stdout + res.stderr).splitlines() if l.strip()]
    assert res.returncode != 0 and lines, "expected verify to notice the missing ExecStart binary"
    assert all(EXEC in l and "not executable" in l for l in lines), lines


def test_unit_settings():
    """The service contract of issue 5: notify + watchdog, restart policy, user, directories, hardening."""
    u = parse_unit(UNIT.read_text())
    s = {k: v[-1] for k, v in u["Service"].items()}
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["WatchdogSec"].rstrip("s").isdigit() and 5 <= int(s["WatchdogSec"].rstrip("s")) <= 120
    assert s["Restart"] == "on-failure" and s["RestartSec"]
    # 2 (config/model error) is not restarted; 3 (events lost, edge.service) stays a failure that is restarted.
    from edge.cli.common import EXIT_USAGE
    from edge.service import EXIT_EVENTS_LOST

    assert s["RestartPreventExitStatus"].split() == [str(EXIT_USAGE)]
    assert str(EXIT_EVENTS_LOST) not in s.get("SuccessExitStatus", "").split()
    assert f"or {EXIT_EVENTS_LOST} if events were lost" in UNIT.read_text()
    assert s["ExecStart"] == f"{EXEC} run -c /etc/fer-edge/config.toml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    stop = int(s["TimeoutStopSec"].rstrip("s"))
    assert 10 <= stop <= 90  # bounded; above the daemon's 5 s flush + source stop
    assert s["User"] == "fer-edge" and "video" in s["SupplementaryGroups"].split()
    assert s["StateDirectory"] == "fer-edge" and s["ConfigurationDirectory"] == "fer-edge"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "DevicePolicy": "closed", "LockPersonality": "yes",
                       "RestrictRealtime": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "ProtectControlGroups": "yes", "ProtectClock": "yes"}.items():
        assert s.get(key) == value, key
    allowed = {v.split()[0] for v in u["Service"]["DeviceAllow"]}
    # V4L2 nodes (/dev/video*, /dev/v4l-subdev*), media controller, libcamera's DMA heaps.
    assert {"char-video4linux", "char-media", "char-dma_heap"} <= allowed
    assert "PrivateDevices" not in s  # it would hide the camera
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert s["MemoryMax"].endswith(("M", "G"))
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_exposure_is_low(tmp_path):
    """systemd's own hardening score for the unit (0 = locked down, 10 = exposed) stays in its 'OK' band."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (sudo apt-get install systemd): the unit's security score is "
                    "not checked")
    fake = tmp_path / "fer-edge"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    copy = tmp_path / "fer-edge.service"
    copy.write_text(UNIT.read_text().replace(EXEC, str(fake)))
    res = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(copy)],
                         capture_output=True, text=True, timeout=60)
    line = next((l for l in res.stdout.splitlines() if "Overall exposure level" in l), None)
    if line is None:
        pytest.skip(f"this systemd-analyze cannot score offline units: {res.stderr.strip()[:200]}")
    score = float(line.split(":")[1].split()[0])
    assert score <= 3.0, line


# --- the notify / watchdog protocol -----------------------------------------------------------------

class FakeSystemd:
    """A unix datagram socket at a path, like /run/systemd/notify, recording (time, sender pid, message)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        # Like systemd: ask the kernel for the sender's credentials, to check NotifyAccess=main.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, int, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, creds_size)
            except socket.timeout:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            with self._lock:
                self.received.append((time.monotonic(), pid, data.decode("utf-8", "replace")))

    def messages(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, int, str]]:
        with self._lock:
            return [m for m in self.received if since <= m[0] < until]

    def watchdogs(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [t for t, _, msg in self.messages(since, until) if msg == "WATCHDOG=1"]

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


# Runs the real CLI with Detector.detect made to block while a file exists: a hung pipeline stage (a driver or
# interpreter that never returns) as seen by the frame loop. Nothing else is changed.
STALLING_DAEMON = """
import os, sys, time
from pathlib import Path
import edge.detect
stall = Path(os.environ["FER_EDGE_TEST_STALL_FILE"])
real_detect = edge.detect.Detector.detect
def detect(self, image):
    while stall.exists():
        time.sleep(0.02)
    return real_detect(self, image)
edge.detect.Detector.detect = detect
from edge.cli import main
sys.exit(main(sys.argv[1:]))
"""

WATCHDOG_USEC = 2_000_000  # pings due every 1 s (half of it)


def test_notify_ready_watchdog_and_stall(broker, subscriber, tmp_path):
    device = "t-watchdog"
    status_topic = f"fer-edge/{device}/status"
    sub = subscriber(status_topic)
    conf = tmp_path / "config.toml"
    conf.write_text(
        f'[device]\nid = "{device}"\nstate_dir = "{tmp_path}"\n'
        '[source]\nkind = "demo"\nloop = true\nrealtime = true\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nstats_interval_s = 0.0\n'
        '[service]\nlog_stats_interval_s = 0.0\nread_timeout_s = 0.2\n')
    driver = tmp_path / "stalling_daemon.py"
    driver.write_text(STALLING_DAEMON)
    stall = tmp_path / "stall"
    systemd = FakeSystemd(tmp_path / "notify")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "JOURNAL_", "FER_EDGE_"))}
    env.update(NOTIFY_SOCKET=str(systemd.path), WATCHDOG_USEC=str(WATCHDOG_USEC),
               FER_EDGE_TEST_STALL_FILE=str(stall), PYTHONPATH=str(ROOT))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(driver), "run", "-c", str(conf)], cwd=str(tmp_path), env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)

    def log() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        # READY=1 once camera (demo), model and broker connection are set up; nothing but STATUS before it.
        assert systemd.wait(lambda: any(m.startswith("READY=1") for _, _, m in systemd.messages()), 90), log()
        t_ready = next(t for t, _, m in systemd.messages() if m.startswith("READY=1"))
        before = [m for t, _, m in systemd.messages(until=t_ready)]
        assert all(m.startswith("STATUS=") for m in before), before

        # Frames flow: WATCHDOG=1 about every WATCHDOG_USEC/2, never a gap systemd would kill for.
        assert systemd.wait(lambda: len(systemd.watchdogs(since=t_ready)) >= 5, 15), (systemd.messages(), log())
        pings = systemd.watchdogs(since=t_ready)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert all(0.8 * WATCHDOG_USEC / 2e6 <= g < WATCHDOG_USEC / 1e6 for g in gaps), gaps
        assert sub.wait_topic(status_topic, lambda ms: any(m.text == "online" for m in ms), timeout=10)

        # Stall the frame loop: the pings stop, for as long as it is stalled (systemd would now SIGABRT it).
        stall.touch()
        t_stall = time.monotonic()
        time.sleep(2.5 * WATCHDOG_USEC / 1e6)
        late = systemd.watchdogs(since=t_stall + 0.5)  # one ping may be on its way as the stall begins
        assert late == [], f"WATCHDOG=1 while the frame loop was stalled: {late}"
        assert proc.poll() is None

        # Unstalled: pings resume.
        t_resume = time.monotonic()
        stall.unlink()
        assert systemd.wait(lambda: len(systemd.watchdogs(since=t_resume)) >= 2, 10), log()

        # Every datagram came from the main process (NotifyAccess=main drops any other sender's).
        assert {pid for _, pid, _ in systemd.messages()} == {proc.pid}

        # SIGTERM (systemctl stop): STOPPING=1, "offline" published, exit 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log()
        assert any(m.startswith("STOPPING=1") for _, _, m in systemd.messages()), systemd.messages()
        assert sub.wait_topic(status_topic, lambda ms: ms[-1].text == "offline", timeout=5)
        assert "Traceback" not in log()
    finally:
        if stall.exists():
            stall.unlink()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        systemd.close()


# --- a camera that hangs inside the driver (fake picamera2) ---------------------------------------------------

FAKE_PICAMERA2 = Path(__file__).resolve().parent / "fake_picamera2"


def start_picamera2_daemon(tmp_path: Path, systemd: "FakeSystemd | None", watchdog: bool, **fake: str):
    """`fer-edge run` on the fake picamera2 (knobs as FAKE_PICAMERA2_* variables), MQTT off; (process, log)."""
    conf = tmp_path / "config.toml"
    conf.write_text(
        f'[device]\nid = "t-hang"\nstate_dir = "{tmp_path}"\n'
        '[source]\nkind = "picamera2"\nwidth = 320\nheight = 240\nfps = 20\n'
        'frame_timeout_s = 0.2\nstall_timeout_s = 1.0\nreconnect_min_s = 0.05\nreconnect_max_s = 0.2\n'
        '[mqtt]\nenabled = false\nstats_interval_s = 0.0\n'
        '[service]\nlog_stats_interval_s = 0.0\nread_timeout_s = 0.2\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NOTIFY_", "WATCHDOG_", "JOURNAL_", "FER_EDGE_", "FAKE_PICAMERA2_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(FAKE_PICAMERA2)])
    env.update({f"FAKE_PICAMERA2_{k.upper()}": v for k, v in fake.items()})
    if systemd is not None:
        env["NOTIFY_SOCKET"] = str(systemd.path)
    if watchdog:
        env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "-c", str(conf)], cwd=str(tmp_path),
                                env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, lambda: log_path.read_text(errors="replace")[-4000:]


def stop_daemon(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_hung_camera_stops_the_watchdog(tmp_path):
    """capture_array stuck in the driver (ignoring wait=) after 20 frames: the pings stop, so systemd restarts."""
    systemd = FakeSystemd(tmp_path / "notify")
    proc, log = start_picamera2_daemon(tmp_path, systemd, watchdog=True, hang_after="20")
    try:
        assert systemd.wait(lambda: any(m.startswith("READY=1") for _, _, m in systemd.messages()), 90), log()
        assert systemd.wait(lambda: len(systemd.watchdogs()) >= 2, 60), log()  # fed while frames come
        # Once the read has been stuck for stall_timeout_s the daemon says so, and from then on never pings.
        assert systemd.wait(lambda: any("stalled" in m for _, _, m in systemd.messages()), 90), log()
        t_stalled = next(t for t, _, m in systemd.messages() if "stalled" in m)
        status = next(m for _, _, m in systemd.messages() if "stalled" in m)
        assert "read() has not returned for" in status and "waiting for the watchdog restart" in status
        # Event-based: more than two ping intervals of STATUS updates go by (the loop runs), yet no WATCHDOG=1.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and time.monotonic() - t_stalled < 3 * WATCHDOG_USEC / 2e6:
            time.sleep(0.1)
        assert proc.poll() is None  # still running: a stuck thread is systemd's to kill
        assert systemd.watchdogs(since=t_stalled) == [], systemd.messages(since=t_stalled)
        assert "source picamera2:0 stalled: read() has not returned" in log()
    finally:
        stop_daemon(proc)
        systemd.close()


def test_silent_camera_keeps_the_watchdog_fed_while_it_reconnects(tmp_path):
    """capture_array(wait=) times out (no frames, driver fine): reconnect attempts return, so pings go on."""
    systemd = FakeSystemd(tmp_path / "notify")
    proc, log = start_picamera2_daemon(tmp_path, systemd, watchdog=True, stall_after="0")
    try:
        assert systemd.wait(lambda: any(m.startswith("READY=1") for _, _, m in systemd.messages()), 90), log()
        t_ready = next(t for t, _, m in systemd.messages() if m.startswith("READY=1"))
        assert systemd.wait(lambda: len(systemd.watchdogs(since=t_ready)) >= 4, 90), log()
        assert "stopped delivering frames (TimeoutError: " in log()
        assert not any("stalled" in m for _, _, m in systemd.messages())
    finally:
        stop_daemon(proc)
        systemd.close()


def test_hung_camera_without_a_watchdog_exits_1(tmp_path):
    """No systemd watchdog to restart it (a terminal, a container): the daemon ends itself, status 1."""
    proc, log = start_picamera2_daemon(tmp_path, None, watchdog=False, hang_after="5")
    try:
        assert proc.wait(120) == 1, log()
        assert "exiting (status 1) so the service manager restarts fer-edge" in log()
        assert "Traceback" not in log()
    finally:
        stop_daemon(proc)
