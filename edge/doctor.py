"""``fer-edge doctor``: check everything the daemon needs and say what to fix.

Each check yields one line: ``OK``, ``WARN`` (works, but look at it), ``FAIL`` (the daemon will not work
as configured) or ``SKIP`` (not applicable here), with the fix on the same line. The exit status is 1 if
any check failed. Checks use the same modules as the daemon (edge.sources, edge.detect, edge.classify)
and a real MQTT connection, so a pass means the real thing works.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TextIO

import numpy as np

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
MIN_YEAR = 2024
SERVICE = "fer-edge.service"

# vcgencmd get_throttled bits (Raspberry Pi firmware): now (0-3) and since boot (16-19).
THROTTLE_BITS = {
    0: "under-voltage now", 1: "ARM frequency capped now", 2: "throttled now", 3: "soft temperature limit now",
    16: "under-voltage since boot", 17: "frequency capping since boot", 18: "throttling since boot",
    19: "soft temperature limit since boot",
}


@dataclass
class Check:
    """The result of one check: one output line."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<8} {self.detail}"
        return text + (f"  -> fix: {self.fix}" if self.fix and self.status != OK else "")


@dataclass
class DoctorOptions:
    """Thresholds and time limits of the checks."""

    camera_timeout_s: float = 10.0  # first frame; picamera2 needs ~1-2 s to start
    broker_timeout_s: float = 5.0
    min_free_mb: float = 100.0  # below: FAIL
    warn_free_mb: float = 500.0  # below: WARN
    temp_warn_c: float = 75.0  # Raspberry Pi firmware starts throttling at 80-85 degrees C


Runner = Callable[[list[str]], Optional[subprocess.CompletedProcess]]


def run_command(cmd: list[str], timeout: float = 5.0) -> Optional[subprocess.CompletedProcess]:
    """Run a system command quietly; None if it is not installed or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


# --- clock, disk, temperature ------------------------------------------------------------------

def check_clock(now: Optional[float] = None, run: Runner = run_command) -> Check:
    """Year >= 2024 (a Pi has no RTC: before NTP it boots with an old date) and NTP synchronisation."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    if time.gmtime(now).tm_year < MIN_YEAR:
        return Check("clock", FAIL, f"system time is {stamp}: not set",
                     "a Raspberry Pi has no battery clock: connect it to a network with NTP "
                     "(timedatectl set-ntp true; timedatectl timesync-status); events carry wrong timestamps until then")
    res = run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    synced = res.stdout.strip() if res is not None and res.returncode == 0 else ""
    if synced == "yes":
        return Check("clock", OK, f"{stamp}, NTP synchronised")
    if synced == "no":
        return Check("clock", WARN, f"{stamp}, not NTP-synchronised (yet)",
                     "check the network and `timedatectl timesync-status`; the time may jump when it syncs")
    return Check("clock", OK, f"{stamp} (NTP status unknown: no answer from timedatectl)")


def check_disk(path: str, opts: DoctorOptions) -> Check:
    """Free space on the file system holding the state directory."""
    p = Path(path)
    note = ""
    while not p.exists() and p != p.parent:
        note = f" ({path} does not exist yet: systemd creates it on the first start)"
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError as e:
        return Check("disk", WARN, f"cannot check free space of {path}: {e}")
    free_mb = usage.free / 2**20
    detail = f"{free_mb:,.0f} MB free of {usage.total / 2**30:.1f} GB on {p}{note}"
    if free_mb < opts.min_free_mb:
        return Check("disk", FAIL, detail, "free space on the SD card: sudo journalctl --vacuum-size=50M; "
                                           "sudo apt-get clean; remove old files")
    if free_mb < opts.warn_free_mb:
        return Check("disk", WARN, detail, "little space left: sudo journalctl --vacuum-size=50M; sudo apt-get clean")
    return Check("disk", OK, detail)


def parse_throttled(text: str) -> Optional[int]:
    """The flags of ``vcgencmd get_throttled`` output ("throttled=0x50005"), None if unparseable."""
    _, _, value = text.strip().partition("=")
    try:
        return int(value, 16)
    except ValueError:
        return None


def describe_throttled(flags: int) -> list[str]:
    """Human-readable names of the set throttling bits."""
    return [name for bit, name in THROTTLE_BITS.items() if flags & (1 << bit)]


