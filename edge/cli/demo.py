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
    "detect.backend": "yunet",
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
    sub = service = None
    try:
        if cfg.mqtt.enabled:
            topic = f"{cfg.mqtt.prefix}/{cfg.device.id}/faces"
            sub = subscribe(cfg.mqtt, [topic], lambda _t, payload: print_payload(printer, payload),
                            client_id=f"fer-edge-demo-listener-{os.getpid()}",
                            on_stdout_closed=lambda: service is not None and service.stop("stdout closed"))
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
        if cfg.source.kind == "demo":
            played = service.source.frames if service.source is not None else service.frames
            manifest = getattr(service.classifier, "manifest", None)
            for line in demo_truth(printer, played, manifest):
                print(line, flush=True)
        return rc
    finally:
        if sub is not None:
            sub.loop_stop()
            sub.disconnect()
        if broker is not None:
            broker.stop()


def demo_truth(printer: EventPrinter, frames_played: int, manifest: dict | None = None) -> list[str]:
    """Lines that set the clip's FER-2013 labels beside what the model said about each face that appeared.

    A face's events are matched to the clip's track whose box holds the centre of the face's first box; a label
    counts as found when the model reported that emotion for the face at some point.
    """
    try:
        from edge.sources import DEMO_CLIP

        meta = json.loads(DEMO_CLIP.with_suffix(".json").read_text())
        labels: dict[int, list[str]] = {}
        for f in meta["faces"]:
            if f["frames"][0] < frames_played:
                labels.setdefault(int(f["track"]), []).append(str(f["class"]))
        boxes = {int(t["track"]): [tuple(b) for b in t["boxes"]] for t in meta["tracks"]}
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return []
    if not labels:
        return []

    def track_of(bbox: dict) -> int | None:
        cx, cy = bbox.get("x", 0) + bbox.get("w", 0) / 2, bbox.get("y", 0) + bbox.get("h", 0) / 2
        for track, track_boxes in boxes.items():
            if any(x <= cx <= x + w and y <= cy <= y + h for x, y, w, h in track_boxes):
                return track
        return None

    said: dict[int, tuple[str, list[str]]] = {}  # track -> (face ids, emotions); a lost and found face has two ids
    for fid, bbox in printer.first_bbox.items():
        track = track_of(bbox)
        if track is not None:
            ids, emotions = said.get(track, ("", []))
            for e in printer.emotions.get(fid, []):
                if not emotions or emotions[-1] != e:
                    emotions.append(e)
            said[track] = (f"{ids}+{fid}" if ids else fid, emotions)
    lines = ["clip ground truth: the FER-2013 label of each face shown, beside what the model said"]
    right = total = 0
    missed: list[str] = []
    for track, truth in sorted(labels.items()):
        fid, emotions = said.get(track, ("(not reported)", []))
        found = [lab for lab in truth if lab in emotions]
        right, total = right + len(found), total + len(truth)
        missed += [lab for lab in truth if lab not in emotions]
        verdict = "right" if len(found) == len(truth) else ("partly right" if found else "wrong")
        shown = list(dict.fromkeys(emotions))  # in the order first said; a face that wavers lists each once
        lines.append(f"  face {fid:<8} label {' -> '.join(truth):<18} model {' -> '.join(shown) or '-':<26}"
                     f" {verdict}")
    metrics = (manifest or {}).get("metrics") or {}
    acc, recall, n = metrics.get("int8_accuracy"), metrics.get("per_class_recall") or {}, metrics.get("val_n")
    summary = f"{right} of {total} labels found."
    if isinstance(acc, (int, float)):
        faces = f"{n:,} " if isinstance(n, int) else ""
        summary += f" The model is right on {acc:.0%} of FER-2013's {faces}{metrics.get('val_split', 'test')} faces"
        rates = [f"{recall[lab]:.0%} of {lab}" for lab in dict.fromkeys(missed)
                 if isinstance(recall.get(lab), (int, float))]
        if rates:
            listed = rates[0] if len(rates) == 1 else ", ".join(rates[:-1]) + " and " + rates[-1]
            summary += f" and recognises {listed} faces"
        summary += " (its manifest), so some misses are expected: they are the model's accuracy, not a demo fault."
    lines.append(summary)
    return lines
