"""The MQTT subscriber side that ``demo`` and ``listen`` share: a paho client from the [mqtt] config, a
subscription that fails loudly, and readable one-line events."""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

from edge.cli.common import EXIT_FAIL, UserError


def make_client(mcfg, client_id: str):
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


def print_payload(printer: EventPrinter, payload: bytes) -> None:
    try:
        ev = json.loads(payload)
    except ValueError:
        print(f"(unparseable message: {payload[:80]!r})", flush=True)
        return
    printer(ev)


def subscribe(mcfg, topics: list[str], on_message: Callable[[str, bytes], None], client_id: str,
               timeout: float = 5.0):
    """Connect, subscribe to ``topics`` and wait for the SUBACK; UserError(code 1) if the broker is unreachable."""
    import threading

    client = make_client(mcfg, client_id)
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