def check_cpu(temp_path: str, opts: DoctorOptions, run: Runner = run_command) -> Check:
    """CPU temperature (sysfs) and Raspberry Pi throttling/under-voltage flags (vcgencmd, if present)."""
    temp = None
    try:
        with open(temp_path, encoding="ascii") as f:
            temp = int(f.read().strip()) / 1000.0
    except (OSError, ValueError):
        pass
    parts, problems, fixes = [], [], []
    if temp is not None:
        parts.append(f"{temp:.1f} C")
        if temp >= opts.temp_warn_c:
            problems.append(f"hot ({temp:.0f} C)")
            fixes.append("add a heatsink/fan or improve airflow in the enclosure")
    res = run(["vcgencmd", "get_throttled"])
    flags = parse_throttled(res.stdout) if res is not None and res.returncode == 0 else None
    if flags is not None:
        names = describe_throttled(flags)
        parts.append(f"throttled=0x{flags:x}")
        if names:
            problems.extend(names)
            if flags & 0x10001:
                fixes.append("use the official power supply (5 V 3 A for a Pi 4, 5 V 5 A for a Pi 5) and a short cable")
            if flags & 0xE000E:
                fixes.append("cool the Pi: heatsink/fan, airflow")
    if not parts:
        return Check("cpu", SKIP, f"no temperature at {temp_path} and no vcgencmd (not a Raspberry Pi?)")
    detail = ", ".join(parts)
    if problems:
        return Check("cpu", WARN, f"{detail}: {', '.join(problems)}", "; ".join(dict.fromkeys(fixes)))
    return Check("cpu", OK, detail + ("" if flags is not None else " (vcgencmd not found: throttling not checked)"))


# --- model, detector, source -----------------------------------------------------------------------

def check_model(model_cfg, state_dir: str = "", update=None) -> tuple[Check, object]:
    """Load the model the daemon would start with (an installed update whose bundle is signed by a key of
    ``update.public_keys``, else model.path, else the bundled one) and run a self-test prediction; returns
    (check, classifier or None)."""
    from edge.classify import ModelError, load_classifier
    from edge.model_store import current_model_path

    path = current_model_path(state_dir, model_cfg.path, update) if state_dir else (model_cfg.path or None)
    where = path or "bundled model"
    try:
        clf = load_classifier(path, threads=model_cfg.threads)
    except ModelError as e:
        return Check("model", FAIL, str(e), "set model.path to a .tflite with its .json manifest, or \"\" for the "
                                            "bundled model; reinstall fer-edge if the bundled one is broken"), None
    size = clf.input_size
    faces = np.stack([np.full((size, size), 128, np.uint8),
                      np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))])
    try:
        t0 = time.perf_counter()
        probs = np.asarray(clf.predict(faces))
        ms = (time.perf_counter() - t0) * 1e3 / len(faces)
    except Exception as e:  # an interpreter failure is exactly what this check is for
        return Check("model", FAIL, f"{where}: self-test prediction failed: {type(e).__name__}: {e}",
                     "the model does not run with this TFLite runtime: pip install -U ai-edge-litert"), None
    if probs.shape != (len(faces), len(clf.labels)) or not np.all(np.isfinite(probs)) \
            or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        return Check("model", FAIL, f"{where}: self-test gave invalid probabilities (shape {probs.shape})",
                     "the model file does not match its manifest: re-export it"), None
    return Check("model", OK, f"{where} v{clf.version} ({clf.sha256[:12]}), {clf.backend}, "
                              f"{len(clf.labels)} labels, {ms:.1f} ms/face{model_quality(clf.manifest)}"), clf


def model_quality(manifest: dict) -> str:
    """What the manifest says about accuracy and score calibration, for the model check's line (may be empty)."""
    m, cal = manifest.get("metrics") or {}, manifest.get("calibration") or {}
    out = ""
    if isinstance(m.get("int8_accuracy"), (int, float)):
        out += f", {m.get('val_split', 'validation')} accuracy {100 * m['int8_accuracy']:.1f}%"
    if cal.get("method") == "temperature" and isinstance(m.get("int8_ece"), (int, float)):
        out += f", scores calibrated (ECE {m['int8_ece']:.3f})"
    elif m:
        out += ", scores not calibrated (compare them, do not threshold them)"
    return out


