"""The web page, JSON API, /healthz and /metrics of a real daemon (`python -m edge.cli run` with [web] enabled on a
free port, the bundled demo clip, a real mosquitto), the server's own limits in-process, and the rendered page in
headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.config import ConfigError, load_config
from edge.detect import Box

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, auth: tuple[str, str] | None = None, timeout: float = 5.0, host: str | None = None):
    """(status, headers, body) of GET http://127.0.0.1:port/path (``host``: a different Host header)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Host": host} if host else {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def get_json(port: int, path: str, auth=None):
    status, headers, body = get(port, path, auth)
    assert status == 200, (path, status, body[:300])
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (pip install fer-edge[test])")
    from edge.events import load_schema

    return jsonschema.Draft202012Validator(load_schema())


@pytest.fixture(scope="module")
def password_hash():
    from edge.web.auth import make_hash

    return make_hash(PASSWORD)


class Daemon:
    """`python -m edge.cli run` with the web server on a free port; stderr (log) in a file."""

    def __init__(self, tmp: Path, settings: dict[str, str], name: str = "daemon"):
        self.port = free_port()
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "wb")
        args = ["--set", "web.enabled=true", "--set", f"web.port={self.port}", "--set", f"device.state_dir={tmp}",
                "--set", "source.loop=true", "--set", "device.id=webtest", "-v"]
        for k, v in settings.items():
            args += ["--set", f"{k}={v}"]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, auth=None, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            try:
                get(self.port, "/healthz", auth, timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"web server not listening after {timeout} s:\n{self.log()[-3000:]}")

    def wait_until(self, predicate, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _need_model():
    from edge.classify import DEFAULT_MODEL

    if not Path(DEFAULT_MODEL).is_file():
        pytest.skip(f"no emotion model at {DEFAULT_MODEL} (it ships in git: git checkout -- edge/models)")


# --- config and passwords ---------------------------------------------------------------------------------------

def test_defaults_keep_everything_on_the_device():
    cfg = load_config(None, env={})
    assert cfg.web.enabled is False and cfg.web.preview is False
    assert cfg.web.bind == "127.0.0.1" and cfg.web.loopback and not cfg.web.auth


@pytest.mark.parametrize("key,raw", [
    ("web.bind", "example.com"), ("web.port", "0"), ("web.port", "70000"), ("web.preview_fps", "0"),
    ("web.preview_fps", "nan"), ("web.jpeg_quality", "101"), ("web.events", "0"), ("web.timeout_s", "0"),
    ("web.max_clients", "0"), ("web.max_streams", "1000"), ("web.stale_s", "inf"),
])
def test_bad_values_name_the_key(key, raw):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: raw}, env={})
    assert e.value.key == key


@pytest.mark.parametrize("bad", ["hunter2", "scrypt$16384$8$1$c2FsdA==", "scrypt$3$8$1$c2FsdHNhbHQ=$" + "A" * 44,
                                 "scrypt$1073741824$8$1$c2FsdHNhbHQ=$" + "A" * 44])
def test_a_bad_password_hash_is_refused_without_echoing_it(bad):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"web.password_hash": bad}, env={})
    assert e.value.key == "web.password_hash"
    assert bad not in str(e.value) and "python3 -m edge.web.auth" in str(e.value)


def test_hash_command_and_basic_auth(monkeypatch, capsys):
    from edge.web.auth import BasicAuth, main

    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["--stdin"]) == 0
    line = capsys.readouterr().out.strip()
    m = re.fullmatch(r'password_hash = "(scrypt\$[^"]+)"', line)
    assert m, line
    cfg = load_config(None, {"web.password_hash": m[1]}, env={})  # the printed line is accepted as is
    auth = BasicAuth(cfg.web.username, cfg.web.password_hash)

    def header(user, pw):
        return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

    assert auth.check(header("fer-edge", PASSWORD))
    assert auth.check(header("fer-edge", PASSWORD))  # cached
    assert not auth.check(header("fer-edge", PASSWORD + "x"))
    assert not auth.check(header("admin", PASSWORD))
    for junk in (None, "", "Basic", "Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"nocolon").decode(),
                 "Basic " + "A" * 5000):
        assert not auth.check(junk)
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["--stdin"]) == 2  # too short: nothing printed to paste


