"""Home Assistant MQTT discovery for one fer-edge device, and the retained state topic its entities read.

With ``[homeassistant] enabled = true`` the daemon announces, on every (re)connect and whenever Home Assistant
says it came online (``<discovery_prefix>/status`` = "online"), retained configs under
``<discovery_prefix>/<component>/<node_id>/<object_id>/config`` for one device:

- sensor "Dominant emotion" and sensor/binary_sensor "Faces in view"/"Face in view" (from the state topic),
- event "Face" fired on face ``new``/``end`` (read straight from the faces topic),
- diagnostic sensors: fps, latency, CPU temperature (stats topic) and model version (state topic).

All entities are available while ``<prefix>/<device_id>/status`` is "online". The daemon keeps
``<prefix>/<device_id>/state`` (retained JSON, rate limited) up to date from its own events.

Configs under this device's node id that the current version does not announce (older entities, or all of
them when discovery is switched off) are cleared with empty retained payloads, and
``fer-edge homeassistant remove`` clears every one of them on demand.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import paho.mqtt.client as mqtt

import edge
from edge.mqtt import MqttConfig, MqttError

log = logging.getLogger(__name__)

_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
STATE_SUFFIX = "state"
NONE_EMOTION = "none"  # what the dominant-emotion sensor shows while nobody is in view


@dataclass
class HomeAssistantConfig:
    enabled: bool = False
    discovery_prefix: str = "homeassistant"
    node_id: str = ""  # "" = fer-edge-<device.id> (letters, digits, - and _ only)
    device_name: str = ""  # "" = fer-edge <device.id>
    state_interval_s: float = 1.0  # at most one state message per this many seconds

    def validate(self) -> None:
        """Raise ValueError("<field>: <problem and fix>") for unusable values."""
        p = self.discovery_prefix
        if not p or any(c in p for c in "+#\0 ") or p.startswith("/") or p.endswith("/"):
            raise ValueError(f"discovery_prefix: {p!r} is not a usable topic prefix; use Home Assistant's "
                             "discovery prefix, by default \"homeassistant\"")
        if self.node_id and _ID_CHARS.search(self.node_id):
            raise ValueError(f"node_id: {self.node_id!r} may only contain letters, digits, '-' and '_' "
                             "(or leave it empty for fer-edge-<device id>)")
        if not 0 <= self.state_interval_s <= 3600:
            raise ValueError(f"state_interval_s: {self.state_interval_s} must be 0..3600 s (0 = no rate limit)")


def node_id(cfg: HomeAssistantConfig, device_id: str) -> str:
    """The discovery node id: configured, else fer-edge-<device id> with unusable characters replaced by '_'."""
    return cfg.node_id or _ID_CHARS.sub("_", f"fer-edge-{device_id}")


def device_name(cfg: HomeAssistantConfig, device_id: str) -> str:
    return cfg.device_name or f"fer-edge {device_id}"


# (component, object_id, topic suffix it reads, entity settings). Templates only use JSON fields that the
# state/stats/faces payloads always carry, so Home Assistant never logs template warnings for them.
_EVENT_TEMPLATE = (
    "{% set e = value_json %}{% if e.type in ['new', 'end'] %}"
    "{{ {'event_type': e.type, 'face_id': e.face_id, 'emotion': e.emotion, 'confidence': e.confidence, "
    "'duration_s': e.duration_s, 'dominant': (e.get('summary') or {}).get('dominant', e.emotion)} | to_json }}"
    "{% endif %}"
)
ENTITIES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("sensor", "dominant_emotion", STATE_SUFFIX, {
        "name": "Dominant emotion", "icon": "mdi:emoticon-outline", "device_class": "enum",
        "value_template": "{{ value_json.dominant_emotion or '" + NONE_EMOTION + "' }}",
        "json_attributes_template": "{{ {'emotions': value_json.emotions} | to_json }}"}),
    ("sensor", "faces", STATE_SUFFIX, {
        "name": "Faces in view", "icon": "mdi:account-multiple", "state_class": "measurement",
        "value_template": "{{ value_json.faces }}"}),
    ("binary_sensor", "face_in_view", STATE_SUFFIX, {
        "name": "Face in view", "device_class": "occupancy",
        "value_template": "{{ 'ON' if value_json.faces > 0 else 'OFF' }}"}),
    ("event", "face", "faces", {
        "name": "Face", "icon": "mdi:face-recognition", "event_types": ["new", "end"],
        "value_template": _EVENT_TEMPLATE}),
    ("sensor", "fps", "stats", {
        "name": "Frame rate", "icon": "mdi:speedometer", "unit_of_measurement": "fps",
        "state_class": "measurement", "entity_category": "diagnostic",
        "value_template": "{{ value_json.fps }}"}),
    ("sensor", "latency", "stats", {
        "name": "Latency p50", "icon": "mdi:timer-outline", "unit_of_measurement": "ms",
        "state_class": "measurement", "entity_category": "diagnostic",
        "value_template": "{{ value_json.latency_ms.total.p50_ms }}"}),
    ("sensor", "cpu_temperature", "stats", {
        "name": "CPU temperature", "device_class": "temperature", "unit_of_measurement": "°C",
        "state_class": "measurement", "entity_category": "diagnostic",
        "value_template": "{{ value_json.cpu_temp_c }}"}),
    ("sensor", "model_version", STATE_SUFFIX, {
        "name": "Model version", "icon": "mdi:brain", "entity_category": "diagnostic",
        "value_template": "{{ value_json.model_version }}"}),
)


def config_topic(cfg: HomeAssistantConfig, node: str, component: str, object_id: str) -> str:
    return f"{cfg.discovery_prefix}/{component}/{node}/{object_id}/config"


def config_topics(cfg: HomeAssistantConfig, device_id: str) -> list[str]:
    """Every discovery config topic this device announces."""
    node = node_id(cfg, device_id)
    return [config_topic(cfg, node, comp, obj) for comp, obj, _, _ in ENTITIES]


def node_filter(cfg: HomeAssistantConfig, device_id: str) -> str:
    """Subscription matching every discovery config of this device's node id (also ones no longer announced)."""
    return f"{cfg.discovery_prefix}/+/{node_id(cfg, device_id)}/+/config"