def check_detector(detect_cfg) -> tuple[Check, object]:
    """Build the face detector the daemon would run; returns (check, detector or None).

    WARN when the bundled YuNet could not load through LiteRT and the daemon would fall back to OpenCV's runtime
    (slower) or to Haar (finds fewer faces); the line always says which detector runs and why.
    """
    from edge.detect import DetectorError, make_detector

    try:
        det = make_detector(detect_cfg)
    except DetectorError as e:
        return Check("detector", FAIL, str(e), "fix detect.model_path (\"\" = the bundled YuNet) or use "
                                               "detect.backend = \"haar\""), None
    what = (f"{det.name}: {det.reason} (detect_width {detect_cfg.detect_width}, min_face {detect_cfg.min_face}"
            + (f", score_threshold {detect_cfg.score_threshold:g})" if det.name == "yunet" else ")"))
    if det.name != detect_cfg.backend:
        if "is too old for YuNet" in det.reason and platform.machine() in ("armv7l", "armv6l"):
            # No OpenCV wheel for 32-bit ARM: pip cannot fix it there, the 64-bit OS can.
            return Check("detector", WARN, what, "install the 64-bit Raspberry Pi OS for YuNet (32-bit has only "
                                                 "Debian's OpenCV 4.6), or set detect.backend = \"haar\" to keep "
                                                 "Haar without this warning"), det
        return Check("detector", WARN, what, "reinstall fer-edge (its bundled YuNet .tflite/.onnx) and check that "
                                             "LiteRT loads (pip install ai-edge-litert), or pip install "
                                             "'opencv-python-headless>=4.10,<5' for the .onnx"), det
    if det.fallback:
        return Check("detector", WARN, what, "reinstall fer-edge: its bundled YuNet .tflite did not load, so YuNet "
                                             "runs through OpenCV at about twice the cost"), det
    return Check("detector", OK, what), det


def is_camera(source_cfg) -> bool:
    """True for sources that are a camera device (exclusive: the running daemon holds it)."""
    if source_cfg.kind == "picamera2":
        return True
    uri = source_cfg.uri.strip()
    return source_cfg.kind == "opencv" and (uri.isdigit() or uri.startswith("/dev/video"))


def _source_fix(source_cfg) -> str:
    kind, uri = source_cfg.kind, source_cfg.uri
    if kind == "picamera2":
        return ("check the ribbon cable and `rpicam-hello --list-cameras`; the daemon's user needs the video group; "
                "python3-picamera2 must be installed and the venv made with --system-site-packages")
    if is_camera(source_cfg):
        return (f"check `v4l2-ctl --list-devices` and that {uri if uri.startswith('/dev') else '/dev/video' + uri} "
                "exists and is readable (video group); try another source.uri")
    if kind == "opencv" and "://" in uri:
        return "check the stream URL, credentials and network (try it with ffplay/vlc)"
    return "check source.uri: the file/folder must exist and contain readable video/images"


