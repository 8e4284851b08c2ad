"""Model updates end to end: the model store (atomic install, rollback, crash safety), validation and self-test,
HTTP fetch limits, and the running daemon against a real mosquitto receiving good and bad updates over MQTT,
HTTP and the drop-in directory, with hot swaps, automatic and manual rollback, and kill -9 mid-install.

Test models are tiny Keras nets converted to TFLite once per session (skipped cleanly without TensorFlow).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="cryptography not installed (pip install cryptography)")

from broker import Subscriber  # noqa: E402
from edge.bundle import (Bundle, generate_keypair, key_id, load_private_key, public_key_text,  # noqa: E402
                         sign_bundle, write_bundle)
from edge.classify import DEFAULT_MODEL, ModelError, load_classifier  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.model_store import (ModelStore, StoreError, ValidationError, compare_versions, self_test,  # noqa: E402
                              validate_model, version_key)
from edge.updates import Refused, UpdateManager, fetch, parse_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_MANIFEST = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
LABELS = list(BASE_MANIFEST["labels"])
BASE_SHA = hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()
FINAL = ("installed", "refused", "failed", "rolled_back")

TF_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
out, n_labels = sys.argv[1], int(sys.argv[2])

def make(name, n_out, seed, constant=False):
    tf.keras.utils.set_random_seed(seed)
    inp = tf.keras.Input((48, 48, 1), batch_size=1)
    x = tf.keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inp)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    # constant: zero weights and a random bias -> the same non-uniform answer for every face
    x = tf.keras.layers.Dense(n_out, activation="softmax",
                              kernel_initializer="zeros" if constant else "glorot_uniform",
                              bias_initializer="random_normal" if constant else "zeros")(x)
    data = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, x)).convert()
    with open(os.path.join(out, name + ".tflite"), "wb") as fh:
        fh.write(data)

make("good_a", n_labels, 1)
make("good_b", n_labels, 2)
make("good_c", n_labels, 5)
make("out5", 5 if n_labels != 5 else 6, 3)
make("const", n_labels, 4, constant=True)
"""