def test_a_page_load_costs_one_scrypt_and_wrong_passwords_queue(monkeypatch, password_hash):
    from edge.web import auth as auth_mod

    calls = []  # (start, end) of each scrypt
    real = auth_mod.verify

    def timed(pw, h):
        t0 = time.monotonic()
        try:
            return real(pw, h)
        finally:
            calls.append((t0, time.monotonic()))

    monkeypatch.setattr(auth_mod, "verify", timed)
    auth = auth_mod.BasicAuth("fer-edge", password_hash)
    good = "Basic " + base64.b64encode(f"fer-edge:{PASSWORD}".encode()).decode()
    results = []
    threads = [threading.Thread(target=lambda: results.append(auth.check(good))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 6 and len(calls) == 1, "six parallel requests with one password: one scrypt"
    bad = ["Basic " + base64.b64encode(f"fer-edge:guess{i}".encode()).decode() for i in range(3)]
    threads = [threading.Thread(target=auth.check, args=(b,)) for b in bad]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 4
    for (s0, e0), (s1, _) in zip(calls, calls[1:]):  # one after the other, each pause twice the scrypt before it
        assert s1 - e0 >= 2 * (e0 - s0) - 1e-3, calls


# --- the server in-process: health, limits, timeouts -------------------------------------------------------------

def _server(**web):
    from edge.service import STAGES
    from edge.web.server import WebServer

    cfg = load_config(None, {"web.enabled": "true", "web.port": str(free_port()),
                             **{f"web.{k}": str(v) for k, v in web.items()}}, env={})
    srv = WebServer(cfg, STAGES)
    srv.start()
    return srv


def test_healthz_follows_the_frames():
    srv = _server(stale_s=1)
    try:
        status, _, body = get(srv.port, "/healthz")
        assert status == 503 and body.startswith(b"unhealthy: starting: no frame yet"), body
        img = np.zeros((48, 64, 3), np.uint8)
        srv.feed.on_frame(img, time.time(), [], [], None, LABELS)
        status, _, body = get(srv.port, "/healthz")
        assert status == 200 and body.startswith(b"ok"), body
        time.sleep(1.3)
        status, _, body = get(srv.port, "/healthz")
        assert status == 503 and b"no frame for 1." in body, body
        srv.feed.on_frame(img, time.time(), [], [], None, LABELS)
        assert get(srv.port, "/healthz")[0] == 200
        srv.feed.stopping("source finished")
        status, _, body = get(srv.port, "/healthz")
        assert status == 503 and b"stopping: source finished" in body
    finally:
        srv.stop()


def test_faces_carry_the_scores_of_their_own_box():
    srv = _server(preview="true")
    try:
        a, b = Box(10, 10, 50, 50), Box(100, 20, 60, 60)
        probs = np.array([np.eye(7)[3] * 0.9 + 0.1 / 7, np.eye(7)[5] * 0.8 + 0.2 / 7], np.float32)
        # the tracker lists faces in its own order, with the very Box objects it was given
        srv.feed.on_frame(np.zeros((240, 320, 3), np.uint8), time.time(), [("2-bbbb", b), ("1-aaaa", a)], [a, b],
                          probs, LABELS)
        faces = {f["face_id"]: f for f in get_json(srv.port, "/api/state")["faces"]}
        assert faces["1-aaaa"]["emotion"] == "happy" and faces["2-bbbb"]["emotion"] == "surprise"
        assert faces["2-bbbb"]["bbox"] == {"x": 100, "y": 20, "w": 60, "h": 60}
        # a frame where face 1 was not classified keeps its last scores
        srv.feed.on_frame(np.zeros((240, 320, 3), np.uint8), time.time(), [("1-aaaa", a)], [], None, LABELS)
        (face,) = get_json(srv.port, "/api/state")["faces"]
        assert face["emotion"] == "happy"
        status, headers, body = get(srv.port, "/api/preview.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)
    finally:
        srv.stop()


def test_stalled_clients_are_dropped_and_capped():
    srv = _server(timeout_s=0.5, max_clients=3, max_streams=1)
    try:
        stalled = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
        time.sleep(0.1)
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=3)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert extra.recv(100).startswith(b"HTTP/1.1 503"), "a connection beyond max_clients is refused at once"
        extra.close()
        t0 = time.monotonic()
        for s in stalled:
            s.settimeout(5)
            assert s.recv(100) == b"", "a silent client is disconnected"
        assert time.monotonic() - t0 < 3, "after about web.timeout_s"
        assert get(srv.port, "/healthz")[0] == 503  # free slots again (no frame yet: 503)
    finally:
        for s in stalled:
            s.close()
        srv.stop()


def test_bad_queries_and_unknown_paths():
    srv = _server()
    try:
        assert get(srv.port, "/api/events?limit=-1")[0] == 400
        assert get(srv.port, "/api/events?after=nan")[0] == 400
        assert get(srv.port, "/api/events?" + "&".join(f"a{i}=1" for i in range(50)))[0] == 400
        assert get(srv.port, "/nope")[0] == 404
        assert get(srv.port, "/api/preview.jpg")[0] == 404  # preview off
        assert get_json(srv.port, "/api/events?limit=5") == []
    finally:
        srv.stop()


def test_without_a_password_only_ip_and_localhost_names_are_answered(password_hash):
    srv = _server(hosts='["fer-edge.local"]')
    try:
        for host in ("127.0.0.1", f"127.0.0.1:{srv.port}", f"[::1]:{srv.port}", "localhost:8090", "fer-edge.local",
                     "FER-EDGE.local.:8090"):
            assert get(srv.port, "/api/events", host=host)[0] == 200, host
        for host in ("evil.example", "evil.example:8090", "127.0.0.1.evil.example", "fer-edge.local.evil.example"):
            status, _, body = get(srv.port, "/api/events", host=host)
            assert status == 403 and b"web.hosts" in body, host
    finally:
        srv.stop()
    srv = _server(password_hash=password_hash)  # with a password the name does not matter: the password does
    try:
        assert get(srv.port, "/api/events", ("fer-edge", PASSWORD), host="fer-edge.example.org")[0] == 200
        assert get(srv.port, "/api/events", host="fer-edge.example.org")[0] == 401
    finally:
        srv.stop()


# --- a real daemon with a password, MQTT and no preview ----------------------------------------------------------

def test_daemon_endpoints_with_auth_and_no_preview(tmp_path, broker, subscriber, validator, password_hash):
    from prometheus_client.parser import text_string_to_metric_families

    _need_model()
    sub = subscriber("fer-edge/webtest/faces")
    d = Daemon(tmp_path, {"mqtt.host": broker.host, "mqtt.port": str(broker.port), "web.password_hash": password_hash,
                          "mqtt.stats_interval_s": "1"})
    auth = ("fer-edge", PASSWORD)
    try:
        d.wait_listening(auth)
        # Every path needs the password, the wrong one too.
        for path in ("/", "/app.js", "/api/state", "/api/events", "/healthz", "/metrics", "/api/preview.jpg"):
            status, headers, _ = get(d.port, path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic "), path
        for path in ("/", "/api/state", "/metrics"):
            assert get(d.port, path, ("fer-edge", "wrong"))[0] == 401, path
        events = d.wait_until(lambda: get_json(d.port, "/api/events", auth), "events on /api/events")
        d.wait_until(lambda: sub.messages, "events over MQTT")
        assert get(d.port, "/healthz", auth)[0] == 200

        for ev in events:
            errors = sorted(validator.iter_errors(ev), key=str)
            assert not errors, f"{errors[0].message} in {ev}"
        # the same events as MQTT, the same JSON
        mqtt_events = {(m["face_id"], m["type"], m["epoch"]): m for m in (json.loads(x.payload) for x in sub.messages)}
        assert events[0]["type"] == "new"
        shared = [e for e in events if (e["face_id"], e["type"], e["epoch"]) in mqtt_events]
        assert shared, (events, list(mqtt_events))
        assert all(e == mqtt_events[(e["face_id"], e["type"], e["epoch"])] for e in shared)
        last = events[-1]["epoch"]
        assert all(e["epoch"] > last for e in get_json(d.port, f"/api/events?after={last}", auth))
        assert len(get_json(d.port, "/api/events?limit=1", auth)) == 1

        state = get_json(d.port, "/api/state", auth)
        assert state["device_id"] == "webtest" and state["health"]["ok"] and state["auth"] is True
        assert state["preview"] == {"enabled": False, "fps": 5.0, "url": None}
        assert state["stats"]["model"]["version"] and state["stats"]["mqtt"]["connected"] is True
        assert state["update"]["state"] == "idle"
        # Preview off: no image endpoint, nothing image-like in the state.
        for path in ("/api/preview.jpg", "/api/preview.mjpeg"):
            status, headers, body = get(d.port, path, auth)
            assert status == 404 and headers["Content-Type"] == "application/json", path
        assert b"\xff\xd8" not in json.dumps(state).encode() and "base64" not in json.dumps(state)

        d.wait_until(lambda: get_json(d.port, "/api/state", auth)["stats"]["mqtt"]["sent"] > 0, "MQTT sent > 0")
        status, headers, body = get(d.port, "/metrics", auth)
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        value = {f.name: f.samples[0].value for f in fams.values() if len(f.samples) == 1}
        assert fams["fer_edge_frames"].type == "counter" and value["fer_edge_frames"] > 0
        assert value["fer_edge_healthy"] == 1 and value["fer_edge_source_up"] == 1
        assert value["fer_edge_mqtt_connected"] == 1 and value["fer_edge_mqtt_sent"] > 0
        # The MQTT health an operator alerts on: buffer, drops, reconnects (none in this run, but there and typed).
        assert fams["fer_edge_mqtt_buffered_events"].type == "gauge" and value["fer_edge_mqtt_buffered_events"] >= 0
        assert fams["fer_edge_mqtt_dropped_events"].type == "counter" and value["fer_edge_mqtt_dropped_events"] == 0
        assert fams["fer_edge_mqtt_reconnects"].type == "counter" and value["fer_edge_mqtt_reconnects"] >= 0
        assert fams["fer_edge_source_reconnects"].type == "counter"
        assert value["fer_edge_faces_classified"] > 0
        by_type = {s.labels["type"]: s.value for s in fams["fer_edge_events"].samples}
        assert set(by_type) == {"new", "update", "end"} and by_type["new"] >= 1
        hist = fams["fer_edge_stage_latency_seconds"]
        assert hist.type == "histogram"
        counts = {s.labels["stage"]: s.value for s in hist.samples if s.name.endswith("_count")}
        assert {"detect", "classify", "total"} <= set(counts) and counts["total"] > 0
        (model,) = fams["fer_edge_model_info"].samples
        assert model.labels["version"] == state["stats"]["model"]["version"]
        assert "process_cpu_seconds" in fams

        status, headers, page = get(d.port, "/", auth)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        for asset in ("/", "/app.js", "/style.css", "/favicon.svg"):
            body = re.sub(r'xmlns="[^"]*"', "", get(d.port, asset, auth)[2].decode())  # a namespace is no fetch
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body, re.I), f"external reference in {asset}"
    finally:
        assert d.stop() == 0, d.log()[-3000:]
    log = d.log()
    assert PASSWORD not in log and password_hash not in log and password_hash.split("$")[-1] not in log
    assert "web page on http://127.0.0.1:" in log and "password required" in log


def test_daemon_healthz_503_when_the_camera_is_down(tmp_path):
    _need_model()
    dead = f"rtsp://127.0.0.1:{free_port()}/cam"  # nothing listens there
    d = Daemon(tmp_path, {"mqtt.enabled": "false", "source.kind": "opencv", "source.uri": dead,
                          "source.reconnect_min_s": "0.2", "source.reconnect_max_s": "0.5"})
    try:
        d.wait_listening()
        status, _, body = d.wait_until(lambda: (r := get(d.port, "/healthz")) and b"reconnects" in r[2] and r,
                                       "a reason naming the source")
        assert status == 503 and b"starting: no frame yet" in body and b"disconnected" in body, body
        assert f"127.0.0.1:{dead.split(':')[2]}".encode() in body
        from prometheus_client.parser import text_string_to_metric_families

        fams = {f.name: f for f in text_string_to_metric_families(get(d.port, "/metrics")[2].decode())}
        assert fams["fer_edge_healthy"].samples[0].value == 0 and fams["fer_edge_source_up"].samples[0].value == 0
    finally:
        d.stop()


# --- a real daemon with the preview: stalled clients, the page in Chromium ---------------------------------------

@pytest.fixture(scope="module")
def preview_daemon(tmp_path_factory):
    _need_model()
    tmp = tmp_path_factory.mktemp("preview")
    # One frame of the demo clip with three faces, replayed: the faces stay in view whenever the page is loaded
    # (the clip itself has no face near its loop point). Paced at 20 fps: frames per second is then a property
    # of the loop, not of how busy the shared machine is.
    cap = cv2.VideoCapture(str(ROOT / "edge" / "data" / "demo.mp4"))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 150)
    ok, frame = cap.read()
    cap.release()
    assert ok, "cannot read frame 150 of edge/data/demo.mp4"
    (tmp / "frames").mkdir()
    cv2.imwrite(str(tmp / "frames" / "demo150.png"), frame)
    d = Daemon(tmp, {"mqtt.enabled": "false", "web.preview": "true", "source.kind": "images",
                     "source.uri": str(tmp / "frames"), "source.fps": "20", "source.flip": "horizontal",
                     "web.max_streams": "8", "web.timeout_s": "30"}, name="preview")
    d.frame = frame
    try:
        d.wait_listening()
        d.wait_until(lambda: get_json(d.port, "/api/events"), "the first event")
        yield d
    finally:
        d.stop()


def _rate(d: Daemon, seconds: float) -> float:
    """Frames per second the loop processed over ``seconds`` (from its own frame counter and uptime)."""
    s0 = get_json(d.port, "/api/state")["stats"]
    time.sleep(seconds)
    s1 = get_json(d.port, "/api/state")["stats"]
    return (s1["frames"] - s0["frames"]) / (s1["uptime_s"] - s0["uptime_s"])


def test_preview_jpeg_and_mjpeg(preview_daemon):
    d = preview_daemon
    status, headers, body = get(d.port, "/api/preview.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (480, 640, 3)
    # the picture as the daemon sees it: mirrored as configured (source.flip = "horizontal")
    diff = {name: float(np.mean(cv2.absdiff(img, ref)[40:, :])) for name, ref in
            (("flipped", cv2.flip(d.frame, 1)), ("as stored", d.frame))}
    assert diff["flipped"] < 0.5 * diff["as stored"], diff
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"GET /api/preview.mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, t0 = b"", time.monotonic()
        while time.monotonic() - t0 < 2.0:
            data += s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200") and b"multipart/x-mixed-replace; boundary=fer-edge-frame" in data
    frames = data.count(b"--fer-edge-frame\r\nContent-Type: image/jpeg")
    assert 2 <= frames <= 2.0 * 5 + 2, f"{frames} frames in 2 s with preview_fps 5"


def test_stalled_clients_do_not_slow_the_pipeline(preview_daemon):
    d = preview_daemon
    before = _rate(d, 3.0)
    stalled = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            if i % 4 == 1:
                s.sendall(b"GET /api/state HTTP/1.1\r\nHo")  # half a request, then silence
            elif i % 4 == 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /api/preview.mjpeg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # a stream nobody reads
            elif i % 4 == 3:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # a reply nobody reads, kept alive
            stalled.append(s)
        time.sleep(1.0)  # the MJPEG streams fill their socket buffers and block
        streams = [s for i, s in enumerate(stalled) if i % 4 == 2]
        assert all(s.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200" for s in streams), "the streams are streaming"
        during = _rate(d, 3.0)
        t0 = time.monotonic()
        assert get(d.port, "/healthz")[0] == 200, "the server still answers others"
        assert time.monotonic() - t0 < 2.0
    finally:
        for s in stalled:
            s.close()
    print(f"pipeline: {before:.1f} fps without, {during:.1f} fps with 20 stalled clients")
    # A loop that waited on any of these clients would stall for web.timeout_s (30 s here), i.e. run at ~0 fps:
    # half the rate is a wide margin for the noise of a shared machine.
    assert before > 3, f"frames should flow at about 20 fps, got {before:.1f}"
    assert during >= 0.5 * before, f"{during:.1f} fps with 20 stalled clients vs {before:.1f} fps without"


class _Dom(HTMLParser):
    """Collects face cards (data-face-id/data-emotion) and event rows (data-type/data-face-id) of the dumped DOM."""

    def __init__(self):
        super().__init__()
        self.faces, self.events, self.health, self._in_health = [], [], "", False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "face" in (a.get("class") or "").split():
            self.faces.append((a.get("data-face-id"), a.get("data-emotion")))
        if tag == "tr" and "data-type" in a:
            self.events.append((a["data-type"], a.get("data-face-id")))
        self._in_health = a.get("id") == "health"

    def handle_data(self, data):
        if self._in_health:
            self.health += data
            self._in_health = False


def chromium(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: sudo apt-get install chromium; .ci/run installs it)")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # helpers may outlive the browser
        # No background networking: this machine's closed network would refuse (and delay) those connections.
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def chromium_evaluate(url: str, expression: str, width: int, height: int, settle_s: float = 4.0,
                      timeout: float = 60):
    """Load ``url`` in headless Chromium emulating a phone screen (``width`` x ``height`` CSS pixels, mobile
    viewport rules) and return the value of the JavaScript ``expression``: the DevTools protocol over
    --remote-debugging-pipe (file descriptors 3 and 4, NUL-terminated JSON), so no client library is needed."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: sudo apt-get install chromium; .ci/run installs it)")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def pipes_as_3_and_4():  # runs in the child before exec; 3 and 4 are then kept open by pass_fds
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    # Chromium's helper processes may still write to the profile as the browser exits: clean up what is left.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                                pass_fds=(3, 4), preexec_fn=pipes_as_3_and_4, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        deadline, pending, serial = time.monotonic() + timeout, b"", 0

        def call(method: str, params: dict, session: str | None = None) -> dict:
            nonlocal pending, serial
            serial += 1
            os.write(to_chrome_w, json.dumps({"id": serial, "method": method, "params": params,
                                              **({"sessionId": session} if session else {})}).encode() + b"\0")
            while True:
                while b"\0" not in pending:
                    left = deadline - time.monotonic()
                    assert left > 0 and select.select([from_chrome_r], [], [], left)[0], f"Chromium: {method} timed out"
                    chunk = os.read(from_chrome_r, 65536)
                    assert chunk, f"Chromium exited during {method}"
                    pending += chunk
                raw, pending = pending.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == serial:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    return reply["result"]

        try:
            target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 2,
                                                        "mobile": True}, session)
            call("Page.navigate", {"url": url}, session)
            time.sleep(settle_s)  # the page fetches /api/state every second
            result = call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
            return result["result"].get("value")
        finally:
            try:  # a clean exit first, so that the browser's helpers end with it
                os.write(to_chrome_w, json.dumps({"id": serial + 1, "method": "Browser.close"}).encode() + b"\0")
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its process group is left
            except ProcessLookupError:
                pass
            proc.wait()
            os.close(to_chrome_w)
            os.close(from_chrome_r)


def test_page_fits_a_phone_screen(preview_daemon):
    """Issue 22: the page works on a phone. At 390x844 CSS pixels (a current phone) with mobile viewport rules:
    the viewport is the phone's width (not the 980 px desktop fallback), nothing is wider than the screen, and the
    preview, the three faces' score bars and the events are there."""
    d = preview_daemon
    d.wait_until(lambda: len(get_json(d.port, "/api/state")["faces"]) == 3, "the three faces in view")
    layout = json.loads(chromium_evaluate(f"http://127.0.0.1:{d.port}/", """JSON.stringify({
        inner: innerWidth, scroll: document.documentElement.scrollWidth,
        widest: Math.max(...[...document.querySelectorAll('body *')].filter(e => !e.closest('.scroll'))
                         .map(e => e.getBoundingClientRect().right)),
        preview: document.getElementById('preview').getBoundingClientRect().width,
        bars: document.querySelectorAll('.bars').length,
        events: document.querySelectorAll('#events tbody tr').length})""", 390, 844))
    assert layout["inner"] == 390, layout  # the viewport meta tag works
    assert layout["scroll"] <= layout["inner"] and layout["widest"] <= layout["inner"] + 0.5, layout
    assert 200 <= layout["preview"] <= 390 and layout["bars"] == 3 and layout["events"] >= 1, layout


def test_page_renders_faces_and_events_in_chromium(preview_daemon, tmp_path):
    d = preview_daemon
    url = f"http://127.0.0.1:{d.port}/"
    d.wait_until(lambda: len(get_json(d.port, "/api/state")["faces"]) == 3, "the three faces in view")
    res = chromium(["--virtual-time-budget=4000", "--dump-dom", url])
    assert res.returncode == 0, res.stderr[-2000:]
    dom = _Dom()
    dom.feed(res.stdout)
    state = get_json(d.port, "/api/state")
    events = get_json(d.port, "/api/events")
    assert dom.health == "running", res.stdout[:2000]
    assert len(dom.faces) == 3, f"face cards rendered: {dom.faces}"
    assert all(re.fullmatch(r"[0-9a-f]+-[0-9a-f]{4}", fid) and emo in LABELS for fid, emo in dom.faces), dom.faces
    known = {e["face_id"] for e in events} | {f["face_id"] for f in state["faces"]}
    assert {fid for fid, _ in dom.faces} <= known
    assert ("new", events[0]["face_id"]) in dom.events or len(dom.events) == 30, dom.events
    assert {fid for _, fid in dom.events} <= known
    assert 'id="preview"' in res.stdout and re.search(r'<img id="preview"[^>]*src="api/preview\.jpg', res.stdout)

    shot = Path(os.environ.get("FER_EDGE_WEB_SCREENSHOT") or tmp_path / "web.png")
    res = chromium(["--virtual-time-budget=4000", "--hide-scrollbars", "--window-size=1280,1100",
                    f"--screenshot={shot}", url])
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (1100, 1280)


# --- doctor ------------------------------------------------------------------------------------------------------

def test_doctor_web_check(preview_daemon, password_hash):
    from edge.doctor import FAIL, OK, SKIP, WARN, check_web

    def web(**kw):
        return load_config(None, {"web.enabled": "true", **{f"web.{k}": str(v) for k, v in kw.items()}}, env={}).web

    assert check_web(load_config(None, env={}).web).status == SKIP
    ok = check_web(web(port=preview_daemon.port), service_active=True)
    assert ok.status == OK and "ok: last frame" in ok.detail, ok.line()
    port = free_port()
    assert check_web(web(port=port)).status == OK  # free: the daemon can listen there
    assert check_web(web(port=port), service_active=True).status == FAIL  # should be listening, is not
    assert check_web(web(port=port, bind="0.0.0.0", preview="true")).status == WARN  # exposed without a password
    srv = _server(password_hash=password_hash)  # doctor has no password: "answers" is all it can tell
    try:
        locked = check_web(web(port=srv.port, password_hash=password_hash), service_active=True)
        assert locked.status == OK and "password required" in locked.detail, locked.line()
    finally:
        srv.stop()
    with socket.socket() as other:  # another program on the port, answering nothing like fer-edge
        other.bind(("127.0.0.1", port))
        other.listen()
        threading.Thread(target=lambda: other.accept()[0].sendall(b"HTTP/1.0 302 Found\r\n\r\n"), daemon=True).start()
        assert check_web(web(port=port)).status == FAIL


# --- README ------------------------------------------------------------------------------------------------------

def test_readme_web_ranges_match_validation():
    text = (ROOT / "README.md").read_text()
    start = text.index("| `[web]` key | Range | `[web]` key | Range |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for key, rng in zip(cells[0::2], cells[1::2]):
            if key:
                rows.append((key.strip("`"), re.sub(r"\s+\(.*\)$", "", rng)))
    from edge.config import _hints
    from edge.web.config import WebConfig

    hints = _hints(WebConfig)
    numeric = {f"web.{k}" for k, tp in hints.items() if tp in (int, float)}
    assert {k for k, _ in rows} == numeric, "every number of [web] has its row"

    def ok(key, value) -> bool:
        extra = {"web.max_streams": "0"} if key == "web.max_clients" else {}  # max_streams <= max_clients
        try:
            load_config(None, {key: str(value), **extra}, env={})
            return True
        except ConfigError as e:
            assert e.key == key, e
            return False

    for key, rng in rows:
        m = re.fullmatch(r"(0 or )?([\d.]+|[a-z_]+)\.\.([\d.]+|[a-z_]+)", rng)
        assert m, (key, rng)
        num = int if hints[key.split(".")[1]] is int else float
        lo, hi = (getattr(WebConfig(), v) if v[0].isalpha() else num(v) for v in (m[2], m[3]))  # a key: its default
        step = 1 if num is int else 0.01
        assert ok(key, lo) and ok(key, hi), (key, rng)
        assert not ok(key, hi + step), (key, rng)
        if m[1]:  # "0 or lo..hi"
            assert ok(key, 0) and not ok(key, lo - step), (key, rng)
        else:
            assert not ok(key, lo - step), (key, rng)