def check_source(source_cfg, opts: DoctorOptions, service_active: bool = False) -> tuple[Check, object]:
    """Open the configured source and wait for one frame; returns (check, frame image or None)."""
    from edge.sources import SourceError, open_source

    if service_active and is_camera(source_cfg):
        return Check("camera", WARN, f"{source_cfg.kind} {source_cfg.uri or ''} is in use by the running fer-edge "
                                     "service, not opened".replace("  ", " "),
                     "to test the camera itself: sudo systemctl stop fer-edge; fer-edge doctor; "
                     "sudo systemctl start fer-edge"), None
    try:
        src = open_source(source_cfg)
    except (ValueError, SourceError) as e:
        return Check("camera", FAIL, f"source.kind {source_cfg.kind}: {e}", _source_fix(source_cfg)), None
    t0 = time.monotonic()
    frame = None
    try:
        src.start()
        deadline = t0 + opts.camera_timeout_s
        # "no camera" is final (libcamera lists none, no /dev/videoN): no point waiting out the timeout.
        while frame is None and time.monotonic() < deadline and not src.finished and src.status != "no camera":
            frame = src.read(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
        health = src.health()
    finally:
        src.stop()
    if frame is None:
        why = f"{health['status']}: {health['error']}" if health["error"] else "no frame"
        return Check("camera", FAIL, f"{src.name}: {why} (nothing within {opts.camera_timeout_s:g} s)"
                     if health["status"] != "no camera" else f"{src.name}: {health['error']}",
                     _source_fix(source_cfg)), None
    h, w = frame.image.shape[:2]
    detail = (f"{src.name}: {w}x{h} frame after {time.monotonic() - t0:.1f} s "
              f"(rotate {source_cfg.rotate}, flip {source_cfg.flip})")
    if source_cfg.kind == "demo":
        return Check("camera", WARN, detail + ": the bundled demo clip, not a camera",
                     "set [source] kind = \"picamera2\" (Pi camera) or kind = \"opencv\" with uri = \"0\" (USB camera)"), frame.image
    return Check("camera", OK, detail), frame.image


def check_view(image, detector, classifier) -> Check:
    """Faces and emotions in the test frame, so the aim can be judged from the doctor's output too."""
    boxes = detector.detect(image)
    if not boxes:
        return Check("view", OK, "no face in the test frame (fine if nobody is in view; check the aim with "
                                 "`fer-edge snapshot -o aim.jpg`)")
    probs = classifier.classify_faces(image, boxes)
    faces = ", ".join(f"{b.w}x{b.h} at {b.x},{b.y} {classifier.labels[int(np.argmax(p))]} {float(np.max(p)):.0%}"
                      for b, p in zip(boxes, probs))
    return Check("view", OK, f"{len(boxes)} face{'s' if len(boxes) != 1 else ''} in the test frame: {faces}")


# --- speed -------------------------------------------------------------------------------------------

# Below this many frames a second with SPEED_FACES faces in view the doctor warns: the fine search's sweep and
# the tracker's timeouts are tuned at 10 fps (edge.detect_fine), and the scene benchmark measures recall there.
MIN_FPS = 10.0
SPEED_FACES = 3
SPEED_REPS = 5  # timed repetitions after one warm-up: enough for a median, about a second on a Pi 3


def _fps(fps: float) -> str:
    return f"{fps:.1f}" if fps < 10 else f"{min(fps, 999):.0f}"  # "0 fps" would hide a 0.4 fps board


def speed_verdict(detect_ms: float, face_ms: float, dot_product: bool, small_face_ms: Optional[float] = None,
                  small_loss: Optional[float] = None, faces: int = SPEED_FACES, min_fps: float = MIN_FPS,
                  max_faces_per_frame: int = 0) -> Check:
    """The frame time this board will have with ``faces`` faces in view (detection + the faces classified in a
    frame, at most ``max_faces_per_frame`` once tracked (0 = all), one thread, as the daemon runs), and what to
    change when that is under ``min_fps``. ``small_loss``: how many accuracy points the small model gives up
    (from the two manifests)."""
    classified = min(faces, max_faces_per_frame) if max_faces_per_frame > 0 else faces
    frame = detect_ms + classified * face_ms
    fps = 1000.0 / frame if frame > 0 else float("inf")
    turns = f", {classified} classified a frame" if classified < faces else ""
    detail = (f"detect {detect_ms:.1f} ms + {face_ms:.1f} ms a face: {frame:.0f} ms a frame with {faces} faces"
              f"{turns} (about {_fps(fps)} fps)")
    if not dot_product:
        detail += "; this CPU has no int8 dot-product instruction (slower int8)"
    if fps >= min_fps:
        return Check("speed", OK, detail)
    fixes = []
    if small_face_ms is not None:
        small = detect_ms + classified * small_face_ms
        loss = f"; {small_loss:.1f} points less accurate" if small_loss is not None else ""
        fixes.append(f'model.variant = "small" ({small_face_ms:.1f} ms a face: {small:.0f} ms a frame, '
                     f'about {_fps(1000.0 / small)} fps{loss})')
    fixes.append("detect.every_n = 2 (detect every other frame)")
    if classified > 1:
        fixes.append(f"model.max_faces_per_frame = 1 (faces take turns: {detect_ms + face_ms:.0f} ms a frame)")
    fixes.append("the README's board table (Boards: settings and expected frame rate)")
    return Check("speed", WARN, f"{detail}, under {min_fps:.0f} fps", "; or ".join(fixes))


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up: the first call sets up the runtime's kernels
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def check_speed(detector, classifier, model_cfg, image=None, frame_size: tuple[int, int] = (640, 480),
                reps: int = SPEED_REPS) -> Check:
    """Time the daemon's detector on the test frame (a gray frame of the configured size when there is none) and
    the classifier on SPEED_FACES faces, on this board; WARN under MIN_FPS with the settings that help. The small
    model is timed too when it would be the fix (the bundled default model is configured)."""
    from edge.bench import cpu_simd, has_int8_dot_product
    from edge.classify import VARIANTS, ModelError, load_classifier

    if image is None:
        w, h = frame_size
        image = np.random.default_rng(0).integers(96, 160, (h, w, 3), dtype=np.uint8)
    size = classifier.input_size
    faces = np.stack([np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))] * SPEED_FACES)
    detect_ms = _median_ms(lambda: detector.detect(image), reps)
    face_ms = _median_ms(lambda: classifier.predict(faces), reps) / SPEED_FACES
    small_ms = small_loss = None
    small = VARIANTS.get("small")
    if (model_cfg.variant == "default" and not model_cfg.path and small is not None and small.is_file()
            and detect_ms + min(SPEED_FACES, model_cfg.max_faces_per_frame or SPEED_FACES) * face_ms > 1000.0 / MIN_FPS):
        try:
            other = load_classifier(small, threads=model_cfg.threads)
            batch = np.stack([np.tile(np.linspace(0, 255, other.input_size, dtype=np.uint8),
                                      (other.input_size, 1))] * SPEED_FACES)
            small_ms = _median_ms(lambda: other.predict(batch), reps) / SPEED_FACES
            accs = [(c.manifest.get("metrics") or {}).get("int8_accuracy") for c in (classifier, other)]
            if all(isinstance(a, (int, float)) for a in accs):
                small_loss = 100.0 * (accs[0] - accs[1])
        except ModelError:
            small_ms = None
    return speed_verdict(detect_ms, face_ms, has_int8_dot_product(cpu_simd()), small_ms, small_loss,
                         max_faces_per_frame=model_cfg.max_faces_per_frame)