@pytest.fixture(scope="session")
def tf_models(tmp_path_factory) -> dict[str, bytes]:
    """Tiny float TFLite models: good_a/good_b/good_c (right labels), out5 (wrong output size), const."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow not installed (pip install fer-edge[train]): cannot make the test models")
    out = tmp_path_factory.mktemp("tf_models")
    r = subprocess.run([sys.executable, "-c", TF_SCRIPT, str(out), str(len(LABELS))], capture_output=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    return {p.stem: p.read_bytes() for p in out.glob("*.tflite")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, dict]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("op", "other"):
        pem, raw = generate_keypair()
        (d / f"{name}.key").write_bytes(pem)
        (d / f"{name}.pub").write_text(public_key_text(raw))
        out[name] = {"key": load_private_key(d / f"{name}.key"), "key_path": d / f"{name}.key",
                     "pub": d / f"{name}.pub", "id": key_id(raw)}
    return out


def manifest_for(model: bytes, version: str, labels=None) -> bytes:
    man = {"format": "fer-edge-model/1", "name": "test", "version": version, "file": "model.tflite",
           "sha256": hashlib.sha256(model).hexdigest(), "size_bytes": len(model), "labels": labels or LABELS,
           "input": {"size": 48, "channels": 1, "color": "gray", "scale": 1 / 255.0, "offset": 0.0, "margin": 0.0},
           "output": {"activation": "softmax"}}
    return json.dumps(man, indent=1).encode()


def make_bundle(model: bytes, version: str, key=None, labels=None) -> bytes:
    b = Bundle(manifest_for(model, version, labels), model)
    return write_bundle(sign_bundle(b, key) if key is not None else b)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- versions and the store ---------------------------------------------------------------------------

def test_version_order():
    assert compare_versions("1.10", "1.9") == 1
    assert compare_versions("1.2", "1.2.0") == 0
    assert compare_versions("v2", "2") == 0
    assert compare_versions("1.0.0-rc1", "1.0.0") == -1
    assert compare_versions("0.0.1-placeholder", "0.0.1") == -1
    assert compare_versions("0.0.0", "0.0.1-placeholder") == -1
    assert compare_versions("1.0.0+build7", "1.0.0") == 0
    assert compare_versions("nightly", "0.0.1") == -1
    assert sorted(["1.0", "0.9", "1.0-b", "10"], key=version_key) == ["0.9", "1.0-b", "1.0", "10"]


def _install(store: ModelStore, model: bytes, version: str):
    st = store.new_staging({"id": version, "origin": "test"})
    store.write_model(st, manifest_for(model, version), model)
    return store.commit(st, version=version, sha256=sha(model), origin="test")


def test_store_install_keep_previous_rollback_and_cleanup(tmp_path):
    store = ModelStore(tmp_path / "models", keep_previous=1)
    assert store.read_pointer().active is None and store.cleanup() == []
    models = [os.urandom(1000) for _ in range(3)]
    e1 = _install(store, models[0], "1.0")
    e2 = _install(store, models[1], "2.0")
    e3 = _install(store, models[2], "3.0")
    ptr = store.read_pointer()
    assert ptr.active == e3 and ptr.previous == [e2] and ptr.probation["sha256"] == e3.sha256
    assert not (store.root / e1.dir).exists(), "models beyond keep_previous are deleted"
    assert sha(store.model_path(e3).read_bytes()) == e3.sha256
    assert store.end_probation(e3.sha256) and store.read_pointer().probation is None
    new, removed = store.rollback()
    assert new == e2 and removed == e3 and not (store.root / e3.dir).exists()
    new, removed = store.rollback()
    assert new is None and removed == e2  # back to the base model
    with pytest.raises(StoreError, match="nothing to roll back to"):
        store.rollback()
    # Leftovers of an interrupted install and unreferenced model dirs go; unrelated things stay.
    e4 = _install(store, models[0], "4.0")
    junk = store.new_staging({"id": "req-42", "origin": "mqtt"})
    (junk / "bundle.part").write_bytes(b"half")
    orphan = store.root / "9.9-0123456789ab-abcdef"
    orphan.mkdir()
    (store.root / "inbox").mkdir()
    interrupted = store.cleanup(keep=(store.root / "inbox",))
    assert [r["id"] for r in interrupted] == ["req-42"]
    assert sorted(p.name for p in store.root.iterdir()) == sorted(["active.json", e4.dir, "inbox"])


def test_corrupt_pointer_is_reported_and_models_are_left_alone(tmp_path):
    store = ModelStore(tmp_path / "models")
    e = _install(store, os.urandom(100), "1.0")
    store.pointer_path.write_text("{half a json")
    with pytest.raises(StoreError, match="corrupt.*delete it to fall back"):
        store.read_pointer()
    store.cleanup()
    assert (store.root / e.dir).is_dir()


CRASH_CHILD = r"""
import hashlib, json, os, sys
from pathlib import Path
from edge.model_store import ModelStore
store = ModelStore(Path(sys.argv[1]), keep_previous=1)
store.ensure()
store.cleanup()
print("ready", flush=True)
i = 0
while True:
    i += 1
    model = os.urandom(300_000)
    digest = hashlib.sha256(model).hexdigest()
    st = store.new_staging({"id": f"r{i}", "origin": "crash-test"})
    store.write_model(st, json.dumps({"version": f"1.{i}", "sha256": digest}).encode(), model)
    store.commit(st, version=f"1.{i}", sha256=digest, origin="crash-test")
    if i % 3 == 0:
        store.rollback()
