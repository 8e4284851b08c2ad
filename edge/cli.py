"""``fer-edge`` command line: run the daemon, a self-contained demo, one-off predictions, an event listener.

Every user error ends in one clear line on stderr and exit status 2 (1 for runtime failures such as an
unreachable broker or unreadable images); never a traceback. More commands plug in without editing
this file: any module ``edge/cmd_<name>.py`` that defines ``register(subparsers)`` (adding its own
sub-parser with ``set_defaults(func=handler)``, ``handler(args) -> int``) is picked up automatically.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import edge

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Built-in defaults of `fer-edge demo`; kept equal to config/demo.toml (a test checks it).
DEMO_SETTINGS: dict[str, str] = {
    "device.id": "demo",
    "source.kind": "demo",
    "source.realtime": "true",
    "source.loop": "false",
    "detect.backend": "haar",
    "track.min_hits": "2",
    "track.max_missed_s": "0.5",
    "track.update_interval_s": "2.0",
    "mqtt.stats_interval_s": "2.0",
    "service.log_stats_interval_s": "0",
}


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status ``code``."""

    def __init__(self, msg: str, code: int = EXIT_USAGE):
        super().__init__(msg)
        self.code = code


# --- logging -------------------------------------------------------------------------------------

class _JournalFormatter(logging.Formatter):
    """journald adds its own timestamps; a "<N>" prefix sets the syslog priority (SyslogLevelPrefix)."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {record.getMessage()}"


def _under_journald(env: Mapping[str, str]) -> bool:
    """True if stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode of it)."""
    stream = env.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        dev, ino = stream.split(":")
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError, AttributeError):
        return True  # cannot check: trust the variable


def setup_logging(level: str = "INFO", env: Mapping[str, str] | None = None) -> None:
    """One-line log records on stderr; without timestamps under systemd's journal."""
    env = os.environ if env is None else env
    handler = logging.StreamHandler(sys.stderr)
    if _under_journald(env):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


# --- config helpers --------------------------------------------------------------------------------

