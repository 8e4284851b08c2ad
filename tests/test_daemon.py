"""The daemon for real: `python -m edge.cli run` as a subprocess on the bundled demo clip, a real mosquitto,
a real subscriber. Plus in-process checks of the frame loop (every_n, bad frames, a dead camera) and sd_notify.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest

from broker import Subscriber
from edge.config import load_config
from edge.sdnotify import Notifier
from edge.service import Service

ROOT = Path(__file__).resolve().parents[1]
W, H = 640, 480  # demo clip frame size
LABELS = {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
EVENT_LOG = re.compile(r"event (new|update|end) (\S+) \S+ [\d.]+ epoch=(\S+)")


def _model_path() -> Path:
    from edge.classify import DEFAULT_MODEL

    return Path(os.environ.get("FER_EDGE_MODEL__PATH") or DEFAULT_MODEL)


@pytest.fixture(autouse=True)
def need_model():
    if not _model_path().is_file():
        pytest.skip(f"no emotion model at {_model_path()} (it ships in git: git checkout -- edge/models)")


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (pip install fer-edge[test])")
    from edge.events import load_schema

    schema = load_schema()
    return jsonschema.Draft202012Validator(schema)


def check_event(ev: dict, validator) -> None:
    """Schema-valid, box inside the frame, probabilities that sum to one."""
    errors = sorted(validator.iter_errors(ev), key=str)
    assert not errors, f"event does not match the schema: {errors[0].message} in {ev}"
    b = ev["bbox"]
    assert b["w"] > 0 and b["h"] > 0
    assert 0 <= b["x"] and 0 <= b["y"] and b["x"] + b["w"] <= W and b["y"] + b["h"] <= H, b
    assert set(ev["scores"]) == LABELS
    assert math.isclose(sum(ev["scores"].values()), 1.0, abs_tol=0.02)
    assert ev["emotion"] == max(ev["scores"], key=ev["scores"].get)


def check_lifecycles(seq: list[tuple[str, str]]) -> None:
    """Per face: one "new" first, "update"s, one "end" last."""
    faces: dict[str, list[str]] = {}
    for typ, fid in seq:
        faces.setdefault(fid, []).append(typ)
    for fid, types in faces.items():
        assert types[0] == "new" and types[-1] == "end", (fid, types)
        assert types.count("new") == 1 and types.count("end") == 1, (fid, types)


class Daemon:
    """`python -m edge.cli run ...` in a subprocess with its stderr in a file."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict | None = None, name: str = "daemon"):
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        e = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", *args], cwd=ROOT, env=e,
                                     stdout=subprocess.PIPE, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def produced(self) -> list[tuple[str, str, float]]:
        """(type, face_id, epoch) of every event, from the daemon's own debug log."""
        return [(m[1], m[2], float(m[3])) for m in EVENT_LOG.finditer(self.log())]

    def final_stats(self) -> dict:
        m = re.search(r"final stats: (\{.*\})", self.log())
        assert m, f"no final stats in the daemon log:\n{self.log()[-3000:]}"
        return json.loads(m.group(1))


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def run_args(broker, device: str, *extra: str) -> list[str]:
    return ["-v", "--device-id", device, "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
            "--set", "track.min_hits=2", "--set", "track.update_interval_s=1", "--set", "mqtt.stats_interval_s=1",
            "--set", "mqtt.reconnect_min_s=0.2", "--set", "mqtt.reconnect_max_s=1", *extra]


def events_of(sub: Subscriber, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in sub.on_topic(topic)]


class NotifySocket:
    """A systemd-like NOTIFY_SOCKET (abstract namespace) collecting datagrams."""

    def __init__(self):
        self.name = f"fer-edge-test-{os.getpid()}-{id(self):x}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def env_value(self) -> str:
        return "@" + self.name

    def _run(self):
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self):
        self._stop = True
        self._thread.join(1)
        self.sock.close()


# --- the daemon as a subprocess -------------------------------------------------------------------------