"""


def test_kill_9_at_random_moments_never_leaves_a_half_installed_model(tmp_path):
    """A child installs and rolls back in a loop; SIGKILL it at random moments: the pointer always names
    complete models, and start-up cleanup leaves no temporary files or unreferenced directories."""
    root = tmp_path / "models"
    rng = random.Random(4)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    installs = 0
    for _ in range(6):
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(root)], stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))
        child.kill()
        child.wait()
        store = ModelStore(root, keep_previous=1)
        store.cleanup()
        ptr = store.read_pointer()
        entries = ([ptr.active] if ptr.active else []) + ptr.previous
        for e in entries:
            assert sha(store.model_path(e).read_bytes()) == e.sha256, f"{e.dir} incomplete after kill -9"
            assert json.loads((root / e.dir / "model.json").read_text())["sha256"] == e.sha256
        names = {p.name for p in root.iterdir()}
        assert names == {"active.json", *(e.dir for e in entries)} or (not entries and names <= {"active.json"}), names
        installs += len(entries)
    assert installs, "the child never got to install anything: kill delays too short to mean anything"


# --- validation, self-test, fetch ------------------------------------------------------------------------

def _write(tmp_path: Path, model: bytes, version="1.0", labels=None) -> Path:
    p = tmp_path / f"m{version}.tflite"
    p.write_bytes(model)
    p.with_suffix(".json").write_bytes(manifest_for(model, version, labels))
    return p


def test_validation_and_self_test(tmp_path, tf_models):
    clf, summary = validate_model(_write(tmp_path, tf_models["good_a"]), expect_labels=LABELS)
    assert summary["faces"] >= 6 and len(summary["predicted"]) == summary["faces"]
    assert self_test(load_classifier())["faces"] == summary["faces"]  # the bundled model passes too
    with pytest.raises(ModelError, match="5 outputs but the manifest lists 7 labels"):
        validate_model(_write(tmp_path, tf_models["out5"], "2"))
    with pytest.raises(ValidationError, match="same output for every reference face"):
        validate_model(_write(tmp_path, tf_models["const"], "3"))
    with pytest.raises(ValidationError, match="differ from the running pipeline's"):
        validate_model(_write(tmp_path, tf_models["good_a"], "4", labels=list(reversed(LABELS))),
                       expect_labels=LABELS)
    with pytest.raises(ModelError, match="not a loadable TFLite model"):
        validate_model(_write(tmp_path, b"\x00" * 4096, "5"))


def test_parse_command_refuses_malformed_commands():
    limit = 1000
    good = {"id": "x1", "action": "install", "url": "https://h/m.bundle", "sha256": "a" * 64}
    assert parse_command(json.dumps(good).encode(), limit, "mqtt").url == "https://h/m.bundle"
    for cmd, msg in ((b"{nope", "not JSON"), (b"[1]", "expected a JSON object"),
                     ({"action": "explode"}, "unknown action"),
                     ({**good, "url": "file:///etc/passwd"}, "http:// or https://"),
                     ({**good, "sha256": "abc"}, "sha256 .* is required"),
                     ({**good, "bundle": "AAAA"}, "exactly one of"),
                     ({**good, "force": "yes"}, "force must be true or false"),
                     ({**good, "id": ""}, "id must be a string"),
                     (b"x" * (limit * 2 + 70000), "exceeds the limit")):
        with pytest.raises(Refused, match=msg):
            parse_command(cmd if isinstance(cmd, bytes) else json.dumps(cmd).encode(), limit, "mqtt")
    assert parse_command(b'{"action": "rollback"}', limit, "mqtt").id  # an id is made up when missing


class _Files(BaseHTTPRequestHandler):
    """Serves server.files[path]; paths in server.hold send half the body, then wait for their Event."""

    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(self.server.lengths.get(self.path, len(body))))
        self.end_headers()
        try:
            hold = self.server.hold.get(self.path)
            if hold is not None:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                hold.wait(60)
                self.wfile.write(body[len(body) // 2:])
            else:
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.daemon_threads = True
    server.files, server.hold, server.lengths = {}, {}, {}
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    for ev in server.hold.values():
        ev.set()
    server.shutdown()
    server.server_close()


def test_fetch_limits(http, tmp_path):
    http.files["/ok"] = b"x" * 5000
    assert fetch(f"{http.url}/ok", tmp_path / "a", max_bytes=5000, timeout_s=5) == b"x" * 5000
    with pytest.raises(Refused, match="over the .* limit"):  # refused from Content-Length alone
        fetch(f"{http.url}/ok", tmp_path / "b", max_bytes=4999, timeout_s=5)
    http.lengths["/short"] = 9000  # the server promises more than it sends, then closes
    http.files["/short"] = b"y" * 6000
    with pytest.raises(Refused, match="ended after 6000 "):
        fetch(f"{http.url}/short", tmp_path / "c", max_bytes=100000, timeout_s=5)
    with pytest.raises(Refused, match="HTTP 404"):
        fetch(f"{http.url}/missing", tmp_path / "d", max_bytes=100, timeout_s=5)
    http.files["/slow"] = b"z" * 2000
    http.hold["/slow"] = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(Refused, match="timed out|took longer"):
        fetch(f"{http.url}/slow", tmp_path / "e", max_bytes=100000, timeout_s=1.5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(Refused, match="failed"):
        fetch("http://127.0.0.1:1/x", tmp_path / "f", max_bytes=100, timeout_s=2)


# --- start-up with a store ------------------------------------------------------------------------------

def _cfg(tmp_path: Path, **extra: str):
    return load_config(None, {"device.id": "t-store", "device.state_dir": str(tmp_path / "state"),
                              "mqtt.enabled": "false", **extra}, env={})


def test_restarts_during_probation_roll_back(tmp_path, tf_models):
    """A model that never finished its probation (the daemon died twice) is rolled back at the next start."""
    cfg = _cfg(tmp_path)
    store = ModelStore(Path(cfg.device.state_dir) / "models")
    _install(store, tf_models["good_a"], "9000.1")
    m1 = UpdateManager(cfg)
    assert m1.load_initial().sha256 == sha(tf_models["good_a"])  # first restart: still gets its chance
    m2 = UpdateManager(cfg)
    clf = m2.load_initial()
    assert clf.sha256 == BASE_SHA
    st = m2.status()
    assert st["result"] == "rolled_back" and "did not finish its probation" in st["error"]
    assert st["sha256"] == BASE_SHA and st["origin"] == "bundled" and store.read_pointer().active is None


def test_installed_model_that_no_longer_loads_falls_back(tmp_path, tf_models):
    cfg = _cfg(tmp_path)
    store = ModelStore(Path(cfg.device.state_dir) / "models")
    good = _install(store, tf_models["good_a"], "9000.1")
    store.end_probation(good.sha256)
    bad = _install(store, tf_models["good_b"], "9000.2")
    store.end_probation(bad.sha256)
    store.model_path(bad).write_bytes(b"bit rot")
    m = UpdateManager(cfg)
    clf = m.load_initial()
    assert clf.sha256 == good.sha256
    st = m.status()
    assert st["result"] == "rolled_back" and "does not load" in st["error"] and st["version"] == "9000.1"


# --- the frame loop in-process: hot swap and automatic rollback ----------------------------------------------

def _service(tmp_path, broker, keys, device, **extra):
    from edge.service import Service

    cfg = load_config(None, {
        "device.id": device, "device.state_dir": str(tmp_path / "state"), "source.kind": "demo",
        "source.realtime": "false", "source.loop": "true", "service.max_frames": "420",
        "mqtt.host": broker.host, "mqtt.port": str(broker.port), "mqtt.stats_interval_s": "0",
        "track.min_hits": "2", "track.update_interval_s": "0.2", "update.public_keys": str(keys["op"]["pub"]),
        "update.probation_frames": "20", **extra}, env={})
    events: list[dict] = []
    svc = Service(cfg, event_sink=events.append)
    th = threading.Thread(target=svc.run, name="svc", daemon=True)
    return svc, events, th


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _publish(sub: Subscriber, topic: str, payload) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sub.client.publish(topic, data, qos=1).wait_for_publish(10)


def _status(sub: Subscriber, topic: str, rid: str | None, timeout: float = 30, results=FINAL,
            after: int = 0) -> dict:
    def match():
        for m in sub.on_topic(topic)[after:]:
            st = json.loads(m.payload)
            if st.get("request_id") == rid and st.get("result") in results:
                return st
        return None

    _wait(lambda: match() is not None, timeout, f"status for request {rid}")
    return match()


def test_hot_swap_between_frames_loses_nothing(tmp_path, broker, subscriber, keys, tf_models):
    """Lossless source: every frame is processed across the swap, events switch model sha, lifecycles stay whole."""
    svc, events, th = _service(tmp_path, broker, keys, "t-swap")
    sub = subscriber("fer-edge/t-swap/#")
    th.start()
    _wait(lambda: len(events) >= 1, 30, "a first event")
    bundle = make_bundle(tf_models["good_a"], "9000.1", keys["op"]["key"])
    _publish(sub, "fer-edge/t-swap/cmd/model", {"id": "swap-1", "bundle": base64.b64encode(bundle).decode(),
                                               "sha256": sha(bundle)})
    st = _status(sub, "fer-edge/t-swap/model/status", "swap-1")
    assert st["result"] == "installed", st
    th.join(120)
    assert not th.is_alive()
    # Lossless: the capture thread waits for the loop, so only the frame in flight at the stop is overwritten.
    assert svc.frames == 420 and svc.source.dropped <= 1
    shas = [e["model"]["sha256"] for e in events]
    assert shas[0] == BASE_SHA and shas[-1] == sha(tf_models["good_a"])
    switch = shas.index(sha(tf_models["good_a"]))
    assert set(shas[:switch]) == {BASE_SHA} and set(shas[switch:]) == {sha(tf_models["good_a"])}
    assert {e["model"]["version"] for e in events[switch:]} == {"9000.1"}
    faces: dict[str, list[str]] = {}
    for e in events:
        faces.setdefault(e["face_id"], []).append(e["type"])
    assert all(t[0] == "new" and t[-1] == "end" and t.count("end") == 1 for t in faces.values()), faces
    assert svc.error_counts["classify"] == 0


def test_failure_during_probation_rolls_back_automatically(tmp_path, broker, subscriber, keys, tf_models,
                                                          monkeypatch, caplog):
    """The new model passes every check but then fails on live frames: the old one is back within a frame."""
    import edge.updates

    real = edge.updates.validate_model

    def validate_then_break(*args, **kwargs):
        clf, summary = real(*args, **kwargs)  # the self-test ran on the real model

        def broken(faces):
            raise RuntimeError("injected interpreter failure")

        clf.predict = broken
        return clf, summary

    monkeypatch.setattr(edge.updates, "validate_model", validate_then_break)
    caplog.set_level("INFO", logger="edge.updates")
    svc, events, th = _service(tmp_path, broker, keys, "t-auto")
    sub = subscriber("fer-edge/t-auto/#")
    th.start()
    _wait(lambda: len(events) >= 1, 30, "a first event")
    bundle = make_bundle(tf_models["good_a"], "9000.1", keys["op"]["key"])
    _publish(sub, "fer-edge/t-auto/cmd/model", {"id": "auto-1", "bundle": base64.b64encode(bundle).decode(),
                                               "sha256": sha(bundle)})
    st = _status(sub, "fer-edge/t-auto/model/status", "auto-1", results=("rolled_back",))
    assert st["action"] == "auto_rollback" and "failed on a live frame during its probation" in st["error"]
    assert st["sha256"] == BASE_SHA and st["previous"] is None and st["state"] == "idle"
    n = len(events)
    th.join(120)
    assert svc.frames == 420
    assert svc.error_counts["classify"] == 1, "the old model must be back on the next frame"
    swaps = [r.getMessage() for r in caplog.records if "model swapped between frames" in r.getMessage()]
    assert len(swaps) == 2 and "-> 9000.1" in swaps[0] and swaps[1].startswith("model swapped between frames: 9000.1")
    assert len(events) > n and {e["model"]["sha256"] for e in events} == {BASE_SHA}
    assert not [p for p in (tmp_path / "state" / "models").iterdir() if p.name not in
                ("active.json", "requests.json", "inbox")], "the failed model is deleted"


# --- the daemon as a subprocess: every kind of bad update, then good ones ------------------------------------

class Daemon:
    """`python -m edge.cli run -c CONF -v` with stderr in a log file."""

    def __init__(self, tmp_path: Path, conf: Path, name: str):
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "-c", str(conf), "-v"], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


class Device:
    """What the test sees of one device: its status and event topics, and a way to send it commands."""

    def __init__(self, sub: Subscriber, device: str):
        self.sub, self.device = sub, device
        self.status_topic = f"fer-edge/{device}/model/status"
        self.faces_topic = f"fer-edge/{device}/faces"
        self.cmd_topic = f"fer-edge/{device}/cmd/model"

    def send(self, payload, topic: str | None = None) -> int:
        """Publish a command; returns the number of status messages before it (to find the answer after it)."""
        n = len(self.sub.on_topic(self.status_topic))
        _publish(self.sub, topic or self.cmd_topic, payload)
        return n

    def answer(self, rid, after: int, results=FINAL, timeout: float = 30) -> dict:
        return _status(self.sub, self.status_topic, rid, timeout, results, after)

    def events(self) -> list[dict]:
        return [json.loads(m.payload) for m in self.sub.on_topic(self.faces_topic)]

    def serving(self, digest: str, timeout: float = 30) -> None:
        """Wait until events carry ``digest``, then check the next events do too (no flip-flopping)."""
        start = len(self.events())
        _wait(lambda: any(e["model"]["sha256"] == digest for e in self.events()[start:]), timeout,
              f"events from model {digest[:12]}")
        first = next(i for i, e in enumerate(self.events()) if i >= start and e["model"]["sha256"] == digest)
        _wait(lambda: len(self.events()) >= first + 3, timeout, "more events")
        assert {e["model"]["sha256"] for e in self.events()[first:]} == {digest}

    def still_serving(self, digest: str, timeout: float = 30, count: int = 2) -> None:
        """The next ``count`` events (and any others after now) carry ``digest``: the old model keeps serving."""
        start = len(self.events())
        _wait(lambda: len(self.events()) >= start + count, timeout, "events to keep flowing")
        assert {e["model"]["sha256"] for e in self.events()[start:]} == {digest}

    def idle(self, timeout: float = 30) -> dict:
        start = 0

        def last():
            msgs = self.sub.on_topic(self.status_topic)[start:]
            return json.loads(msgs[-1].payload) if msgs else {}

        _wait(lambda: last().get("state") == "idle", timeout, "model/status state idle")
        return last()


def install_cmd(rid: str, bundle: bytes, **extra) -> dict:
    return {"id": rid, "action": "install", "bundle": base64.b64encode(bundle).decode(), "sha256": sha(bundle),
            **extra}


def test_daemon_refuses_bad_updates_installs_good_ones_and_survives_kill_9(
        tmp_path, broker, subscriber, keys, tf_models, http, daemons):
    device = "t-upd"
    state = tmp_path / "state"
    models = state / "models"
    conf = tmp_path / "fer-edge.toml"
    conf.write_text(f"""
