#!/usr/bin/env python3
"""Print fer-edge face events from an MQTT broker (needs only paho-mqtt 2.x: pip install paho-mqtt).

    python3 subscribe.py --host raspberrypi.local                    # every device
    python3 subscribe.py --host raspberrypi.local --device kitchen   # one device
"""

import argparse
import json
import sys

import paho.mqtt.client as mqtt


def describe(ev: dict) -> str:
    """One line per event, e.g. "kitchen 1-3f98 new happy 0.87"."""
    if ev["type"] == "end":
        dominant = (ev.get("summary") or {}).get("dominant", ev["emotion"])
        return f"{ev['device_id']} {ev['face_id']} end after {ev['duration_s']:.1f}s, mostly {dominant}"
    return f"{ev['device_id']} {ev['face_id']} {ev['type']} {ev['emotion']} {ev['confidence']:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description="Print fer-edge face events.")
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--prefix", default="fer-edge", help="the daemon's mqtt.prefix")
    ap.add_argument("--device", default="+", help="a device id, or + for all devices")
    ap.add_argument("--count", type=int, default=0, help="exit after this many events (0 = run until Ctrl-C)")
    args = ap.parse_args()
    topic = f"{args.prefix}/{args.device}/faces"
    received = 0

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(f"broker refused the connection: {reason_code}", file=sys.stderr)
            client.disconnect()
            return
        client.subscribe(topic, qos=1)  # in on_connect, so it is renewed after every reconnect
        print(f"subscribed to {topic}", file=sys.stderr, flush=True)

    def on_message(client, userdata, msg):
        nonlocal received
        try:
            ev = json.loads(msg.payload)
            line = describe(ev)
        except (ValueError, KeyError, TypeError) as e:
            print(f"skipping a malformed message on {msg.topic}: {e!r}", file=sys.stderr)
            return
        print(line, flush=True)
        received += 1
        if args.count and received >= args.count:
            client.disconnect()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(args.host, args.port)
    except OSError as e:
        print(f"cannot connect to {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    try:
        client.loop_forever()  # handles reconnects; returns after disconnect()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
