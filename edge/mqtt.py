"""MQTT publisher for face events: non-blocking, ordered, at-least-once delivery across broker outages.

Topics: <prefix>/<device_id>/faces (events, QoS cfg.qos), .../status (retained "online"/"offline", "offline" also as
Last Will), .../stats (best-effort JSON published by the service).

Events go into a bounded in-memory outbox. A sender thread hands them to paho in order, at most _WINDOW at a time,
only while connected, and removes each one only when paho reports it published (PUBACK for QoS 1). Events already
handed to paho when the connection drops are retransmitted by paho right after the reconnect; new ones wait until
those are acknowledged so the broker sees them in order. Duplicates are possible (at-least-once), losses are not
unless the outbox overflows or the process exits with events unsent.

A full outbox gives up events in this order, so that what is delivered stays a consistent story per face:
1. the oldest queued ``update`` (they are periodic snapshots; a later one or the ``end`` summary supersedes them);
2. else the oldest face whose ``new`` is still queued, with every queued event of that face; if that face has not
   ended yet, its later events are dropped as they come (a consumer never sees an update or end without its new);
3. else (only ``end`` events of faces whose ``new`` was already sent are queued) the oldest of those, logged as an
   error: the one case where a consumer sees a new without its end.
Every dropped event is counted, by type.

With a ``spill_path`` (the service uses <state_dir>/mqtt-outbox.jsonl), events still undelivered when stop() gives
up are written there (write, fsync, rename) and queued first by the next start(), so a clean stop or restart during
a broker outage loses nothing. A crash or power cut still loses the in-memory outbox: journaling every event with an
fsync would cost SD card wear for every event (scripts/outbox_persist_cost.py).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

_WINDOW = 20  # events in flight (handed to paho, awaiting PUBACK) at once
_WARN_EVERY_S = 60.0  # repeat "still unreachable" / "still dropping" warnings at most this often
_AUTH_REASONS = {134, 135, 140}  # bad user name or password, not authorized, bad authentication method
SPILL_FORMAT = "fer-edge-outbox/1"
_SPILL_MAX_LINE = 1 << 20  # an event is ~1 KB; a longer line is not one of ours


class MqttError(Exception):
    """Unusable MQTT setup (e.g. TLS files); the message says what to fix."""


@dataclass
class MqttConfig:
    enabled: bool = True
    host: str = "localhost"
    port: int = 1883
    prefix: str = "fer-edge"
    client_id: str = ""  # "" = fer-edge-<device_id>
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # "" = system CA store
    cert_file: str = ""  # client certificate (mutual TLS)
    key_file: str = ""
    tls_insecure: bool = False  # skip broker hostname verification
    keepalive: int = 30
    protocol: str = "3.1.1"  # "3.1.1" | "5"
    qos: int = 1
    buffer_size: int = 10000  # events kept while the broker is unreachable
    stats_interval_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0

    def validate(self) -> None:
        """Raise ValueError("<field>: <problem and fix>") for unusable values."""
        if self.enabled and not self.host.strip():
            raise ValueError("host: empty; set the broker host name or IP (or enabled = false)")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port; use 1..65535 (1883 plain, 8883 TLS)")
        if not self.prefix or any(c in self.prefix for c in "+#\0") or self.prefix.startswith("/") \
                or self.prefix.endswith("/"):
            raise ValueError(f"prefix: {self.prefix!r} is not a usable topic prefix; use e.g. \"fer-edge\" "
                             "(no wildcards, no leading/trailing '/')")
        if any(c in self.client_id for c in "+#/\0"):
            raise ValueError(f"client_id: {self.client_id!r} must not contain + # / characters")
        if self.protocol not in ("3.1.1", "5"):
            raise ValueError(f"protocol: {self.protocol!r} is not supported; use \"3.1.1\" or \"5\"")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos: {self.qos} is not an MQTT QoS; use 0, 1 (default, at-least-once) or 2")
        # About 1 KB of memory per buffered event: a million is already 1 GB, more than a Pi should spend.
        if not 1 <= self.buffer_size <= 1_000_000:
            raise ValueError(f"buffer_size: {self.buffer_size} out of range; use 1..1000000 events (default 10000)")
        if not 5 <= self.keepalive <= 65535:
            raise ValueError(f"keepalive: {self.keepalive} s out of range; use 5..65535 (default 30)")
        # Below 0.1 s a refused connection becomes a busy loop that also hammers the broker.
        if not 0.1 <= self.reconnect_min_s <= 3600:
            raise ValueError(f"reconnect_min_s: {self.reconnect_min_s} s out of range; use 0.1..3600 (default 1)")
        if not self.reconnect_min_s <= self.reconnect_max_s <= 3600:
            raise ValueError(f"reconnect_max_s: {self.reconnect_max_s} s out of range; use reconnect_min_s "
                             f"({self.reconnect_min_s})..3600 (default 60)")
        if not 0 <= self.stats_interval_s <= 86_400:
            raise ValueError(f"stats_interval_s: {self.stats_interval_s} s out of range; use 0..86400 (0 = no stats)")
        if self.password and not self.username:
            raise ValueError("password: set but username is empty; set username too")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not self.tls:
                raise ValueError(f"{name}: set but tls = false; set tls = true or clear {name}")
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: file {path!r} not found; fix the path or clear it")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file: set without cert_file; set both for client-certificate TLS")
        if self.tls_insecure and not self.tls:
            raise ValueError("tls_insecure: set but tls = false; set tls = true or tls_insecure = false")


_KINDS = ("new", "update", "end")


class _Entry:
    __slots__ = ("payload", "kind", "face", "gen", "mid", "acked")

    def __init__(self, payload: bytes, kind: Optional[str] = None, face: Optional[str] = None) -> None:
        self.payload = payload
        self.kind = kind  # "new" | "update" | "end", or None for other payloads (dropped like updates)
        self.face = face
        self.gen = -1  # connection generation it was handed to paho in
        self.mid: Optional[int] = None
        self.acked = False


class MqttPublisher:
    """Publishes face events, status and stats for one device. Thread-safe; publish_event never blocks."""

    def __init__(self, cfg: MqttConfig, device_id: str, *, spill_path: str | os.PathLike | None = None) -> None:
        if not device_id or any(c in device_id for c in "/+#\0"):
            raise MqttError(f"device id {device_id!r} is not usable in MQTT topics; use letters, digits, - or _")
        self.cfg = cfg
        self.spill_path = Path(spill_path) if spill_path else None
        self.saved = 0  # events written to spill_path by stop()
        self.device_id = device_id
        self.client_id = cfg.client_id or f"fer-edge-{device_id}"
        self._faces_topic = self.topic("faces")
        self._status_topic = self.topic("status")

        self._cond = threading.Condition()
        self._pending: collections.deque[_Entry] = collections.deque()
        self._inflight: collections.deque[_Entry] = collections.deque()
        self._by_mid: dict[int, _Entry] = {}
        self._early_acks: set[int] = set()  # mids acked while the sender was inside client.publish()
        self._publishing = False
        self._connected = False
        self._gen = 0
        self._ever_connected = False
        self._started = False
        self._stopping = False
        self._closed = False
        self._sent = 0
        self._dropped = 0
        self._dropped_by_type: collections.Counter = collections.Counter()
        self._suppressed: set[str] = set()  # faces whose new was dropped: their later events are dropped too
        # What _pending holds, by kind and by face, so a full outbox finds its victim without scanning it all.
        self._queued_kinds: collections.Counter = collections.Counter()
        self._queued_faces: collections.Counter = collections.Counter()
        self._reconnects = 0
        self._fail_streak = 0
        self._last_fail_warn = 0.0
        self._last_drop_warn = 0.0
        self._subs: dict[str, Callable[[str, bytes], None]] = {}
        self._connect_callbacks: list[Callable[[], None]] = []
        self._sender: Optional[threading.Thread] = None
        self._client = self._make_client() if cfg.enabled else None

    # ---- public API -------------------------------------------------------------------------------------------

    def topic(self, suffix: str) -> str:
        """Full topic for a suffix: <prefix>/<device_id>/<suffix>."""
        return f"{self.cfg.prefix}/{self.device_id}/{suffix}"

    def start(self) -> None:
        """Begin connecting in the background; returns immediately (events are buffered until connected)."""
        if self._client is None:
            log.info("MQTT disabled (mqtt.enabled = false); events are not published")
            return
        if self._started:
            return
        self._started = True
        self._load_spill()
        kwargs = {"clean_start": True} if self.cfg.protocol == "5" else {}
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, **kwargs)
        log.info("MQTT connecting to %s:%d as %s (MQTT %s%s), events on %s", self.cfg.host, self.cfg.port,
                 self.client_id, self.cfg.protocol, ", TLS" if self.cfg.tls else "", self._faces_topic)
        self._client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._sender.start()

    def publish_event(self, payload: dict) -> None:
        """Queue one event for ordered at-least-once delivery; never blocks. Full outbox: see the module docstring."""
        if self._client is None:
            return
        try:
            data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            log.error("MQTT event skipped: not JSON-serializable (%s)", exc)
            return
        kind = payload.get("type") if payload.get("type") in _KINDS else None
        face = payload.get("face_id") if kind is not None and isinstance(payload.get("face_id"), str) else None
        entry = _Entry(data, kind, face)
        with self._cond:
            if self._closed:
                self._drop(entry, "publisher already stopped")
                return
            if face is not None and face in self._suppressed:
                if kind == "end":
                    self._suppressed.discard(face)
                self._drop(entry, "its face's new was dropped")
                return
            self._pending.append(entry)
            self._queued(entry, 1)
            while len(self._pending) > self.cfg.buffer_size:
                self._evict()
            self._cond.notify_all()

    def dropped_by_type(self) -> dict[str, int]:
        """Events dropped so far by type ("new", "update", "end"; "other" for non-event payloads)."""
        with self._cond:
            return {k: v for k, v in self._dropped_by_type.items() if v}

    def publish(self, suffix: str, payload: dict | str, qos: int = 0, retain: bool = False, *,
                full_topic: bool = False) -> bool:
        """Best-effort publish to topic(suffix) (e.g. stats), or to ``suffix`` as is with full_topic=True;
        False when not connected or not sendable."""
        if self._client is None or not self._connected:
            return False
        try:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"),
                                                                       allow_nan=False)
        except (TypeError, ValueError) as exc:
            log.error("MQTT %s message skipped: not JSON-serializable (%s)", suffix, exc)
            return False
        topic = suffix if full_topic else self.topic(suffix)
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def subscribe(self, suffix_or_full_topic: str, callback: Callable[[str, bytes], None]) -> None:
        """Call callback(topic, payload_bytes) for messages on a topic (no '/' = suffix under this device).

        Subscriptions are renewed after every reconnect.
        """
        if self._client is None:
            return
        topic = suffix_or_full_topic if "/" in suffix_or_full_topic else self.topic(suffix_or_full_topic)

        def _on_message(client, userdata, msg) -> None:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception as exc:  # a faulty handler must not kill the network thread
                log.error("MQTT handler for %s failed: %r", msg.topic, exc)

        self._subs[topic] = callback
        self._client.message_callback_add(topic, _on_message)
        if self._connected:
            self._client.subscribe(topic, qos=1)

    def add_connect_callback(self, callback: Callable[[], None]) -> None:
        """Call callback() in the network thread after every successful (re)connect, once publish() works,
        e.g. to re-publish retained messages a restarted broker lost."""
        self._connect_callbacks.append(callback)

    def stop(self, timeout: float = 5.0) -> int:
        """Flush buffered events (bounded by timeout), publish retained "offline", disconnect; save what is left
        to spill_path if set.

        Returns the number of events lost: left undelivered and not saved.
        """
        if self._client is None or not self._started or self._closed:
            return self._unsent()
        t0 = time.monotonic()
        offline_budget = min(1.0, timeout * 0.2)
        flush_until = t0 + max(0.0, timeout - offline_budget)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pending and not self._inflight,
                                max(0.0, flush_until - time.monotonic()))
            self._closed = True
            self._cond.notify_all()
        if self._sender is not None:
            self._sender.join(1.0)
        if self._connected:
            info = self._client.publish(self._status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, t0 + timeout - time.monotonic()))
            except (RuntimeError, ValueError):
                pass
            if not info.is_published():
                log.warning("MQTT could not confirm the \"offline\" status before disconnecting")
        self._client.disconnect()
        # loop_stop() can wait for a keepalive timeout on a dead link; don't let that hang a shutdown.
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-loop-stop", daemon=True)
        stopper.start()
        stopper.join(2.0)
        unsent = self._unsent()
        if unsent and self.spill_path is not None:
            self.saved = self._save_spill()
        if unsent > self.saved:
            log.warning("MQTT stopped: %d events not delivered (%d sent, %d dropped)", unsent - self.saved,
                        self._sent, self._dropped)
        elif unsent:
            log.info("MQTT stopped: %d events saved for the next start (%d sent, %d dropped)", self.saved,
                     self._sent, self._dropped)
        else:
            log.info("MQTT stopped: all events delivered (%d sent, %d dropped)", self._sent, self._dropped)
        return unsent - self.saved

    def stats(self) -> dict:
        """Counters: connected, buffered (not yet acknowledged), dropped, sent, reconnects."""
        with self._cond:
            return {"connected": self._connected, "buffered": len(self._pending) + len(self._inflight),
                    "dropped": self._dropped, "sent": self._sent, "reconnects": self._reconnects}

    # ---- internals --------------------------------------------------------------------------------------------

    def _drop(self, entry: _Entry, why: str) -> None:
        # Called with self._cond held.
        self._dropped += 1
        self._dropped_by_type[entry.kind or "other"] += 1
        log.debug("MQTT %s event of face %s dropped: %s", entry.kind or "other", entry.face, why)

    def _queued(self, entry: _Entry, n: int) -> None:
        # Called with self._cond held, n = +1 when entry enters _pending, -1 when it leaves.
        self._queued_kinds[entry.kind if entry.kind in ("new", "end") else "update"] += n
        if entry.face is not None:
            self._queued_faces[entry.face] += n
            if self._queued_faces[entry.face] <= 0:
                del self._queued_faces[entry.face]

    def _evict(self) -> None:
        """Make room in the full outbox by the rules in the module docstring. Called with self._cond held."""
        pending = self._pending
        victims: list[int] = []
        if self._queued_kinds["update"] > 0:
            victims = [next(i for i, e in enumerate(pending) if e.kind in ("update", None))]
        elif self._queued_kinds["new"] > 0:
            i = next(i for i, e in enumerate(pending) if e.kind == "new")
            face, left = pending[i].face, self._queued_faces[pending[i].face]
            for j in range(i, len(pending)):
                if pending[j].face == face:
                    victims.append(j)
                    if len(victims) == left:
                        break
            if not any(pending[j].kind == "end" for j in victims):
                self._suppressed.add(face)  # still in view: the rest of it must not arrive either
        else:
            victims = [0]  # only ends of faces already announced are queued: one of them has to go
        kinds = collections.Counter()
        for i in reversed(victims):
            e = pending[i]
            del pending[i]
            self._queued(e, -1)
            self._drop(e, "outbox full")
            kinds[e.kind or "other"] += 1
        now = time.monotonic()
        first_of_kind = any(self._dropped_by_type[k] == n for k, n in kinds.items())
        if first_of_kind or now - self._last_drop_warn >= _WARN_EVERY_S:
            self._last_drop_warn = now
            level = logging.ERROR if kinds.get("end") and len(victims) == 1 else logging.WARNING
            log.log(level, "MQTT outbox full (%d events, broker unreachable?): dropping %s; %d dropped so far "
                    "(%s)%s", self.cfg.buffer_size, ", ".join(f"{n} {k}" for k, n in kinds.items()), self._dropped,
                    ", ".join(f"{k} {n}" for k, n in sorted(self._dropped_by_type.items())),
                    "; the end of a face whose new was delivered was lost: raise mqtt.buffer_size"
                    if level == logging.ERROR else "")

    def _save_spill(self) -> int:
        """Write the undelivered events (in order) to spill_path atomically; returns how many were saved."""
        path = self.spill_path
        with self._cond:
            # In flight first: they are older. Some may have reached the broker (duplicates: at-least-once).
            entries = [e for e in self._inflight if not e.acked] + list(self._pending)
        header = json.dumps({"format": SPILL_FORMAT, "topic": self._faces_topic, "events": len(entries),
                             "saved": round(time.time(), 3)}).encode()
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(header + b"\n")
                fh.writelines(e.payload + b"\n" for e in entries)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.error("MQTT could not save %d undelivered events to %s (%s): they are lost", len(entries), path,
                      exc.strerror or exc)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return 0
        log.warning("MQTT saved %d undelivered events to %s; they are sent first after the next start",
                    len(entries), path)
        return len(entries)

    def _load_spill(self) -> None:
        """Queue the events a previous stop() saved, ahead of anything newer, then remove the file."""
        path = self.spill_path
        if path is None:
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("MQTT cannot read saved events %s: %s", path, exc.strerror or exc)
            return
        limit = self.cfg.buffer_size * 64 * 1024 + 4096
        problem = ("not a regular file" if not stat.S_ISREG(st.st_mode)
                   else f"{st.st_size} bytes, more than mqtt.buffer_size events can be" if st.st_size > limit else "")
        entries: list[_Entry] = []
        skipped = 0
        if not problem:
            try:
                with open(path, "rb") as fh:
                    head = json.loads(fh.readline(_SPILL_MAX_LINE) or b"null")
                    if not isinstance(head, dict) or head.get("format") != SPILL_FORMAT:
                        problem = f"not a {SPILL_FORMAT} file"
                    elif head.get("topic") != self._faces_topic:
                        # Another device id or prefix: its events belong to that topic, not to ours. Keep them.
                        log.warning("MQTT saved events in %s are for %s, not %s: left in place", path,
                                    head.get("topic"), self._faces_topic)
                        return
                    else:
                        for line in fh:
                            try:
                                payload = json.loads(line)
                                if not isinstance(payload, dict) or len(line) > _SPILL_MAX_LINE:
                                    raise ValueError("not an event")
                            except ValueError:
                                skipped += 1
                                continue
                            kind = payload.get("type") if payload.get("type") in _KINDS else None
                            face = payload.get("face_id") if isinstance(payload.get("face_id"), str) else None
                            entries.append(_Entry(line.rstrip(b"\n"), kind, face if kind else None))
            except (OSError, ValueError) as exc:
                problem = f"unreadable ({exc})"
        if problem:
            aside = path.with_name(path.name + ".bad")
            log.error("MQTT saved events %s are %s: moved to %s, not sent", path, problem, aside)
            try:
                os.replace(path, aside)
            except OSError:
                pass
            return
        try:
            path.unlink()
        except OSError as exc:
            log.error("MQTT cannot remove %s after loading it (%s): its events may be sent again next start", path,
                      exc.strerror or exc)
        with self._cond:
            queued = list(self._pending)
            self._pending.clear()
            self._queued_kinds.clear()
            self._queued_faces.clear()
            for e in entries + queued:
                self._pending.append(e)
                self._queued(e, 1)
            while len(self._pending) > self.cfg.buffer_size:
                self._evict()
        log.info("MQTT queued %d events saved at the last stop%s; they are sent first", len(entries),
                 f" ({skipped} unreadable lines skipped)" if skipped else "")

    def _unsent(self) -> int:
        with self._cond:
            # Acknowledged entries wait in _inflight only until the ones before them are acknowledged too.
            return len(self._pending) + sum(1 for e in self._inflight if not e.acked)

    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        if cfg.protocol == "5":
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=mqtt.MQTTv311, clean_session=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            try:
                client.tls_set(ca_certs=cfg.ca_file or None, certfile=cfg.cert_file or None,
                               keyfile=cfg.key_file or None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise MqttError(f"mqtt TLS setup failed ({exc}); check mqtt.ca_file, mqtt.cert_file, "
                                "mqtt.key_file") from None
            if cfg.tls_insecure:
                client.tls_insecure_set(True)
        client.will_set(self._status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        # Room for status/stats next to the event window, so paho never has to queue events itself.
        client.max_inflight_messages_set(_WINDOW + 10)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _next_delay(self) -> float:
        n = max(1, self._fail_streak)
        return min(self.cfg.reconnect_min_s * 2 ** (n - 1), self.cfg.reconnect_max_s)

    def _should_warn(self) -> bool:
        now = time.monotonic()
        if self._fail_streak == 1 or now - self._last_fail_warn >= _WARN_EVERY_S:
            self._last_fail_warn = now
            return True
        return False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        where = f"{self.cfg.host}:{self.cfg.port}"
        if reason_code.is_failure:
            self._fail_streak += 1
            if self._should_warn():
                if reason_code.value in _AUTH_REASONS:
                    log.error("MQTT broker %s refused the login (%s): not authorized: check "
                              "mqtt.username/mqtt.password; retrying in %.3g s", where, reason_code,
                              self._next_delay())
                else:
                    log.error("MQTT broker %s refused the connection (%s); retrying in %.3g s", where,
                              reason_code, self._next_delay())
            return
        self._fail_streak = 0
        client.publish(self._status_topic, "online", qos=1, retain=True)
        if self._subs:
            client.subscribe([(t, 1) for t in self._subs])
        with self._cond:
            if self._ever_connected:
                self._reconnects += 1
            self._ever_connected = True
            self._connected = True
            self._gen += 1
            backlog = len(self._pending) + len(self._inflight)
            self._cond.notify_all()
        log.info("MQTT connected to %s as %s%s", where, self.client_id,
                 f"; delivering {backlog} buffered events" if backlog else "")
        for callback in self._connect_callbacks:
            try:
                callback()
            except Exception as exc:  # a faulty callback must not kill the network thread
                log.error("MQTT connect callback failed: %r", exc)

    def _on_connect_fail(self, client, userdata) -> None:
        self._fail_streak += 1
        if self._should_warn():
            log.warning("MQTT broker %s:%d unreachable (%s); retrying in %.3g s, events are buffered",
                        self.cfg.host, self.cfg.port, self._diagnose(), self._next_delay())
        else:
            log.debug("MQTT broker still unreachable (%d attempts)", self._fail_streak)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was_connected, self._connected = self._connected, False
            buffered = len(self._pending) + len(self._inflight)
            self._cond.notify_all()
        if not was_connected:
            return  # refused CONNACK, already logged
        if self._stopping:
            log.info("MQTT disconnected from %s:%d", self.cfg.host, self.cfg.port)
            return
        self._fail_streak = 1
        log.warning("MQTT disconnected from %s:%d (%s); reconnecting in %.3g s, %d events buffered",
                    self.cfg.host, self.cfg.port, reason_code, self._next_delay(), buffered)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            entry = self._by_mid.pop(mid, None)
            if entry is not None:
                self._ack(entry, reason_code)
            elif self._publishing:
                self._early_acks.add(mid)

    def _ack(self, entry: _Entry, reason_code) -> None:
        # Called with self._cond held. An MQTT 5 PUBACK may carry a failure reason (e.g. quota exceeded,
        # not authorized for the topic): the broker refused the event, so resending it would loop forever.
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            self._dropped += 1
            self._dropped_by_type[entry.kind or "other"] += 1
            now = time.monotonic()
            if now - self._last_drop_warn >= _WARN_EVERY_S or self._dropped == 1:
                self._last_drop_warn = now
                log.error("MQTT broker rejected an event on %s (%s): check the broker ACL for this user; "
                          "%d events dropped so far", self._faces_topic, reason_code, self._dropped)
        else:
            self._sent += 1
        entry.acked = True
        while self._inflight and self._inflight[0].acked:
            self._inflight.popleft()
        self._cond.notify_all()

    def _can_send(self) -> bool:
        # New events wait while events from an earlier connection are still unacknowledged: paho resends those
        # right after the CONNACK, and they must reach the broker first.
        return (self._connected and bool(self._pending) and len(self._inflight) < _WINDOW
                and all(e.gen == self._gen for e in self._inflight if not e.acked))

    def _send_loop(self) -> None:
        client = self._client
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._can_send())
                if self._closed:
                    return
                entry = self._pending.popleft()
                self._queued(entry, -1)
                entry.gen = self._gen
                self._inflight.append(entry)
                self._publishing = True
                self._early_acks.clear()
            try:
                # Without our lock: paho calls on_publish while holding its own lock.
                info = client.publish(self._faces_topic, entry.payload, qos=self.cfg.qos)
            except Exception as exc:  # e.g. ValueError for an oversized payload: this event can never be sent
                info = None
                log.error("MQTT event dropped: %s", exc)
            with self._cond:
                self._publishing = False
                if info is None:
                    self._dropped += 1
                    self._dropped_by_type[entry.kind or "other"] += 1
                    entry.acked = True
                    self._ack_cleanup()
                elif info.rc == mqtt.MQTT_ERR_NO_CONN and self.cfg.qos == 0:
                    # QoS 0 is not kept by paho while disconnected: take it back, in front.
                    self._inflight.remove(entry)
                    self._pending.appendleft(entry)
                    self._queued(entry, 1)
                elif info.mid in self._early_acks:
                    self._ack(entry, None)
                else:
                    # rc NO_CONN with QoS > 0: paho keeps the message and sends it after the reconnect.
                    entry.mid = info.mid
                    self._by_mid[info.mid] = entry
                self._early_acks.clear()

    def _ack_cleanup(self) -> None:
        while self._inflight and self._inflight[0].acked:
            self._inflight.popleft()
        self._cond.notify_all()

    def _diagnose(self) -> str:
        """Why the TCP/TLS connection failed, for the log line (blocks up to 1 s, only on warning lines)."""
        try:
            with socket.create_connection((self.cfg.host, self.cfg.port), timeout=1.0):
                pass
        except socket.gaierror:
            return f"cannot resolve host name {self.cfg.host!r}: check mqtt.host"
        except ConnectionRefusedError:
            return "connection refused: is the broker running and is mqtt.port right?"
        except socket.timeout:
            return "connection timed out: check network/firewall"
        except OSError as exc:
            return exc.strerror or str(exc)
        if self.cfg.tls:
            return ("TCP works but the TLS handshake failed: check mqtt.ca_file/cert_file/key_file, tls_insecure, "
                    "and that the port is a TLS listener")
        return "TCP works but the MQTT connection failed: is the port a plain MQTT listener?"