[device]
id = "{device}"
state_dir = "{state}"
[source]
kind = "demo"
loop = true
[update]
public_keys = ["{keys['op']['pub']}"]
groups = ["floor2"]
max_bundle_mb = 0.25
watch_interval_s = 0.3
probation_frames = 5
probation_s = 3.0
http_timeout_s = 30.0
[track]
min_hits = 2
update_interval_s = 0.5
min_update_gap_s = 0.2
[mqtt]
host = "{broker.host}"
port = {broker.port}
stats_interval_s = 5.0
reconnect_min_s = 0.2
reconnect_max_s = 1.0
""")
    sub = subscriber(f"fer-edge/{device}/#")
    dev = Device(sub, device)
    d1 = Daemon(tmp_path, conf, "d1")
    daemons.append(d1)
    op = keys["op"]["key"]
    good_a, good_b, good_c = tf_models["good_a"], tf_models["good_b"], tf_models["good_c"]

    # Start: the retained status names the bundled model; events carry its sha.
    _wait(lambda: dev.sub.on_topic(dev.status_topic), 30, f"a first model/status\n{d1.log()[-3000:]}")
    first = json.loads(dev.sub.on_topic(dev.status_topic)[0].payload)
    assert first["sha256"] == BASE_SHA and first["origin"] == "bundled" and first["state"] == "idle"
    dev.serving(BASE_SHA)

    def refused(payload, rid, match: str, topic=None) -> dict:
        n = dev.send(payload, topic)
        st = dev.answer(rid, n)
        assert st["result"] == "refused" and match in st["error"] and ".tmp-" not in st["error"], st
        assert st["sha256"] == BASE_SHA and st["state"] in ("idle", "updating")
        dev.still_serving(BASE_SHA, count=1)
        return st

    # 1. malformed JSON (its id is still found and echoed)
    refused(b'{"id": "bad-json", "action": "install", "bundle": ', "bad-json", "malformed command: not JSON")
    # 2. wrong signature: a signature byte flipped
    b = sign_bundle(Bundle(manifest_for(good_a, "9000.1"), good_a), op)
    sig = bytearray(base64.b64decode(b.signature["signature"]))
    sig[5] ^= 0xFF
    forged = write_bundle(Bundle(b.manifest_bytes, b.model_bytes,
                                 dict(b.signature, signature=base64.b64encode(bytes(sig)).decode())))
    refused(install_cmd("bad-sig", forged), "bad-sig", "signature does not verify")
    # 3. signed with a key the device does not trust
    refused(install_cmd("unknown-key", make_bundle(good_a, "9000.1", keys["other"]["key"])), "unknown-key",
            f"unknown key {keys['other']['id']}")
    # 4. unsigned
    refused(install_cmd("unsigned", make_bundle(good_a, "9000.1")), "unsigned", "not signed")
    # 5. truncated (the sha256 matches what was sent: the file itself is cut short)
    full = make_bundle(good_a, "9000.1", op)
    refused(install_cmd("truncated", full[: len(full) // 2]), "truncated", "truncated")
    # 6. wrong sha256
    refused({**install_cmd("wrong-sha", full), "sha256": sha(b"something else")}, "wrong-sha", "sha256 mismatch")
    # 7. not a TFLite file (properly signed)
    refused(install_cmd("not-tflite", make_bundle(os.urandom(3000), "9000.1", op)), "not-tflite",
            "not a loadable TFLite model")
    # 8. wrong output size
    refused(install_cmd("out5", make_bundle(tf_models["out5"], "9000.1", op)), "out5",
            f"outputs but the manifest lists {len(LABELS)} labels")
    # 9. oversized: inline (refused before parsing) and by URL
    big = os.urandom(400_000)
    refused(install_cmd("big-inline", big), "big-inline", "exceeds the limit")
    http.files["/big.bundle"] = big
    refused({"id": "big-url", "url": f"{http.url}/big.bundle", "sha256": sha(big)}, "big-url", "over the 0.25 MiB")
    # 10. older version than the active one (sent to a fleet group the device is in)
    refused(install_cmd("older", make_bundle(good_a, "0.0.0", op)), "older", "not newer than the active",
            topic="fer-edge/group/floor2/cmd/model")
    # ... on the group topic the device is not in: nothing happens.
    dev.send(install_cmd("not-my-group", full), "fer-edge/group/lobby/cmd/model")
    dev.still_serving(BASE_SHA)
    assert not [m for m in dev.sub.on_topic(dev.status_topic) if b"not-my-group" in m.payload]
    assert not [p for p in models.iterdir() if p.name.startswith(".tmp-")], "refused installs leave nothing"

    # 11. two pushes at once: a slow download holds the first; the second is refused as busy.
    http.files["/a.bundle"] = full
    http.hold["/a.bundle"] = release_a = threading.Event()
    n = dev.send({"id": "slow-a", "url": f"{http.url}/a.bundle", "sha256": sha(full)})
    dev.answer("slow-a", n, results=("accepted",))
    st = refused(install_cmd("second", make_bundle(good_b, "9000.2", op)), "second", "busy: install slow-a")
    assert st["state"] == "updating"
    dev.still_serving(BASE_SHA)
    release_a.set()
    st = dev.answer("slow-a", n)
    assert st["result"] == "installed" and st["version"] == "9000.1" and st["sha256"] == sha(good_a), st
    assert st["previous"]["version"] == BASE_MANIFEST["version"]
    dev.serving(sha(good_a))  # hot-swapped: events switch to the new model's sha
    st = dev.idle()
    assert st["probation"] is None

    # 12. kill -9 in the middle of an install (here: mid-download), then restart.
    bundle_b = make_bundle(good_b, "9000.2", op)
    http.files["/b.bundle"] = bundle_b
    http.hold["/b.bundle"] = threading.Event()
    dev.send({"id": "killed", "url": f"{http.url}/b.bundle", "sha256": sha(bundle_b)})
    _wait(lambda: list(models.glob(".tmp-*/bundle.part")), 20, "the download to start")
    d1.stop(signal.SIGKILL)
    d2 = Daemon(tmp_path, conf, "d2")
    daemons.append(d2)
    st = dev.answer("killed", 0, results=("failed",))
    assert "interrupted" in st["error"] and st["sha256"] == sha(good_a) and st["version"] == "9000.1"
    assert sorted(p.name for p in models.iterdir() if p.name not in ("inbox", "requests.json")) == \
        sorted(["active.json", json.loads((models / "active.json").read_text())["active"]["dir"]])
    dev.serving(sha(good_a))  # the installed model survived the crash and the restart

    # 13. a good push with the CLI, then rollback with the CLI.
    bundle_path = tmp_path / "b.bundle"
    bundle_path.write_bytes(bundle_b)
    cli = [sys.executable, "-m", "edge.cli", "model"]
    where = ["--host", broker.host, "--port", str(broker.port)]
    r = subprocess.run([*cli, "push", str(bundle_path), "--device", device, *where, "--timeout", "60"],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installed" in r.stdout and "9000.2" in r.stdout
    dev.serving(sha(good_b))
    dev.idle()
    r = subprocess.run([*cli, "rollback", "--device", device, *where, "--timeout", "60"], cwd=ROOT,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and "rolled_back" in r.stdout, r.stdout + r.stderr
    dev.serving(sha(good_a))
    r = subprocess.run([*cli, "status", "--device", device, *where, "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["version"] == "9000.1" and st["result"] == "rolled_back"
    assert st["previous"]["version"] == BASE_MANIFEST["version"]

    # 14. drop-in directory: a good bundle installs (and disappears), a bad one moves to rejected/.
    inbox = models / "inbox"
    (inbox / "bad.bundle").write_bytes(make_bundle(good_c, "9000.3"))  # unsigned
    _wait(lambda: (inbox / "rejected" / "bad.bundle.error.txt").exists(), 20, "the bad drop-in to be rejected")
    assert "not signed" in (inbox / "rejected" / "bad.bundle.error.txt").read_text()
    dev.still_serving(sha(good_a))
    tmp = inbox / ".c.bundle.part"  # copied under a temporary name, then renamed (like rsync)
    tmp.write_bytes(make_bundle(good_c, "9000.3", op))
    tmp.rename(inbox / "c.bundle")
    dev.serving(sha(good_c))
    _wait(lambda: not (inbox / "c.bundle").exists(), 10, "the installed drop-in to be removed")
    st = json.loads(dev.sub.on_topic(dev.status_topic)[-1].payload)
    assert st["origin"] == "inbox:c.bundle" and st["version"] == "9000.3"

    # 15. an older version goes in with force; a repeated delivery of the same request id is ignored.
    dev.idle()
    older = install_cmd("forced", make_bundle(good_b, "1.0", op), force=True)
    n = dev.send(older)
    st = dev.answer("forced", n)
    assert st["result"] == "installed" and st["version"] == "1.0", st
    dev.serving(sha(good_b))
    dev.idle()
    n = dev.send(older)
    n_status = dev.send({"id": "ask", "action": "status"})
    st = dev.answer("forced", n_status, results=("installed",))  # the status request just republishes
    assert len([m for m in dev.sub.on_topic(dev.status_topic)[n:] if b'"accepted"' in m.payload]) == 0
    assert "already handled" in d2.log()

    assert d2.stop() == 0, d2.log()[-3000:]
    for d in (d1, d2):
        log = d.log()
        assert "Traceback" not in log, log[-5000:]
    assert "model swapped between frames" in d2.log()


def test_cli_push_rollback_status_errors(broker, tmp_path, keys, capsys):
    """No device answering, not a bundle, unknown device status, bad target: one clear line, no traceback."""
    from edge.cli import main

    where = ["--host", broker.host, "--port", str(broker.port)]
    bundle = tmp_path / "x.bundle"
    bundle.write_bytes(make_bundle(DEFAULT_MODEL.read_bytes(), "9000.9", keys["op"]["key"]))
    assert main(["model", "push", str(bundle), "--device", "ghost", *where, "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "sent install request" in err and "no answer from ghost within 1 s" in err
    assert main(["model", "push", str(bundle), "--device", "ghost", *where, "--no-wait"]) == 0
    capsys.readouterr()
    (tmp_path / "junk.bundle").write_bytes(b"junk" * 300)
    assert main(["model", "push", str(tmp_path / "junk.bundle"), "--device", "ghost", *where]) == 1
    assert "not a model bundle" in capsys.readouterr().err
    assert main(["model", "rollback", "--device", "a/b", *where]) == 2
    assert "expected one device id" in capsys.readouterr().err
    assert main(["model", "status", "--device", "ghost", *where, "--timeout", "0.5"]) == 1
    assert "no model status from ghost" in capsys.readouterr().err
    assert main(["model", "push", str(bundle), "--device", "ghost", "--host", "127.0.0.1", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the MQTT broker at 127.0.0.1:1" in err and "Traceback" not in err


def test_one_off_commands_use_the_installed_model(tmp_path):
    """predict/snapshot/doctor start from the same model as the daemon: the store's active one."""
    import json as _json

    from edge.classify import DEFAULT_MODEL, load_classifier
    from edge.model_store import POINTER, ModelStore, current_model_path

    state = tmp_path / "state"
    assert current_model_path(state, "") is None  # nothing installed: the bundled model
    assert current_model_path(state, "/x/m.tflite") == "/x/m.tflite"
    store = ModelStore(state / "models")
    staging = store.new_staging({"id": "t"})
    man = _json.loads(DEFAULT_MODEL.with_suffix(".json").read_text()) | {"version": "9.9.9"}
    store.write_model(staging, _json.dumps(man).encode(), DEFAULT_MODEL.read_bytes())
    entry = store.commit(staging, version="9.9.9", sha256=man["sha256"], origin="test")
    path = current_model_path(state, "/x/m.tflite")
    assert path == str(store.model_path(entry))
    assert load_classifier(path).version == "9.9.9"
    (state / "models" / POINTER).write_text("{corrupt")
    assert current_model_path(state, "") is None  # a corrupt pointer falls back, like the daemon
