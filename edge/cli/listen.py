"""``fer-edge listen``: subscribe to face events and device status and print them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from edge.cli.common import (EXIT_FAIL, EXIT_OK, UserError, add_config_args, collect_overrides, load_for_command,
                             plural, setup_logging)
from edge.cli.subscriber import EventPrinter, subscribe


def register(sub) -> None:
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
                + (f" ({faces})" if faces else "") + f", {plural(d['events'], 'event')}")


LISTEN_FLAGS = {"host": "mqtt.host", "port": "mqtt.port", "prefix": "mqtt.prefix"}


def cmd_listen(args: argparse.Namespace) -> int:
    """Subscribe to face events (and device status) and print them."""
    import threading

    cfg, _, _ = load_for_command(args, collect_overrides(args, LISTEN_FLAGS))
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

    client = subscribe(mcfg, [faces_topic, status_topic], on_message, client_id=f"fer-edge-listen-{os.getpid()}",
                       on_stdout_closed=done.set)
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
