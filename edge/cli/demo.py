"""``fer-edge demo``: the whole pipeline on the bundled clip, printing the events it receives over MQTT."""

from __future__ import annotations

import argparse
import json
import os
import time

from edge.cli.common import add_config_args, collect_overrides, load_for_command, setup_logging
from edge.cli.local_broker import LocalBroker, port_open
from edge.cli.subscriber import EventPrinter, print_payload, subscribe

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


def register(sub) -> None:
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


DEMO_FLAGS = {"mqtt_host": "mqtt.host", "mqtt_port": "mqtt.port", "max_frames": "service.max_frames",
              "duration": "service.duration_s"}


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline on the bundled clip and print the events it receives back over MQTT."""
    overrides = collect_overrides(args, DEMO_FLAGS)
    if args.no_mqtt:
        overrides["mqtt.enabled"] = "false"
    cfg, path, merged = load_for_command(args, overrides, base=DEMO_SETTINGS)
    setup_logging("DEBUG" if args.verbose else "WARNING")
    from edge.service import Service

    broker = None
    if cfg.mqtt.enabled and not port_open(cfg.mqtt.host, cfg.mqtt.port):
        explicit = {"mqtt.host", "mqtt.port"} & set(overrides) or (path is not None)
        broker = LocalBroker()
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
            sub = subscribe(cfg.mqtt, [topic], lambda _t, payload: print_payload(printer, payload),
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