def discovery_configs(cfg: HomeAssistantConfig, mqtt_cfg: MqttConfig, device_id: str, *, labels: list[str],
                      model_version: str) -> dict[str, dict[str, Any]]:
    """{config topic: discovery payload} for every entity of this device."""
    node = node_id(cfg, device_id)
    base = f"{mqtt_cfg.prefix}/{device_id}"
    device = {
        "identifiers": [node],
        "name": device_name(cfg, device_id),
        "manufacturer": "fer-edge",
        "model": f"FER emotion model {model_version}",
        "sw_version": edge.__version__,
    }
    out = {}
    for component, object_id, suffix, settings in ENTITIES:
        payload: dict[str, Any] = {
            **settings,
            "unique_id": f"{node}_{object_id}",
            "state_topic": f"{base}/{suffix}",
            "availability_topic": f"{base}/status",
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": mqtt_cfg.qos if suffix == "faces" else 0,
            "device": device,
            "origin": {"name": "fer-edge", "sw_version": edge.__version__},
        }
        if object_id == "dominant_emotion":
            payload["options"] = [*labels, NONE_EMOTION]
            payload["json_attributes_topic"] = f"{base}/{suffix}"
        out[config_topic(cfg, node, component, object_id)] = payload
    return out


def iso_utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dominant(faces: dict[str, tuple[str, float]], labels: list[str]) -> Optional[str]:
    """Most frequent emotion among the faces in view; ties go to the higher summed confidence, then label order."""
    if not faces:
        return None
    count: collections.Counter = collections.Counter()
    conf: collections.Counter = collections.Counter()
    for emotion, confidence in faces.values():
        count[emotion] += 1
        conf[emotion] += confidence
    order = {lab: i for i, lab in enumerate(labels)}
    return max(count, key=lambda e: (count[e], conf[e], -order.get(e, len(order))))


