"""The MQTT subscriber side that ``demo`` and ``listen`` share: a paho client from the [mqtt] config, a
subscription that fails loudly, and readable one-line events."""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

from edge.cli.common import EXIT_FAIL, UserError, plural


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
    """Turns event payloads into readable lines and keeps a per-face summary.

    Lines are stamped with the time they arrive, so they are in order: an ``end`` is sent ``track.max_missed_s``
    after the face was last seen (its ``epoch``), i.e. after updates of other faces that carry later epochs.
    """

    def __init__(self, out=None, t0: float | None = None, clock: Callable[[], float] = time.time):
        self.out = out or sys.stdout
        self.t0 = t0
        self.clock = clock
        self.counts: dict[str, int] = {}
        self.ended: list[dict] = []
        self.faces: set[str] = set()
        self.first_bbox: dict[str, dict] = {}  # face_id -> bbox of its first event
        self.emotions: dict[str, list[str]] = {}  # face_id -> emotions it was reported with, repeats collapsed
        self.received = 0

    def line(self, ev: dict) -> str:
        t = self.clock()
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
        fid = str(ev.get("face_id", "?"))
        self.faces.add(fid)
        if isinstance(ev.get("bbox"), dict):
            self.first_bbox.setdefault(fid, ev["bbox"])
        if ev.get("type") == "end":
            self.ended.append(ev)
        elif ev.get("emotion"):
            seen = self.emotions.setdefault(fid, [])
            if not seen or seen[-1] != ev["emotion"]:
                seen.append(str(ev["emotion"]))
        print(self.line(ev), file=self.out, flush=True)

    def summary(self) -> str:
        parts = [f"{plural(self.received, 'event')} from {plural(len(self.faces), 'face')} "
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


def stdout_closed() -> None:
    """The reader of stdout went away (`fer-edge listen | head -1`): point fd 1 at /dev/null so that neither
    later prints nor the interpreter's final flush raise BrokenPipeError again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def subscribe(mcfg, topics: list[str], on_message: Callable[[str, bytes], None], client_id: str,
              timeout: float = 5.0, on_stdout_closed: Callable[[], None] | None = None):
    """Connect, subscribe to ``topics`` and wait for the SUBACK; UserError(code 1) if the broker is unreachable.

    ``on_message`` runs in paho's network thread, where a BrokenPipeError would only kill that thread (with a
    traceback) and leave the command waiting forever: it calls ``on_stdout_closed`` instead.
    """
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
    closed = threading.Event()

    def on_paho_message(_c, _u, msg):
        if closed.is_set():
            return
        try:
            on_message(msg.topic, msg.payload)
        except BrokenPipeError:
            closed.set()
            stdout_closed()
            if on_stdout_closed is not None:
                on_stdout_closed()

    client.on_message = on_paho_message
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