def test_events_status_stats_reload_and_sigterm(broker, subscriber, tmp_path, validator, daemons):
    """Realtime clip: schema-valid new/update events, stats, SIGHUP reload, SIGTERM -> end events, offline, exit 0."""
    device = "t-main"
    base = f"fer-edge/{device}"
    sub = subscriber(f"{base}/#")
    conf = tmp_path / "fer-edge.toml"
    conf.write_text('[source]\nkind = "demo"\n[track]\nmax_missed_s = 1.0\n')
    notify = NotifySocket()
    try:
        d = Daemon(tmp_path, ["-c", str(conf), *run_args(broker, device)],
                   env={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "1000000"})
        daemons.append(d)
        assert sub.wait_topic(f"{base}/status", lambda ms: any(m.text == "online" for m in ms), timeout=20), d.log()
        got = sub.wait_topic(f"{base}/faces", lambda ms: sum(b'"update"' in m.payload for m in ms) >= 2, timeout=25)
        assert got, f"no new/update events:\n{d.log()[-3000:]}"
        assert sub.wait_topic(f"{base}/stats", lambda ms: len(ms) >= 2, timeout=10)

        # SIGHUP: one live change, one needing a restart; then a broken file that must be rejected.
        conf.write_text('[source]\nkind = "demo"\nwidth = 320\n[track]\nmax_missed_s = 0.8\n')
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload:" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        conf.write_text("[track\nbroken")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.1)

        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(20) == 0, d.log()[-3000:]
    finally:
        notify.close()

    log = d.log()
    assert "Traceback" not in log
    assert "reload: applied track.max_missed_s=0.8 (was 1.0)" in log
    assert re.search(r"reload: source\.width=320 \(was 640\) changed but need a restart", log), log[-3000:]
    assert "reload failed, keeping the current configuration: config error:" in log and "line 1" in log
    # Plain one-line logs with timestamps outside systemd.
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO +edge\.service: ", log, re.M)

    # Every event arrived, valid, in order, with complete lifecycles (SIGTERM flushes the "end"s).
    assert sub.wait_topic(f"{base}/status", lambda ms: ms[-1].text == "offline", timeout=5)
    events = events_of(sub, f"{base}/faces")
    for ev in events:
        check_event(ev, validator)
        assert ev["device_id"] == device and ev["source"] == "demo"
    produced = d.produced()
    received = [(e["type"], e["face_id"], e["epoch"]) for e in events]
    assert list(dict.fromkeys(received)) == produced
    check_lifecycles([(t, f) for t, f, _ in produced])
    assert {"new", "update", "end"} <= {t for t, _, _ in produced}
    ends = [e for e in events if e["type"] == "end"]
    assert all(e["summary"]["dominant"] in LABELS for e in ends)

    # Status: "online" while running, retained "offline" after the clean stop.
    statuses = [m.text for m in sub.on_topic(f"{base}/status")]
    assert statuses[0] == "online" and statuses[-1] == "offline"
    late = subscriber(f"{base}/status")
    assert late.wait_topic(f"{base}/status", timeout=5)
    assert late.on_topic(f"{base}/status")[0].text == "offline" and late.on_topic(f"{base}/status")[0].retain

    # Stats shape.
    stats = [json.loads(m.payload) for m in sub.on_topic(f"{base}/stats")]
    s = stats[-1]
    for key in ("fps", "frames", "faces_in_view", "uptime_s", "latency_ms", "backend", "model", "source", "mqtt",
                "events", "cpu_temp_c", "detector"):
        assert key in s, key
    assert s["device_id"] == device
    assert 3 <= stats[1]["fps"] <= 15, stats[1]["fps"]  # realtime pacing of a 10 fps clip
    for stage in ("capture_wait", "detect", "preprocess", "classify", "track_publish", "total"):
        lat = s["latency_ms"][stage]
        assert lat["p50_ms"] is not None and 0 <= lat["p50_ms"] <= lat["p95_ms"], (stage, lat)
    assert s["source"]["name"] == "demo" and s["source"]["reconnects"] == 0
    assert set(s["source"]) == {"name", "connected", "status", "error", "reconnects", "dropped_frames"}
    assert s["source"]["status"] in ("up", "finished") and s["source"]["error"] is None
    assert s["model"]["sha256"] and len(s["model"]["sha256"]) == 64
    assert set(s["mqtt"]) >= {"connected", "buffered", "dropped", "sent", "reconnects"}
    assert s["cpu_temp_c"] is None or 0 < s["cpu_temp_c"] < 120
    final = d.final_stats()
    assert final["events"]["produced"] == len(produced) == final["mqtt"]["sent"]
    assert final["mqtt"]["buffered"] == 0 and final["mqtt"]["dropped"] == 0

    # systemd notifications.
    msgs = notify.messages
    assert any(m.startswith("READY=1") for m in msgs), msgs
    assert any(m == "WATCHDOG=1" for m in msgs), msgs
    assert any(m.startswith("STATUS=") and "fps" in m for m in msgs), msgs
    assert any(m.startswith("STOPPING=1") for m in msgs), msgs
    first_ready = next(i for i, m in enumerate(msgs) if m.startswith("READY=1"))
    assert first_ready < next(i for i, m in enumerate(msgs) if m.startswith("STOPPING=1"))


def test_last_will_offline_after_sigkill_and_journal_logs(broker, subscriber, tmp_path, daemons):
    device = "t-lwt"
    sub = subscriber(f"fer-edge/{device}/status")
    log_path = tmp_path / "journal.log"
    log_path.touch()
    st = os.stat(log_path)
    d = Daemon(tmp_path, run_args(broker, device), env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
               name="journal")
    daemons.append(d)
    assert sub.wait_for(lambda ms: any(m.text == "online" for m in ms), timeout=20), d.log()
    # "online" goes out on connect, which can come before the source has started on a busy machine
    deadline = time.monotonic() + 20
    while "source demo started" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    d.proc.send_signal(signal.SIGKILL)
    d.wait(10)
    assert sub.wait_for(lambda ms: ms[-1].text == "offline", timeout=10), [m.text for m in sub.messages]
    late = subscriber(f"fer-edge/{device}/status")
    assert late.wait_for(bool, timeout=5)
    assert late.messages[0].text == "offline" and late.messages[0].retain
    # Under journald: syslog priority prefix, no timestamps.
    lines = [ln for ln in d.log().splitlines() if ln.startswith("<")]
    assert any(re.match(r"<6>edge\.service: source demo started", ln) for ln in lines), d.log()[:2000]
    assert not re.search(r"^\d{4}-\d\d-\d\d ", d.log(), re.M)


# A broker outage mid-run (every event arrives, in order, once, each valid): tests/test_faults.py,
# test_broker_sigkill_outage_exact_count.


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory) -> Path:
    """The first 5 s of the demo clip (one face enters at 1 s) as its own video file."""
    from edge.sources import DEMO_CLIP

    out = tmp_path_factory.mktemp("clip") / "short.mp4"
    cap = cv2.VideoCapture(str(DEMO_CLIP))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (W, H))
    for _ in range(50):
        ok, frame = cap.read()
        assert ok
        writer.write(frame)
    writer.release()
    cap.release()
    return out