# --- broker ------------------------------------------------------------------------------------------

def check_broker(mqtt_cfg, opts: DoctorOptions) -> Check:
    """Connect to the broker with the configured address, TLS and credentials (a throw-away client id)."""
    import paho.mqtt.client as mqtt

    c = mqtt_cfg
    where = f"mqtt{'s' if c.tls else ''}://{c.host}:{c.port}"
    if not c.enabled:
        return Check("broker", WARN, "mqtt.enabled = false: events are not published",
                     "set [mqtt] enabled = true and host/port of your broker")
    proto = mqtt.MQTTv5 if c.protocol == "5" else mqtt.MQTTv311
    # Never the daemon's client id: the broker would disconnect the running daemon.
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fer-edge-doctor-{os.getpid()}", protocol=proto)
    client.connect_timeout = opts.broker_timeout_s
    if c.username:
        client.username_pw_set(c.username, c.password or None)
    if c.tls:
        try:
            client.tls_set(ca_certs=c.ca_file or None, certfile=c.cert_file or None, keyfile=c.key_file or None)
        except (OSError, ValueError) as e:
            return Check("broker", FAIL, f"{where}: TLS setup failed: {e}", "check mqtt.ca_file, cert_file, key_file")
        client.tls_insecure_set(bool(c.tls_insecure))
    done = threading.Event()
    result: dict = {}

    def on_connect(_c, _u, _flags, reason_code, _props):
        result["rc"] = reason_code
        done.set()

    def on_disconnect(_c, _u, _flags, reason_code, _props):
        result.setdefault("rc", reason_code)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    t0 = time.monotonic()
    try:
        client.connect(c.host, c.port, keepalive=max(5, int(opts.broker_timeout_s) * 2))
    except socket.gaierror:
        return Check("broker", FAIL, f"{where}: cannot resolve host name {c.host!r}",
                     "fix mqtt.host (name or IP of the broker)")
    except ConnectionRefusedError:
        return Check("broker", FAIL, f"{where}: connection refused",
                     "is the broker running? (sudo apt install mosquitto; systemctl status mosquitto) "
                     "and are mqtt.host/mqtt.port right?")
    except (socket.timeout, TimeoutError):
        return Check("broker", FAIL, f"{where}: connection timed out after {opts.broker_timeout_s:g} s",
                     "check the network path and firewall to the broker, and mqtt.host")
    except OSError as e:  # includes ssl.SSLError
        return Check("broker", FAIL, f"{where}: {e.strerror or e}",
                     "check mqtt.tls/ca_file and that the port is the right (TLS or plain) listener" if c.tls
                     else "check mqtt.host/mqtt.port and the network")
    client.loop_start()
    try:
        answered = done.wait(opts.broker_timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    ms = (time.monotonic() - t0) * 1e3
    rc = result.get("rc")
    if not answered or rc is None:
        return Check("broker", FAIL, f"{where}: TCP connected but no MQTT answer within {opts.broker_timeout_s:g} s",
                     "is this port an MQTT listener (TLS vs plain: mqtt.tls)?")
    if rc.is_failure:
        value = getattr(rc, "value", None)
        if value in (134, 135, 140):
            who = f"user {c.username!r}" if c.username else "anonymous clients"
            return Check("broker", FAIL, f"{where}: refused {who}: {rc}",
                         "set mqtt.username/mqtt.password to an account of the broker (mosquitto_passwd), "
                         "or allow it in the broker's ACL/allow_anonymous")
        return Check("broker", FAIL, f"{where}: connection refused by the broker: {rc}",
                     "see the broker's log; check mqtt.protocol and mqtt.client_id")
    who = f" as {c.username!r}" if c.username else ""
    return Check("broker", OK, f"{where}: connected{who} in {ms:.0f} ms (MQTT {c.protocol})")


# --- web page ----------------------------------------------------------------------------------------

def check_web(web_cfg, service_active: bool = False, timeout_s: float = 3.0) -> Check:
    """With [web] enabled: the running daemon answers /healthz, or the port is free for it; exposure warnings."""
    import http.client

    w = web_cfg
    if not w.enabled:
        return Check("web", SKIP, "web.enabled = false: no web page, /metrics or /healthz")
    host = "127.0.0.1" if w.bind in ("0.0.0.0", "localhost") else ("::1" if w.bind == "::" else w.bind)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{w.port}/"
    exposed = "" if w.loopback else (
        f"; on {w.bind} without a password anyone on the network can see "
        f"{'the camera picture' if w.preview else 'faces and events'}" if not w.auth else "")
    fix_exposed = "set web.password_hash (python3 -m edge.web.auth) or bind 127.0.0.1 and use an SSH tunnel"
    conn = http.client.HTTPConnection(host, w.port, timeout=timeout_s)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        body = resp.read(500).decode("utf-8", "replace").strip()
    except ConnectionRefusedError:
        if service_active:
            return Check("web", FAIL, f"{url}: connection refused although fer-edge.service is running",
                         "see the daemon's log for the web line: journalctl -u fer-edge -e")
        try:  # nothing answers: can the daemon listen there when it starts?
            with socket.socket(socket.AF_INET6 if ":" in w.bind else socket.AF_INET) as s:
                s.bind((w.bind, w.port))
        except OSError as e:
            return Check("web", FAIL, f"cannot listen on {w.bind}:{w.port}: {e.strerror or e}",
                         "choose another web.port (another program uses it) or fix web.bind")
        return Check("web", WARN if exposed else OK, f"{url}: port free, the daemon will listen there{exposed}",
                     fix_exposed)
    except OSError as e:  # timeout, unreachable
        return Check("web", FAIL, f"{url}: {e.strerror or e}", "is the daemon hung? journalctl -u fer-edge -e")
    finally:
        conn.close()
    if resp.status == 401:
        return Check("web", WARN if exposed else OK, f"{url}: answers, password required (web.username "
                                                      f"{w.username!r}){exposed}", fix_exposed)
    if resp.status == 200:
        return Check("web", WARN if exposed else OK, f"{url}: {body}{exposed}", fix_exposed)
    if resp.status == 503:
        return Check("web", FAIL, f"{url}: /healthz {resp.status}: {body}",
                     "the daemon runs but no frames flow: see the source line above and journalctl -u fer-edge -e")
    return Check("web", FAIL, f"{url}: /healthz answered HTTP {resp.status}: is this fer-edge's port?",
                 "another program may use web.port; choose another")


# --- service -----------------------------------------------------------------------------------------

def service_state(run: Runner = run_command) -> Optional[dict[str, str]]:
    """``systemctl show`` properties of fer-edge.service, None where systemd is not running or it is unknown."""
    if not os.path.isdir("/run/systemd/system"):
        return None
    res = run(["systemctl", "show", SERVICE, "-p", "LoadState,ActiveState,SubState,UnitFileState,NRestarts,Result"])
    if res is None or res.returncode != 0:
        return None
    props = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return props


def check_service(props: Optional[dict[str, str]]) -> Check:
    """Is the systemd service installed, enabled and running without restarts?"""
    if props is None:
        return Check("service", SKIP, "systemd not running here: service state not checked")
    if props.get("LoadState") == "not-found":
        return Check("service", SKIP, "fer-edge.service is not installed (sudo fer-edge install-service)")
    active, sub = props.get("ActiveState", "?"), props.get("SubState", "?")
    enabled = props.get("UnitFileState", "?")
    restarts = int(props.get("NRestarts", "0") or 0)
    detail = f"fer-edge.service {active} ({sub}), {enabled}, {restarts} restart{'s' if restarts != 1 else ''}"
    if active == "failed":
        return Check("service", FAIL, f"{detail}, result {props.get('Result', '?')}",
                     "see why: journalctl -u fer-edge -e; then sudo systemctl restart fer-edge")
    if active != "active":
        return Check("service", WARN, detail, "start it: sudo systemctl enable --now fer-edge")
    if restarts:
        return Check("service", WARN, detail, "it crashed or hung before: journalctl -u fer-edge -b")
    if enabled != "enabled":
        return Check("service", WARN, detail, "it will not start on boot: sudo systemctl enable fer-edge")
    return Check("service", OK, detail)


# --- all -------------------------------------------------------------------------------------------

def run_doctor(cfg, opts: Optional[DoctorOptions] = None, out: Optional[TextIO] = None,
               run: Runner = run_command) -> int:
    """Run every check for ``cfg`` (a loaded edge.config.Config), print one line each; 1 if any FAIL, else 0."""
    import sys

    opts = opts or DoctorOptions()
    out = out or sys.stdout
    results: list[Check] = []

    def emit(check: Check) -> None:
        results.append(check)
        print(check.line(), file=out, flush=True)

    emit(Check("config", OK, cfg.path or "no config file: built-in defaults"))
    props = service_state(run)
    emit(check_service(props))
    emit(check_clock(run=run))
    emit(check_disk(cfg.device.state_dir, opts))
    emit(check_cpu(cfg.service.cpu_temp_path, opts, run))
    model_check, classifier = check_model(cfg.model, cfg.device.state_dir, cfg.update)
    emit(model_check)
    det_check, detector = check_detector(cfg.detect)
    emit(det_check)
    active = bool(props) and props.get("ActiveState") in ("active", "activating", "reloading")
    src_check, image = check_source(cfg.source, opts, service_active=active)
    emit(src_check)
    if image is not None and detector is not None and classifier is not None:
        try:
            emit(check_view(image, detector, classifier))
        except Exception as e:  # the pipeline failing on a real frame is a finding, not a crash
            emit(Check("view", FAIL, f"detect/classify failed on the test frame: {type(e).__name__}: {e}",
                       "report this with the frame: fer-edge snapshot -o frame.jpg"))
    if detector is not None and classifier is not None:
        try:
            emit(check_speed(detector, classifier, cfg.model, image, (cfg.source.width, cfg.source.height)))
        except Exception as e:  # timing must not take the rest of the report down
            emit(Check("speed", WARN, f"could not time the pipeline: {type(e).__name__}: {e}"))
    emit(check_broker(cfg.mqtt, opts))
    emit(check_web(cfg.web, service_active=active))
    counts = {s: sum(1 for r in results if r.status == s) for s in (OK, WARN, FAIL, SKIP)}
    print(f"doctor: {counts[OK]} ok, {counts[WARN]} warning{'s' if counts[WARN] != 1 else ''}, {counts[FAIL]} failed"
          + (f", {counts[SKIP]} skipped" if counts[SKIP] else ""), file=out, flush=True)
    return 1 if counts[FAIL] else 0
