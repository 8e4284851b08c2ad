"""Home Assistant MQTT discovery against a real mosquitto: the configs (keys, unique ids, availability, retained),
re-announcing after a broker restart and on Home Assistant's birth message, the rate-limited state topic, the
daemon on the demo clip, clearing configs (stale ones, discovery switched off, `fer-edge homeassistant remove`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker import Subscriber
from edge.config import ConfigError, load_config
from edge.detect import Box
from edge.discovery import (ENTITIES, HomeAssistant, HomeAssistantConfig, config_topics, discovery_configs,
                            dominant, node_id)
from edge.events import build_event
from edge.mqtt import MqttConfig, MqttPublisher
from edge.track import TrackEvent

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
COMMON_KEYS = {"name", "unique_id", "state_topic", "availability_topic", "payload_available",
               "payload_not_available", "device", "origin", "value_template", "qos"}


def model_path() -> Path:
    from edge.classify import DEFAULT_MODEL

    return Path(os.environ.get("FER_EDGE_MODEL__PATH") or DEFAULT_MODEL)


needs_model = pytest.mark.skipif(not model_path().is_file(),
                                 reason=f"no emotion model at {model_path()} (it ships in git: git checkout -- "
                                        "edge/models, or set FER_EDGE_MODEL__PATH)")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_") or k == "FER_EDGE_MODEL__PATH"}


def event(kind: str, face: str, emotion: str = "happy", confidence: float = 0.7, epoch: float | None = None,
          version: str = "1.0", device: str = "kitchen") -> dict:
    """A real event payload from build_event (schema-valid)."""
    scores = {lab: (confidence if lab == emotion else (1 - confidence) / 6) for lab in LABELS}
    now = time.time() if epoch is None else epoch
    summary = None
    if kind == "end":
        summary = {"dominant": emotion, "mean_scores": scores, "time_share": {k: float(k == emotion) for k in scores},
                   "frames": 12}
    ev = TrackEvent(type=kind, face_id=face, bbox=Box(10, 20, 100, 100), scores=scores, emotion=emotion,
                    confidence=confidence, first_seen=now - 2, last_seen=now, duration_s=2.0, summary=summary)
    return build_event(ev, device_id=device, model_version=version, model_sha256="0" * 64, source="test")


def configs_for(device: str = "kitchen", **ha) -> dict[str, dict]:
    return discovery_configs(HomeAssistantConfig(enabled=True, **ha), MqttConfig(), device, labels=LABELS,
                             model_version="1.0")


def retained(broker, topic_filter: str, settle: float = 0.7) -> dict[str, bytes]:
    """What a newly connecting client gets as retained messages on topic_filter."""
    sub = Subscriber(broker.host, broker.port, topic_filter).start()
    try:
        time.sleep(settle)
        return {m.topic: m.payload for m in sub.messages if m.retain}
    finally:
        sub.stop()


def publish_retained(broker, items: dict[str, str | bytes], retain: bool = True) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-retain-{os.getpid()}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        for topic, payload in items.items():
            c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# --- config and payloads -------------------------------------------------------------------------------------

def test_config_section_off_by_default_and_validated():
    cfg = load_config(None, {}, env={})
    assert cfg.homeassistant.enabled is False and cfg.homeassistant.discovery_prefix == "homeassistant"
    cfg = load_config(None, {"homeassistant.enabled": "true", "homeassistant.discovery_prefix": "ha"}, env={})
    assert cfg.homeassistant.enabled and cfg.homeassistant.discovery_prefix == "ha"
    for key, value in (("discovery_prefix", "home/#"), ("discovery_prefix", "/ha"), ("discovery_prefix", ""),
                       ("node_id", "a/b"), ("node_id", "kitchen pi"), ("state_interval_s", "-1")):
        with pytest.raises(ConfigError) as ei:
            load_config(None, {f"homeassistant.{key}": value}, env={})
        assert ei.value.key == f"homeassistant.{key}", str(ei.value)


def test_discovery_configs_keys_unique_ids_availability_device():
    configs = configs_for("pi.kitchen")  # '.' is fine in a topic but not in a node id
    node = node_id(HomeAssistantConfig(), "pi.kitchen")
    assert node == "fer-edge-pi_kitchen" and ID_RE.match(node)
    assert len(configs) == len(ENTITIES) >= 6
    uids = [p["unique_id"] for p in configs.values()]
    assert len(set(uids)) == len(uids)
    components = {}
    for topic, p in configs.items():
        m = re.fullmatch(r"homeassistant/(\w+)/([^/]+)/([^/]+)/config", topic)
        assert m and m[2] == node and ID_RE.match(m[3]), topic
        components[m[3]] = m[1]
        assert COMMON_KEYS <= set(p), (topic, COMMON_KEYS - set(p))
        assert p["availability_topic"] == "fer-edge/pi.kitchen/status"
        assert (p["payload_available"], p["payload_not_available"]) == ("online", "offline")
        assert p["state_topic"].startswith("fer-edge/pi.kitchen/")
        dev = p["device"]
        assert dev["identifiers"] == [node] and dev["name"] == "fer-edge pi.kitchen"
        assert dev["sw_version"] == __import__("edge").__version__ and "1.0" in dev["model"]
        # Only keys Home Assistant's device schema accepts (it rejects unknown ones).
        assert set(dev) <= {"identifiers", "connections", "manufacturer", "model", "name", "hw_version",
                            "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url"}
    assert components["dominant_emotion"] == "sensor" and components["faces"] == "sensor"
    assert components["face"] == "event" and components["fps"] == "sensor"
    by_obj = {t.split("/")[3]: p for t, p in configs.items()}
    assert by_obj["face"]["event_types"] == ["new", "end"] and by_obj["face"]["state_topic"].endswith("/faces")
    assert by_obj["dominant_emotion"]["options"] == LABELS + ["none"]
    for obj in ("fps", "model_version", "latency", "cpu_temperature"):
        assert by_obj[obj]["entity_category"] == "diagnostic", obj
    for obj in ("dominant_emotion", "faces", "face_in_view", "face"):
        assert "entity_category" not in by_obj[obj], obj
    # Custom prefix / node id / name.
    custom = configs_for("k", discovery_prefix="ha", node_id="living_room", device_name="Living room")
    assert all(t.startswith("ha/") and t.split("/")[2] == "living_room" for t in custom)
    assert {p["device"]["name"] for p in custom.values()} == {"Living room"}


def render(template: str, value_json) -> str:
    """Render a value template the way Home Assistant does (sandboxed Jinja with value_json and to_json)."""
    jinja2 = pytest.importorskip("jinja2.sandbox",
                                 reason="jinja2 not installed (pip install -e '.[test]'): templates not rendered")
    env = jinja2.ImmutableSandboxedEnvironment()
    env.filters["to_json"] = json.dumps
    return env.from_string(template).render(value_json=value_json, value=json.dumps(value_json)).strip()


def test_value_templates_render_on_real_payloads():
    by_obj = {t.split("/")[3]: p for t, p in configs_for().items()}
    ev_tpl = by_obj["face"]["value_template"]
    new = json.loads(render(ev_tpl, event("new", "1-abcd", "happy", 0.8)))
    assert new["event_type"] == "new" and new["emotion"] == "happy" and new["face_id"] == "1-abcd"
    assert render(ev_tpl, event("update", "1-abcd", "sad")) == ""  # Home Assistant ignores empty renders
    end = json.loads(render(ev_tpl, event("end", "1-abcd", "sad", 0.6)))
    assert end["event_type"] == "end" and end["dominant"] == "sad" and end["duration_s"] == 2.0

    state = {"device_id": "kitchen", "faces": 2, "dominant_emotion": "happy",
             "emotions": {"1-abcd": "happy", "2-bcde": "sad"}, "model_version": "1.0",
             "timestamp": "2026-01-01T00:00:00.000Z", "epoch": 0.0}
    assert render(by_obj["dominant_emotion"]["value_template"], state) == "happy"
    assert json.loads(render(by_obj["dominant_emotion"]["json_attributes_template"], state)) == \
        {"emotions": state["emotions"]}
    assert render(by_obj["faces"]["value_template"], state) == "2"
    assert render(by_obj["face_in_view"]["value_template"], state) == "ON"
    assert render(by_obj["model_version"]["value_template"], state) == "1.0"
    empty = {**state, "faces": 0, "dominant_emotion": None, "emotions": {}}
    assert render(by_obj["dominant_emotion"]["value_template"], empty) == "none"
    assert render(by_obj["face_in_view"]["value_template"], empty) == "OFF"
    stats = {"fps": 9.8, "latency_ms": {"total": {"p50_ms": 21.5, "p95_ms": 40.0}}, "cpu_temp_c": None}
    assert render(by_obj["fps"]["value_template"], stats) == "9.8"
    assert render(by_obj["latency"]["value_template"], stats) == "21.5"
    assert render(by_obj["cpu_temperature"]["value_template"], stats) == "None"  # HA: unknown


def test_dominant_emotion_counts_faces_then_confidence():
    assert dominant({}, LABELS) is None
    assert dominant({"a": ("sad", 0.9), "b": ("happy", 0.4), "c": ("happy", 0.3)}, LABELS) == "happy"
    assert dominant({"a": ("sad", 0.9), "b": ("happy", 0.4)}, LABELS) == "sad"
    assert dominant({"a": ("sad", 0.5), "b": ("happy", 0.5)}, LABELS) == "happy"  # label order breaks ties


# --- a real publisher on a real broker -----------------------------------------------------------------------

def make_publisher(broker, device: str) -> MqttPublisher:
    return MqttPublisher(MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5),
                         device)


def test_announce_retained_reannounce_after_restart_and_ha_birth_state_rate_limit(broker, subscriber):
    device = "t-ha"
    node = node_id(HomeAssistantConfig(), device)
    stale = f"homeassistant/sensor/{node}/old_entity/config"
    foreign = "homeassistant/sensor/someone-else/faces/config"
    publish_retained(broker, {stale: json.dumps({"name": "old"}), foreign: json.dumps({"name": "x"})})
    sub = subscriber(["homeassistant/#", f"fer-edge/{device}/#"])
    cfg = HomeAssistantConfig(enabled=True, state_interval_s=0.5)
    pub = make_publisher(broker, device)
    ha = HomeAssistant(cfg, pub, device, labels=LABELS, model_version="1.0")
    topics = config_topics(cfg, device)
    pub.start()
    try:
        assert sub.wait_for(lambda ms: {m.topic for m in ms} >= set(topics), timeout=10), \
            sorted({m.topic for m in sub.messages})
        # Retained, for a Home Assistant that connects later; the stale config of an older version is cleared,
        # someone else's is left alone.
        assert wait_until(lambda: stale not in retained(broker, "homeassistant/#"))
        kept = retained(broker, "homeassistant/#")
        assert set(kept) == set(topics) | {foreign}, sorted(kept)
        payloads = {t: json.loads(kept[t]) for t in topics}
        assert payloads == configs_for(device)
        assert all(p["availability_topic"] == f"fer-edge/{device}/status" for p in payloads.values())
        assert retained(broker, f"fer-edge/{device}/status")[f"fer-edge/{device}/status"] == b"online"
        assert ha.cleared == 1
        # Full topics only when asked for: a suffix with '/' still goes under the device.
        assert pub.publish("model/status", "x", retain=True)
        assert wait_until(lambda: retained(broker, f"fer-edge/{device}/model/status")
                          == {f"fer-edge/{device}/model/status": b"x"}), "QoS 0: give a loaded machine time"

        # Initial state on connect: nobody in view, retained.
        state_topic = f"fer-edge/{device}/state"
        first = json.loads(retained(broker, state_topic)[state_topic])
        assert first["faces"] == 0 and first["dominant_emotion"] is None and first["emotions"] == {}

        # State follows the events, at most once per state_interval_s; unchanged re-reports publish nothing.
        sub.clear()
        t = time.monotonic() + 10  # clear of the state published on connect
        ha.on_event(event("new", "1-aaaa", "happy", 0.8))
        assert ha.tick(t)
        ha.on_event(event("new", "2-bbbb", "sad", 0.9))
        assert not ha.tick(t + 0.2)  # rate limited: kept pending
        assert ha.tick(t + 0.6)
        ha.on_event(event("update", "2-bbbb", "sad", 0.9))  # periodic re-report, same emotion
        assert not ha.tick(t + 5)
        ha.on_event(event("update", "1-aaaa", "sad", 0.6))
        assert ha.tick(t + 6)
        ha.on_event(event("end", "1-aaaa", "sad"))
        ha.on_event(event("end", "2-bbbb", "sad"))
        ha.close()  # final state right away, whatever the rate limit
        assert sub.wait_topic(state_topic, lambda ms: len(ms) >= 4, timeout=5)
        states = [json.loads(m.payload) for m in sub.on_topic(state_topic)]
        assert [(s["faces"], s["dominant_emotion"], s["emotions"]) for s in states] == [
            (1, "happy", {"1-aaaa": "happy"}),
            (2, "sad", {"1-aaaa": "happy", "2-bbbb": "sad"}),  # one face each: the surer one (0.9 > 0.8)
            (2, "sad", {"1-aaaa": "sad", "2-bbbb": "sad"}),
            (0, None, {}),
        ]
        assert all(s["model_version"] == "1.0" and s["device_id"] == device for s in states)

        # Home Assistant restarted: its birth message makes the device announce itself again.
        sub.clear()
        publish_retained(broker, {"homeassistant/status": "online"}, retain=False)  # like HA's birth message
        assert sub.wait_for(lambda ms: {m.topic for m in ms} >= set(topics), timeout=10)

        # A model swapped at run time shows up in the device block and the state.
        sub.clear()
        ha.on_event(event("new", "3-cccc", "fear", version="2.0"))
        assert sub.wait_for(lambda ms: {m.topic for m in ms} >= set(topics), timeout=10)
        assert all("2.0" in json.loads(m.payload)["device"]["model"] for m in sub.messages if m.topic in topics)
        ha.on_event(event("end", "3-cccc", "fear", version="2.0"))
        ha.close()

        # A restarted broker without persistence lost every retained message: the reconnect re-announces.
        broker.stop()
        broker.start()
        assert wait_until(lambda: pub.stats()["connected"] and pub.stats()["reconnects"] >= 1, timeout=15)
        assert wait_until(lambda: set(retained(broker, "homeassistant/#", 0.3)) >= set(topics), timeout=10)
        again = json.loads(retained(broker, state_topic)[state_topic])
        assert again["faces"] == 0 and again["model_version"] == "2.0"
    finally:
        pub.stop(timeout=2)
    # Availability: the entities' availability topic now says offline, retained.
    assert retained(broker, f"fer-edge/{device}/status")[f"fer-edge/{device}/status"] == b"offline"


def test_switched_off_clears_previous_discovery_at_start(broker):
    device = "t-off"
    topics = config_topics(HomeAssistantConfig(), device)
    foreign = "homeassistant/sensor/someone-else/faces/config"
    leftovers = {t: json.dumps(p) for t, p in configs_for(device).items()}
    publish_retained(broker, {**leftovers, foreign: "{}", f"fer-edge/{device}/state": '{"faces": 1}'})
    pub = make_publisher(broker, device)
    ha = HomeAssistant(HomeAssistantConfig(enabled=False), pub, device, labels=LABELS, model_version="1.0")
    pub.start()
    try:
        assert wait_until(lambda: ha.cleared == len(topics), timeout=10), ha.cleared
        ha.on_event(event("new", "1-aaaa"))  # off: no state topic
        assert not ha.tick(1e9)
        time.sleep(0.3)
        left = retained(broker, "#")
        assert not set(left) & set(topics), sorted(left)
        assert foreign in left and f"fer-edge/{device}/state" not in left
    finally:
        pub.stop(timeout=2)


# --- the daemon ----------------------------------------------------------------------------------------------

@needs_model
def test_daemon_announces_device_and_state_follows_the_demo_clip(broker, subscriber, tmp_path):
    device = "t-hadaemon"
    base = f"fer-edge/{device}"
    sub = subscriber(["homeassistant/#", f"{base}/#"])
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "edge.cli", "run", "-v", "--device-id", device, "--mqtt-host", broker.host,
             "--mqtt-port", str(broker.port), "--duration", "7", "--set", "homeassistant.enabled=true",
             "--set", "homeassistant.state_interval_s=0.3", "--set", "track.min_hits=2",
             "--set", "mqtt.stats_interval_s=1"],
            cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=log, timeout=120)
    text = log_path.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and f"announced {len(ENTITIES)} of {len(ENTITIES)} entities" in text

    cfg = HomeAssistantConfig(enabled=True)
    topics = config_topics(cfg, device)
    assert sub.wait_topic(f"{base}/status", lambda ms: ms[-1].text == "offline", timeout=10)
    # Retained configs survive the daemon (Home Assistant shows the entities unavailable, not gone).
    kept = retained(broker, "homeassistant/#")
    assert set(kept) == set(topics)
    for t in topics:
        p = json.loads(kept[t])
        assert p["availability_topic"] == f"{base}/status" and p["device"]["identifiers"] == [node_id(cfg, device)]
        assert p["device"]["model"].endswith(json.loads(sub.on_topic(f"{base}/stats")[0].payload)["model"]["version"])

    # The state follows the events: replaying the faces topic gives every published state, in order.
    faces = [json.loads(m.payload) for m in sub.on_topic(f"{base}/faces")]
    assert {"new", "end"} <= {e["type"] for e in faces}, [e["type"] for e in faces]
    states = [json.loads(m.payload) for m in sub.on_topic(f"{base}/state")]
    expected, current = [{}], {}
    for e in faces:
        if e["type"] == "end":
            current.pop(e["face_id"], None)
        else:
            current[e["face_id"]] = e["emotion"]
        expected.append(dict(current))
    seen = [s["emotions"] for s in states]
    it = iter(expected)
    assert all(any(s == x for x in it) for s in seen), (seen, expected)  # a subsequence (rate limit skips some)
    for s in states:
        emos = list(s["emotions"].values())
        assert s["faces"] == len(emos)
        if emos:  # the most frequent emotion among the faces in view
            assert emos.count(s["dominant_emotion"]) == max(emos.count(e) for e in emos), s
        else:
            assert s["dominant_emotion"] is None, s
    assert any(s["faces"] >= 1 for s in states)
    last = json.loads(retained(broker, f"{base}/state")[f"{base}/state"])
    assert last["faces"] == 0 and last["dominant_emotion"] is None


# --- fer-edge homeassistant remove / show ----------------------------------------------------------------------

def test_remove_command_clears_configs_and_state(broker):
    device = "t-remove"
    node = node_id(HomeAssistantConfig(), device)
    stale = f"homeassistant/binary_sensor/{node}/gone/config"
    foreign = "homeassistant/sensor/someone-else/faces/config"
    items = {t: json.dumps(p) for t, p in configs_for(device).items()}
    publish_retained(broker, {**items, stale: "{}", foreign: "{}", f"fer-edge/{device}/state": '{"faces": 0}',
                              f"fer-edge/{device}/status": "offline"})
    args = ["--device-id", device, "--set", f"mqtt.host={broker.host}", "--set", f"mqtt.port={broker.port}"]
    r = subprocess.run([sys.executable, "-m", "edge.cli", "homeassistant", "remove", *args], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"removed {len(items) + 1} Home Assistant discovery configs of node {node}" in r.stdout
    assert stale in r.stdout and foreign not in r.stdout
    left = retained(broker, "#")
    assert set(left) == {foreign, f"fer-edge/{device}/status"}, sorted(left)
    # Idempotent: nothing left to remove. --host/--port name the broker as they do for listen and model.
    args = ["--device-id", device, "--host", broker.host, "--port", str(broker.port)]
    r = subprocess.run([sys.executable, "-m", "edge.cli", "homeassistant", "remove", *args], cwd=ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nothing to remove" in r.stdout, r.stdout + r.stderr


def test_remove_command_errors_are_one_line_and_show_needs_no_broker():
    from broker import free_port

    port = free_port()
    r = subprocess.run([sys.executable, "-m", "edge.cli", "homeassistant", "remove", "--set",
                        f"mqtt.port={port}", "--set", "mqtt.host=127.0.0.1"], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"cannot connect to MQTT broker at 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "edge.cli", "homeassistant", "show", "--set",
                        "homeassistant.node_id=bad/id"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("config error: homeassistant.node_id:")
    r = subprocess.run([sys.executable, "-m", "edge.cli", "homeassistant", "show", "--device-id", "kitchen",
                        "--set", "homeassistant.enabled=true"], cwd=ROOT, env=clean_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "homeassistant/event/fer-edge-kitchen/face/config" in r.stdout and '"event_types"' in r.stdout