def test_finite_file_without_mqtt_prints_events_and_exits_0(short_clip, tmp_path, validator, daemons):
    d = Daemon(tmp_path, ["--source-uri", str(short_clip), "--set", "source.realtime=false",
                          "--set", "mqtt.enabled=false", "--print-events", "--device-id", "t-file", "-v"])
    daemons.append(d)
    out, _ = d.proc.communicate(timeout=120)
    assert d.wait(5) == 0, d.log()[-3000:]
    log = d.log()
    assert "stopping (source finished)" in log and "Traceback" not in log
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert events, log[-3000:]
    for ev in events:
        check_event(ev, validator)
        assert ev["source"] == f"file:{short_clip}"
    check_lifecycles([(e["type"], e["face_id"]) for e in events])
    assert [(e["type"], e["face_id"], e["epoch"]) for e in events] == d.produced()
    assert d.final_stats()["frames"] == 50 and d.final_stats()["mqtt"] is None


# --- the frame loop in-process -----------------------------------------------------------------------------

def service_for(clip: Path, **settings: str) -> tuple[Service, list[dict]]:
    overrides = {"source.kind": "opencv", "source.uri": str(clip), "source.realtime": "false",
                 "mqtt.enabled": "false", "device.id": "t-inproc", "track.min_hits": "2", **settings}
    events: list[dict] = []
    return Service(load_config(None, overrides), event_sink=events.append), events