def add_config_args(p: argparse.ArgumentParser, verbose_help: str = "debug logging") -> None:
    """The -c/--config, --set and -v options every config-reading sub-command shares."""
    p.add_argument("-c", "--config", metavar="FILE",
                   help="TOML config file (default: $FER_EDGE_CONFIG, else /etc/fer-edge/config.toml if present)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set mqtt.host=broker.local (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


def _overrides(args: argparse.Namespace, flag_map: Mapping[str, str] = {}) -> dict[str, str]:
    """--set items, then dedicated flags (flag attribute -> dotted key), later ones winning."""
    from edge.config import parse_set_option

    out = {}
    for item in args.sets:
        key, value = parse_set_option(item)
        out[key] = value
    for attr, key in flag_map.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def _load(args: argparse.Namespace, overrides: dict[str, str], base: Mapping[str, str] | None = None):
    """Config for a command -> (cfg, path, overrides); ``base`` are command defaults below the file (the demo's)."""
    from edge.config import find_config_path, load_config

    # The demo must not pick up the appliance's /etc config (its camera source etc.): only an explicit -c.
    path = getattr(args, "config", None) if base else find_config_path(getattr(args, "config", None))
    return load_config(path, overrides, base=base), path, overrides


def _source_flags(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """--source-uri without a kind: pick opencv/images from the URI so `run --source-uri 0` just works."""
    if getattr(args, "source_uri", None) and "source.kind" not in overrides:
        uri = args.source_uri
        overrides["source.kind"] = "images" if (Path(uri).is_dir() or any(c in uri for c in "*?[")) else "opencv"


# --- run ---------------------------------------------------------------------------------------------

RUN_FLAGS = {"source_kind": "source.kind", "source_uri": "source.uri", "mqtt_host": "mqtt.host",
             "mqtt_port": "mqtt.port", "device_id": "device.id", "max_frames": "service.max_frames",
             "duration": "service.duration_s", "print_events": "service.print_events"}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-kind", choices=["demo", "opencv", "images", "picamera2"], help="source.kind")
    p.add_argument("--source-uri", metavar="URI", help="source.uri (camera index, /dev/videoN, URL, file, folder)")
    p.add_argument("--mqtt-host", metavar="HOST", help="mqtt.host")
    p.add_argument("--mqtt-port", metavar="PORT", help="mqtt.port")
    p.add_argument("--device-id", metavar="ID", help="device.id (default: hostname)")
    p.add_argument("--max-frames", metavar="N", help="stop after N frames (service.max_frames)")
    p.add_argument("--duration", metavar="SECONDS", help="stop after this many seconds (service.duration_s)")
    p.add_argument("--print-events", action="store_const", const=True, default=None,
                   help="also print every event as a JSON line on stdout")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT, a limit, or the end of a finite source."""
    overrides = _overrides(args, RUN_FLAGS)
    _source_flags(args, overrides)
    if args.verbose:  # an override, so a SIGHUP reload keeps it
        overrides["service.log_level"] = "DEBUG"
    cfg, path, merged = _load(args, overrides)
    setup_logging(cfg.service.log_level)
    log.info("fer-edge %s starting (config %s)", edge.__version__, path or "built-in defaults")
    from edge.service import Service

    return Service(cfg, overrides=merged).run()


# --- config ------------------------------------------------------------------------------------------

def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (TOML) or just check it."""
    from edge.config import to_toml

    cfg, path, _ = _load(args, _overrides(args))
    if args.check:
        print(f"{path or 'built-in defaults'}: OK")
        return EXIT_OK
    if cfg.mqtt.password:
        cfg.mqtt.password = "***"
    print(f"# effective configuration ({path or 'built-in defaults'} + environment + command line)")
    print(to_toml(cfg))
    return EXIT_OK


# --- demo --------------------------------------------------------------------------------------------

def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LocalBroker:
    """A throw-away broker for the demo: mosquitto if installed, else an embedded amqtt."""

    def __init__(self):
        self.kind = None
        self.port = None
        self._proc = None
        self._tmp = None
        self._amqtt = None

    def start(self) -> bool:
        return self._start_mosquitto() or self._start_amqtt()

    def _start_mosquitto(self) -> bool:
        import shutil
        import subprocess
        import tempfile

        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
        if not exe:
            return False
        self.port = _free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fer-edge-demo-")
        conf = Path(self._tmp.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._wait_ready():
            self.kind = "mosquitto"
            return True
        self.stop()
        return False

    def _start_amqtt(self) -> bool:
        import asyncio
        import threading

        try:
            from amqtt.broker import Broker
        except ImportError:
            return False
        # amqtt logs every bare TCP probe (our readiness check) as an ERROR: keep the demo's output readable.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        self.port = _free_port()
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                  "sys_interval": 0, "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
                  "topic-check": {"enabled": False}}
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve():
            asyncio.set_event_loop(loop)
            try:
                broker = Broker(config, loop=loop) if "loop" in Broker.__init__.__code__.co_varnames else Broker(config)
                loop.run_until_complete(broker.start())
                self._amqtt = (loop, broker)
            except BaseException as e:  # any amqtt version mismatch: fall back to no broker
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()

        threading.Thread(target=serve, name="amqtt", daemon=True).start()
        started.wait(10)
        if failure or not self._wait_ready():
            log.warning("embedded amqtt broker failed to start: %s", failure[0] if failure else "timeout")
            return False
        self.kind = "amqtt"
        return True

    def _wait_ready(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return False
            if _port_open("127.0.0.1", self.port, 0.2):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except Exception:
                self._proc.kill()
            self._proc = None
        if self._amqtt is not None:
            import asyncio

            loop, broker = self._amqtt
            try:
                asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(5)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
            self._amqtt = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _make_client(mcfg, client_id: str):
    """A paho client (callback API v2) configured from an MqttConfig: protocol, credentials, TLS."""
    import paho.mqtt.client as mqtt

    proto = mqtt.MQTTv5 if str(mcfg.protocol) == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
    if mcfg.username:
        client.username_pw_set(mcfg.username, mcfg.password or None)
    if mcfg.tls:
        client.tls_set(ca_certs=mcfg.ca_file or None, certfile=mcfg.cert_file or None,
                       keyfile=mcfg.key_file or None)
        client.tls_insecure_set(bool(mcfg.tls_insecure))
    return client


class EventPrinter:
    """Turns event payloads into readable lines and keeps a per-face summary."""

    def __init__(self, out=None, t0: float | None = None):
        self.out = out or sys.stdout
        self.t0 = t0
        self.counts: dict[str, int] = {}
        self.ended: list[dict] = []
        self.faces: set[str] = set()
        self.received = 0

    def line(self, ev: dict) -> str:
        t = ev.get("epoch", time.time())
        when = f"{t - self.t0:6.1f}s" if self.t0 is not None else time.strftime("%H:%M:%S", time.localtime(t))
        b = ev.get("bbox", {})
        head = f"{when}  {ev.get('device_id', '?')}  face {ev.get('face_id', '?'):<8} {ev.get('type', '?'):<6}"
        if ev.get("type") == "end":
            s = ev.get("summary") or {}
            share = (s.get("time_share") or {}).get(s.get("dominant"), 0.0)
            return (f"{head} after {ev.get('duration_s', 0):.1f}s: mostly {s.get('dominant', '?')} "
                    f"({share:.0%} of the time), {s.get('frames', '?')} frames")
        top = sorted((ev.get("scores") or {}).items(), key=lambda kv: -kv[1])[1:3]
        others = ", ".join(f"{k} {v:.0%}" for k, v in top)
        return (f"{head} {ev.get('emotion', '?'):<9} {ev.get('confidence', 0):4.0%}  ({others})  "
                f"at {b.get('x')},{b.get('y')} {b.get('w')}x{b.get('h')}")

    def __call__(self, ev: dict) -> None:
        self.received += 1
        self.counts[ev.get("type", "?")] = self.counts.get(ev.get("type", "?"), 0) + 1
        self.faces.add(ev.get("face_id", "?"))
        if ev.get("type") == "end":
            self.ended.append(ev)
        print(self.line(ev), file=self.out, flush=True)

    def summary(self) -> str:
        parts = [f"{self.received} events from {len(self.faces)} faces "
                 f"(new {self.counts.get('new', 0)}, update {self.counts.get('update', 0)}, "
                 f"end {self.counts.get('end', 0)})"]
        dominant: dict[str, int] = {}
        for ev in self.ended:
            d = (ev.get("summary") or {}).get("dominant", "?")
            dominant[d] = dominant.get(d, 0) + 1
        if dominant:
            parts.append("dominant emotions: " + ", ".join(f"{k} {v}" for k, v in sorted(dominant.items(),
                                                                                          key=lambda kv: -kv[1])))
        return "; ".join(parts)


DEMO_FLAGS = {"mqtt_host": "mqtt.host", "mqtt_port": "mqtt.port", "max_frames": "service.max_frames",
              "duration": "service.duration_s"}


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline on the bundled clip and print the events it receives back over MQTT."""
    overrides = _overrides(args, DEMO_FLAGS)
    if args.no_mqtt:
        overrides["mqtt.enabled"] = "false"
    cfg, path, merged = _load(args, overrides, base=DEMO_SETTINGS)
    setup_logging("DEBUG" if args.verbose else "WARNING")
    from edge.service import Service

    broker = None
    if cfg.mqtt.enabled and not _port_open(cfg.mqtt.host, cfg.mqtt.port):
        explicit = {"mqtt.host", "mqtt.port"} & set(overrides) or (path is not None)
        broker = _LocalBroker()
        if broker.start():
            print(f"demo: no broker at {cfg.mqtt.host}:{cfg.mqtt.port}; started {broker.kind} on 127.0.0.1:"
                  f"{broker.port}", flush=True)
            cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", broker.port
        else:
            hint = "" if explicit else " (install mosquitto, or `pip install fer-edge[demo]` for an embedded broker)"
            print(f"demo: no broker at {cfg.mqtt.host}:{cfg.mqtt.port} and none could be started{hint}; "
                  "running without MQTT, printing events directly", flush=True)
            cfg.mqtt.enabled = False
            broker = None
    printer = EventPrinter(t0=time.time())
    sub = None
    try:
        if cfg.mqtt.enabled:
            topic = f"{cfg.mqtt.prefix}/{cfg.device.id}/faces"
            sub = _subscribe(cfg.mqtt, [topic], lambda _t, payload: _print_payload(printer, payload),
                             client_id=f"fer-edge-demo-listener-{os.getpid()}")
            print(f"demo: pipeline on the bundled clip, events via mqtt://{cfg.mqtt.host}:{cfg.mqtt.port}/{topic}",
                  flush=True)
            service = Service(cfg, overrides=merged, base=DEMO_SETTINGS)
        else:
            service = Service(cfg, overrides=merged, base=DEMO_SETTINGS, event_sink=printer)
        rc = service.run()
        produced = sum(service.counts.values())
        if sub is not None:  # give the last events time to come back from the broker
            deadline = time.monotonic() + 3.0
            while printer.received < produced and time.monotonic() < deadline:
                time.sleep(0.05)
        secs = time.time() - printer.t0
        print(f"demo finished: {service.frames} frames in {secs:.1f}s ({service.frames / max(secs, 1e-6):.1f} fps); "
              f"{produced} events produced, {printer.summary()}", flush=True)
        truth = _demo_truth(service.source.frames if service.source is not None else service.frames) \
            if cfg.source.kind == "demo" else ""
        if truth:
            print(f"clip ground truth (FER-2013 labels of the faces shown): {truth}", flush=True)
        return rc
    finally:
        if sub is not None:
            sub.loop_stop()
            sub.disconnect()
        if broker is not None:
            broker.stop()


def _demo_truth(frames_played: int) -> str:
    """The demo clip's labelled faces that appeared in the frames played, e.g. "face 1 happy -> surprise"."""
    try:
        from edge.sources import DEMO_CLIP

        meta = json.loads(DEMO_CLIP.with_suffix(".json").read_text())
        by_track: dict[int, list[str]] = {}
        for f in meta["faces"]:
            if f["frames"][0] < frames_played:
                by_track.setdefault(int(f["track"]), []).append(f["class"])
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return ""
    return ", ".join(f"face {t} {' -> '.join(c)}" for t, c in sorted(by_track.items()))


def _print_payload(printer: EventPrinter, payload: bytes) -> None:
    try:
        ev = json.loads(payload)
    except ValueError:
        print(f"(unparseable message: {payload[:80]!r})", flush=True)
        return
    printer(ev)


def _subscribe(mcfg, topics: list[str], on_message: Callable[[str, bytes], None], client_id: str,
               timeout: float = 5.0):
    """Connect, subscribe to ``topics`` and wait for the SUBACK; UserError(code 1) if the broker is unreachable."""
    import threading

    client = _make_client(mcfg, client_id)
    subscribed = threading.Event()
    failure: list[str] = []

    def on_connect(c, _u, _flags, reason_code, _props):
        if reason_code.is_failure:
            failure.append(str(reason_code))
            subscribed.set()
            return
        c.subscribe([(t, 1) for t in topics])

    def on_subscribe(_c, _u, _mid, _codes, _props):
        subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = lambda _c, _u, msg: on_message(msg.topic, msg.payload)
    try:
        client.connect(mcfg.host, mcfg.port, keepalive=mcfg.keepalive)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot connect to MQTT broker at {mcfg.host}:{mcfg.port}: {e}", EXIT_FAIL) from None
    client.loop_start()
    if not subscribed.wait(timeout) or failure:
        client.loop_stop()
        why = failure[0] if failure else "no answer"
        raise UserError(f"MQTT broker at {mcfg.host}:{mcfg.port} refused the subscription: {why}", EXIT_FAIL)
    return client


# --- predict -------------------------------------------------------------------------------------------

def cmd_predict(args: argparse.Namespace) -> int:
    """Faces and emotions in still images."""
    import cv2
    import numpy as np

    from edge.classify import load_classifier
    from edge.detect import Box, make_detector
    from edge.preprocess import crop_face, inner_box

    overrides = _overrides(args)
    if args.model:
        overrides["model.path"] = args.model
    cfg, _, _ = _load(args, overrides)
    setup_logging("DEBUG" if args.verbose else "WARNING")
    from edge.model_store import current_model_path

    model = args.model or current_model_path(cfg.device.state_dir, cfg.model.path)
    clf = load_classifier(model, threads=cfg.model.threads)
    detector = make_detector(cfg.detect)
    annotate_dir = None
    if args.annotate and len(args.images) > 1:
        annotate_dir = Path(args.annotate)
        annotate_dir.mkdir(parents=True, exist_ok=True)

    failed = 0
    for path in args.images:
        image = cv2.imread(path, cv2.IMREAD_COLOR) if Path(path).is_file() else None
        if image is None:
            why = "file not found" if not Path(path).exists() else "not a readable image"
            print(f"error: {path}: {why}", file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps({"image": path, "error": why}), flush=True)
            failed += 1
            continue
        h, w = image.shape[:2]
        whole = args.whole
        boxes = [] if whole else detector.detect(image)
        if not boxes and (whole or max(h, w) <= 2 * cfg.detect.min_face):
            # An already-cropped face (e.g. a 48x48 FER image): classify the whole image as framed.
            ib = inner_box(min(h, w), clf.margin)
            boxes, whole = [Box(int(round(ib.x)), int(round(ib.y)), int(round(ib.w)), int(round(ib.h)))], True
        probs = clf.predict(np.stack([crop_face(image, b, clf.input_size, clf.margin) for b in boxes]),
                            flip_average=cfg.model.flip_average) if boxes else np.zeros((0, len(clf.labels)), np.float32)
        faces = []
        for b, p in zip(boxes, probs):
            k = int(np.argmax(p))
            faces.append({"bbox": {"x": b.x, "y": b.y, "w": b.w, "h": b.h}, "emotion": clf.labels[k],
                          "confidence": round(float(p[k]), 4),
                          "scores": {lab: round(float(v), 4) for lab, v in zip(clf.labels, p)}})
        result = {"image": path, "width": w, "height": h, "whole_image": whole, "faces": faces,
                  "model": {"version": clf.version, "sha256": clf.sha256}}
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{path}: {len(faces)} face{'s' if len(faces) != 1 else ''}"
                  + (" (whole image classified as one face)" if whole else ""), flush=True)
            for i, f in enumerate(faces, 1):
                b = f["bbox"]
                rest = sorted(f["scores"].items(), key=lambda kv: -kv[1])[1:3]
                print(f"  #{i} at {b['x']},{b['y']} {b['w']}x{b['h']}: {f['emotion']} {f['confidence']:.0%}"
                      f"  ({', '.join(f'{k} {v:.0%}' for k, v in rest)})", flush=True)
            if not faces:
                print("  no face found (for a pre-cropped face try --whole)", flush=True)
        if args.annotate:
            out = annotate_dir / f"{Path(path).stem}_annotated.png" if annotate_dir else Path(args.annotate)
            if not _annotate(image, faces, out):
                print(f"error: {out}: cannot write annotated image", file=sys.stderr, flush=True)
                failed += 1
    return EXIT_FAIL if failed else EXIT_OK


def _annotate(image, faces: list[dict], out: Path) -> bool:
    import cv2

    img = image.copy()
    thick = max(1, round(max(img.shape[:2]) / 320))
    for f in faces:
        b = f["bbox"]
        cv2.rectangle(img, (b["x"], b["y"]), (b["x"] + b["w"], b["y"] + b["h"]), (0, 255, 0), thick)
        label = f"{f['emotion']} {f['confidence']:.0%}"
        cv2.putText(img, label, (b["x"], max(12, b["y"] - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick,
                    (0, 255, 0), thick, cv2.LINE_AA)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return bool(cv2.imwrite(str(out), img))
    except (OSError, cv2.error):
        return False


# --- listen --------------------------------------------------------------------------------------------

class DeviceBoard:
    """Live per-device view for `listen --device +`: who is online, which faces are in view."""

    def __init__(self):
        self.devices: dict[str, dict[str, Any]] = {}

    def _dev(self, device: str) -> dict[str, Any]:
        return self.devices.setdefault(device, {"status": "?", "faces": {}, "events": 0})

    def status(self, device: str, status: str) -> None:
        self._dev(device)["status"] = status
        if status == "offline":
            self._dev(device)["faces"].clear()

    def event(self, ev: dict) -> None:
        d = self._dev(ev.get("device_id", "?"))
        d["events"] += 1
        if d["status"] == "?":
            d["status"] = "online"
        if ev.get("type") == "end":
            d["faces"].pop(ev.get("face_id"), None)
        else:
            d["faces"][ev.get("face_id")] = (ev.get("emotion", "?"), float(ev.get("confidence", 0.0)))

    def line(self, device: str) -> str:
        d = self._dev(device)
        faces = ", ".join(f"{fid} {emo} {conf:.0%}" for fid, (emo, conf) in d["faces"].items())
        return (f"  = {device} [{d['status']}]: {len(d['faces'])} in view"
                + (f" ({faces})" if faces else "") + f", {d['events']} events")


LISTEN_FLAGS = {"host": "mqtt.host", "port": "mqtt.port", "prefix": "mqtt.prefix"}


def cmd_listen(args: argparse.Namespace) -> int:
    """Subscribe to face events (and device status) and print them."""
    import threading

    cfg, _, _ = _load(args, _overrides(args, LISTEN_FLAGS))
    setup_logging("DEBUG" if args.verbose else "WARNING")
    mcfg = cfg.mqtt
    device = args.device
    if any(c in device for c in "/#") or ("+" in device and device != "+"):
        raise UserError(f"--device: expected a device id or '+' for all devices (got {device!r})")
    faces_topic = f"{mcfg.prefix}/{device}/faces"
    status_topic = f"{mcfg.prefix}/{device}/status"
    printer = EventPrinter()
    board = DeviceBoard()
    done = threading.Event()
    lock = threading.Lock()
    received = [0]

    def on_message(topic: str, payload: bytes) -> None:
        with lock:
            dev = topic.split("/")[-2] if topic.count("/") >= 2 else "?"
            if topic.endswith("/status"):
                text = payload.decode("utf-8", "replace")
                board.status(dev, text)
                print(json.dumps({"device_id": dev, "status": text}) if args.json else f"{dev} is {text}",
                      flush=True)
                return
            try:
                ev = json.loads(payload)
            except ValueError:
                print(f"warning: {topic}: not JSON: {payload[:80]!r}", file=sys.stderr, flush=True)
                return
            if args.json:
                print(json.dumps(ev, separators=(",", ":")), flush=True)
            else:
                printer(ev)
            if device == "+":
                board.event(ev)
                if not args.json:
                    print(board.line(ev.get("device_id", dev)), flush=True)
            received[0] += 1
            if args.count and received[0] >= args.count:
                done.set()

    client = _subscribe(mcfg, [faces_topic, status_topic], on_message,
                        client_id=f"fer-edge-listen-{os.getpid()}")
    # On stderr, so --json output stays pure; scripts can wait for this line.
    print(f"listening on mqtt://{mcfg.host}:{mcfg.port}/{faces_topic} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        finished = done.wait(args.timeout if args.timeout else None)
    except KeyboardInterrupt:
        finished = True
    finally:
        client.loop_stop()
        client.disconnect()
    if args.count and not finished:
        print(f"listen: timed out after {args.timeout:g}s with {received[0]} of {args.count} events",
              file=sys.stderr, flush=True)
        return EXIT_FAIL
    return EXIT_OK


# --- version -------------------------------------------------------------------------------------------

def cmd_version(args: argparse.Namespace) -> int:
    """Versions of fer-edge, its main dependencies and the bundled model."""
    import platform

    print(f"fer-edge {edge.__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    for mod, name in (("numpy", "numpy"), ("cv2", "opencv"), ("paho.mqtt", "paho-mqtt"),
                      ("ai_edge_litert", "ai-edge-litert")):
        try:
            m = importlib.import_module(mod)
            print(f"{name} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{name} not installed")
    try:
        from edge.classify import DEFAULT_MODEL, read_manifest, sha256_file

        man = read_manifest(DEFAULT_MODEL)
        print(f"model {DEFAULT_MODEL.name} v{man['version']} sha256 {sha256_file(DEFAULT_MODEL)[:12]}… "
              f"labels {','.join(man['labels'])}")
    except Exception as e:
        print(f"model: unavailable ({e})")
    return EXIT_OK


# --- parser and entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer-edge", description="Facial-emotion-recognition appliance: camera -> faces -> emotions -> MQTT.")
    parser.add_argument("--version", action="version", version=f"fer-edge {edge.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="run the daemon (what the systemd service starts)",
                       description="Run the daemon until SIGTERM/SIGINT (or the end of a finite source). "
                                   "SIGHUP reloads the config file.")
    add_config_args(p)
    _add_run_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="whole pipeline on the bundled clip, printing the events it receives",
                       description="Runs the daemon on the bundled demo clip. Uses the configured broker if "
                                   "reachable, else starts mosquitto (or an embedded amqtt) on a free port, "
                                   "else runs without MQTT.")
    add_config_args(p)
    p.add_argument("--mqtt-host", metavar="HOST", help="use this broker")
    p.add_argument("--mqtt-port", metavar="PORT", help="broker port")
    p.add_argument("--no-mqtt", action="store_true", help="do not use MQTT at all; print events directly")
    p.add_argument("--max-frames", metavar="N", help="stop after N frames")
    p.add_argument("--duration", metavar="SECONDS", help="stop after this many seconds")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("predict", help="faces and emotions in image files",
                       description="Detect faces in each image and classify their emotions. Images that cannot "
                                   "be read are reported and skipped; exit status 1 if any failed.")
    add_config_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    p.add_argument("--annotate", metavar="OUT", help="write an annotated copy (a directory if several images)")
    p.add_argument("--model", metavar="PATH", help="model .tflite (default: config model.path / bundled)")
    p.add_argument("--whole", action="store_true",
                   help="skip detection: treat each image as one already-cropped face (like FER-2013 images)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("listen", help="subscribe to face events and print them",
                       description="Prints events from <prefix>/<device>/faces and status changes. Broker "
                                   "settings come from the [mqtt] config section unless given here.")
    add_config_args(p)
    p.add_argument("--host", help="broker host (mqtt.host)")
    p.add_argument("--port", help="broker port (mqtt.port)")
    p.add_argument("--prefix", help="topic prefix (mqtt.prefix)")
    p.add_argument("--device", default="+", help="device id, or '+' for all with a live per-device summary")
    p.add_argument("--json", action="store_true", help="print raw event JSON, one per line")
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N events")
    p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS", help="exit after this long")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("config", help="print the effective configuration as TOML",
                       description="Shows the configuration after defaults, file, environment and --set.")
    add_config_args(p)
    p.add_argument("--check", action="store_true", help="only validate; print OK or the error")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("version", help="versions of fer-edge, dependencies and the model")
    p.set_defaults(func=cmd_version)

    _register_plugins(sub)
    return parser


def _register_plugins(sub) -> None:
    """Commands owned by other modules: edge/cmd_<name>.py with register(subparsers)."""
    for info in pkgutil.iter_modules(edge.__path__):
        if not info.name.startswith("cmd_"):
            continue
        try:
            module = importlib.import_module(f"edge.{info.name}")
            module.register(sub)
        except Exception as e:  # a broken plug-in must not take the other commands down
            print(f"warning: command module edge.{info.name} not loaded: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fer-edge`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage + error (status 2) or help (0)
        return int(e.code or 0)
    from edge.config import ConfigError

    user_errors: tuple[type[BaseException], ...] = (ConfigError,)
    for mod, name in (("edge.classify", "ModelError"), ("edge.detect", "DetectorError"),
                      ("edge.sources", "SourceError"), ("edge.mqtt", "MqttError")):
        try:
            user_errors += (getattr(importlib.import_module(mod), name),)
        except (ImportError, AttributeError):
            pass
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fer-edge listen | head`
        return EXIT_OK
    except Exception as e:  # a bug, not a user error: one line, details only when asked for
        if getattr(args, "verbose", False):
            log.exception("internal error")
        print(f"fer-edge: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