class HomeAssistant:
    """Announces the device to Home Assistant through ``publisher`` and keeps its state topic current.

    Construct it before ``publisher.start()``: it registers a connect callback (re-announce on every
    reconnect) and subscriptions (Home Assistant's birth message; this node's retained configs, to clear
    stale ones). With ``cfg.enabled`` false it only clears configs left from when discovery was on.
    Call ``on_event`` for every event payload, ``tick`` from the main loop and ``close`` before stopping the
    publisher. ``on_event``/``tick``/``close`` run in the main thread, the callbacks in paho's network thread.
    """

    def __init__(self, cfg: HomeAssistantConfig, publisher, device_id: str, *, labels: list[str],
                 model_version: str) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.device_id = device_id
        self.labels = list(labels)
        self.node = node_id(cfg, device_id)
        self._lock = threading.Lock()
        self._model_version = model_version
        self._faces: dict[str, tuple[str, float]] = {}
        self._since = time.time()
        self._published_key: Optional[tuple] = None
        self._last_publish_mono = float("-inf")
        self._announced: set[str] = set()
        self._cleared: set[str] = set()
        self.cleared = 0  # stale retained configs removed
        publisher.add_connect_callback(self._on_connect)
        publisher.subscribe(node_filter(cfg, device_id), self._on_node_config)
        if cfg.enabled:
            publisher.subscribe(f"{cfg.discovery_prefix}/status", self._on_ha_status)
            log.info("Home Assistant discovery on: device %s (node %s) under %s/", device_name(cfg, device_id),
                     self.node, cfg.discovery_prefix)

    # --- main thread ------------------------------------------------------------------------------------------

    def on_event(self, payload: dict) -> None:
        """Fold one face event payload into the state (faces in view and their emotions)."""
        if not self.cfg.enabled:
            return
        kind, face = payload.get("type"), payload.get("face_id")
        version = (payload.get("model") or {}).get("version")
        reannounce = False
        with self._lock:
            if kind == "end":
                self._faces.pop(face, None)
            elif kind in ("new", "update"):
                self._faces[face] = (str(payload.get("emotion")), float(payload.get("confidence") or 0.0))
            else:
                return
            self._since = float(payload.get("epoch") or time.time())
            if version and version != self._model_version:  # the model was swapped at run time
                self._model_version = str(version)
                reannounce = True
        if reannounce:
            self.announce()

    def tick(self, now: Optional[float] = None) -> bool:
        """Publish the state if it changed and the rate limit allows; True if published."""
        if not self.cfg.enabled:
            return False
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._key() == self._published_key or now - self._last_publish_mono < self.cfg.state_interval_s:
                return False
        return self._publish_state(now)

    def close(self) -> None:
        """Publish the final state now (normally nobody in view after the tracker's flush)."""
        if self.cfg.enabled:
            with self._lock:
                changed = self._key() != self._published_key
            if changed:
                self._publish_state(time.monotonic())

    def state(self) -> dict[str, Any]:
        """The state payload: faces in view, their dominant emotion, each face's emotion, model version, time."""
        with self._lock:
            return self._state()

    # --- internals ------------------------------------------------------------------------------------------

    def _key(self) -> tuple:
        return tuple(sorted((f, e) for f, (e, _) in self._faces.items())), self._model_version

    def _state(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "faces": len(self._faces),
            "dominant_emotion": dominant(self._faces, self.labels),
            "emotions": {f: e for f, (e, _) in sorted(self._faces.items())},
            "model_version": self._model_version,
            "timestamp": iso_utc(self._since),
            "epoch": round(self._since, 3),
        }

    def _publish_state(self, now: float) -> bool:
        with self._lock:
            key, state = self._key(), self._state()
        ok = self.publisher.publish(STATE_SUFFIX, state, qos=0, retain=True)
        if ok:  # not connected: keep it pending; the next tick or the reconnect sends it
            with self._lock:
                self._published_key = key
                self._last_publish_mono = now
        return ok

    def announce(self) -> int:
        """(Re)publish every retained discovery config; returns how many were handed to the client."""
        with self._lock:
            version = self._model_version
        configs = discovery_configs(self.cfg, self.publisher.cfg, self.device_id, labels=self.labels,
                                    model_version=version)
        sent = sum(bool(self.publisher.publish(topic, payload, qos=0, retain=True, full_topic=True))
                   for topic, payload in configs.items())
        self._announced = set(configs)
        log.info("Home Assistant discovery: announced %d of %d entities", sent, len(configs))
        return sent

    def _on_connect(self) -> None:
        if not self.cfg.enabled:
            return
        self.announce()
        with self._lock:
            self._published_key = None  # a fresh broker may have lost the retained state
        self._publish_state(time.monotonic())

    def _on_ha_status(self, topic: str, payload: bytes) -> None:
        if payload.strip() == b"online":  # Home Assistant (re)started: it may have missed retained configs
            log.info("Home Assistant came online: announcing the device again")
            self._on_connect()

    def _on_node_config(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # an already cleared config (or our own clearing echoed back)
        if self.cfg.enabled and (topic in self._announced or topic in config_topics(self.cfg, self.device_id)):
            return
        if topic in self._cleared:
            return
        self._cleared.add(topic)
        if self.publisher.publish(topic, "", qos=1, retain=True, full_topic=True):
            self.cleared += 1
            why = "no longer announced" if self.cfg.enabled else "homeassistant.enabled = false"
            log.info("Home Assistant discovery: cleared retained %s (%s)", topic, why)
            if not self.cfg.enabled and self.cleared == 1:
                self.publisher.publish(STATE_SUFFIX, "", qos=1, retain=True)
        else:
            self._cleared.discard(topic)


# --- removal without the daemon (`fer-edge homeassistant remove`) ------------------------------------------------

@dataclass
class RemoveResult:
    cleared: list[str]  # config topics that held a retained config and were cleared
    daemon_status: Optional[str]  # retained status of the device ("online"/"offline"), None if unknown


def remove_device(hcfg: HomeAssistantConfig, mcfg: MqttConfig, device_id: str, *, timeout: float = 5.0,
                  settle_s: float = 0.5) -> RemoveResult:
    """Clear this device's retained discovery configs (and its state) with empty retained payloads.

    Clears every config under the node id (also ones this version no longer announces). Raises MqttError
    if the broker cannot be reached or refuses.
    """
    node_sub = node_filter(hcfg, device_id)
    base = f"{mcfg.prefix}/{device_id}"
    found: dict[str, bool] = {}
    status: list[str] = []
    subscribed = threading.Event()
    failure: list[str] = []
    last_msg = [time.monotonic()]

    def on_connect(c, _u, _f, reason_code, _p):
        if reason_code.is_failure:
            failure.append(str(reason_code))
            subscribed.set()
            return
        c.subscribe([(node_sub, 1), (f"{base}/status", 1)])

    def on_subscribe(_c, _u, _mid, _codes, _p):
        subscribed.set()

    def on_message(_c, _u, msg):
        last_msg[0] = time.monotonic()
        if msg.topic == f"{base}/status":
            status.append(msg.payload.decode("utf-8", "replace"))
        elif msg.payload:
            found[msg.topic] = True

    client = _client(mcfg, f"fer-edge-ha-remove-{device_id}"[:64])
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    where = f"{mcfg.host}:{mcfg.port}"
    try:
        client.connect(mcfg.host, mcfg.port, keepalive=mcfg.keepalive)
    except (OSError, ValueError) as e:
        raise MqttError(f"cannot connect to MQTT broker at {where}: {e}") from None
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        if not subscribed.wait(timeout) or failure:
            raise MqttError(f"MQTT broker at {where} refused: {failure[0] if failure else 'no answer'}")
        # Retained messages follow the SUBACK; wait until they stop arriving.
        last_msg[0] = time.monotonic()
        while time.monotonic() - last_msg[0] < settle_s and time.monotonic() < deadline:
            time.sleep(0.05)
        topics = sorted(set(found) | set(config_topics(hcfg, device_id)))
        infos = [client.publish(t, b"", qos=1, retain=True) for t in topics]
        infos.append(client.publish(f"{base}/{STATE_SUFFIX}", b"", qos=1, retain=True))
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise MqttError(f"MQTT broker at {where} did not confirm the removal within {timeout:g}s")
    finally:
        client.disconnect()
        client.loop_stop()
    return RemoveResult(cleared=sorted(found), daemon_status=status[-1] if status else None)


def _client(mcfg: MqttConfig, client_id: str) -> mqtt.Client:
    proto = mqtt.MQTTv5 if mcfg.protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
    if mcfg.username:
        client.username_pw_set(mcfg.username, mcfg.password or None)
    if mcfg.tls:
        try:
            client.tls_set(ca_certs=mcfg.ca_file or None, certfile=mcfg.cert_file or None,
                           keyfile=mcfg.key_file or None)
        except (OSError, ValueError) as e:
            raise MqttError(f"mqtt TLS setup failed ({e}); check mqtt.ca_file, mqtt.cert_file, mqtt.key_file") \
                from None
        if mcfg.tls_insecure:
            client.tls_insecure_set(True)
    return client


def dumps(configs: dict[str, dict[str, Any]]) -> str:
    """Discovery configs as text: one topic line and its indented JSON payload per entity."""
    return "\n".join(f"{topic}\n{json.dumps(payload, indent=2, ensure_ascii=False)}" for topic, payload in
                     configs.items())