def test_every_n_reuses_tracked_boxes(short_clip):
    svc, events = service_for(short_clip, **{"detect.every_n": "3"})
    assert svc.run() == 0
    assert svc.frames == 50
    assert svc.detections == math.ceil(50 / 3)
    types = [e["type"] for e in events]
    assert types.count("new") >= 1 and types[-1] == "end"
    check_lifecycles([(e["type"], e["face_id"]) for e in events])
    # Between detections the face is still classified every frame: no track was lost and re-created.
    assert types.count("new") == 1, types
    assert svc.latency.summary()["classify"]["p50_ms"] is not None


class Flaky:
    """Wraps a real detector/classifier method; raises on every ``every``-th call."""

    def __init__(self, fn, every: int):
        self.fn, self.every, self.calls, self.raised = fn, every, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls % self.every == 0:
            self.raised += 1
            raise RuntimeError("injected failure")
        return self.fn(*args, **kwargs)


def test_bad_frames_are_logged_rate_limited_and_skipped(short_clip, caplog):
    svc, events = service_for(short_clip)
    real_start = svc._start

    def start_with_failures():
        real_start()
        svc.detector.detect = Flaky(svc.detector.detect, 4)
        svc.classifier.predict = Flaky(svc.classifier.predict, 3)

    svc._start = start_with_failures
    with caplog.at_level("ERROR", logger="edge.service"):
        assert svc.run() == 0
    assert svc.frames == 50
    assert svc.error_counts["detect"] == svc.detector.detect.raised > 0
    assert svc.error_counts["classify"] == svc.classifier.predict.raised > 0
    # Rate limited: one line per kind of failure within error_log_interval_s.
    assert len([r for r in caplog.records if "detector failed" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "classifier failed" in r.getMessage()]) == 1
    assert any(e["type"] == "new" for e in events)
    check_lifecycles([(e["type"], e["face_id"]) for e in events])


def test_dead_camera_keeps_running_and_stats_say_disconnected():
    cfg = load_config(None, {"source.kind": "opencv", "source.uri": "/dev/video-fer-edge-missing",
                             "source.reconnect_min_s": "0.1", "source.reconnect_max_s": "0.2",
                             "mqtt.enabled": "false", "service.duration_s": "1.5", "service.read_timeout_s": "0.1"})
    svc = Service(cfg)
    t0 = time.monotonic()
    assert svc.run() == 0
    assert 1.4 <= time.monotonic() - t0 < 10
    s = svc.stats()
    assert s["frames"] == 0 and s["source"]["connected"] is False and s["source"]["reconnects"] >= 1
    assert s["fps"] == 0
    assert s["source"]["status"] == "no camera"  # down and why, not "online" at 0 fps
    assert s["source"]["error"] == "no camera connected: /dev/video-fer-edge-missing does not exist"


# --- sd_notify ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [True, False])
def test_sdnotify_socket_and_watchdog_rate_limit(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = f"\0fer-edge-sd-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    sock.bind(addr)
    sock.settimeout(1)
    try:
        env = {"NOTIFY_SOCKET": "@" + addr[1:] if abstract else addr, "WATCHDOG_USEC": "2000000"}
        n = Notifier(env)
        assert n.enabled and n.watchdog_interval == 1.0
        assert n.ready("up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        assert n.watchdog(now=100.0)
        assert not n.watchdog(now=100.5)  # within WATCHDOG_USEC/2: not sent
        assert n.watchdog(now=101.1)
        assert sock.recv(100) == b"WATCHDOG=1" and sock.recv(100) == b"WATCHDOG=1"
        assert n.stopping()
        assert sock.recv(100) == b"STOPPING=1"
        n.close()
    finally:
        sock.close()


def test_sdnotify_noop_outside_systemd_and_for_other_pids():
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog()
    n = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval is None and not n.watchdog()
    n = Notifier({"NOTIFY_SOCKET": "@fer-edge-nobody-listens-here"})
    assert n.ready() is False  # no listener: reported, not raised
