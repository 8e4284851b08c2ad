"""``fer-edge run``: the daemon (what the systemd service starts)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import edge
from edge.cli.common import add_config_args, collect_overrides, load_for_command, setup_logging

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("run", help="run the daemon (what the systemd service starts)",
                       description="Run the daemon until SIGTERM/SIGINT (or the end of a finite source). "
                                   "SIGHUP reloads the config file.")
    add_config_args(p)
    _add_run_flags(p)
    p.set_defaults(func=cmd_run)


def _source_flags(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """--source-uri without a kind: pick opencv/images from the URI so `run --source-uri 0` just works."""
    if getattr(args, "source_uri", None) and "source.kind" not in overrides:
        uri = args.source_uri
        overrides["source.kind"] = "images" if (Path(uri).is_dir() or any(c in uri for c in "*?[")) else "opencv"


RUN_FLAGS = {"source_kind": "source.kind", "source_uri": "source.uri", "mqtt_host": "mqtt.host",
             "mqtt_port": "mqtt.port", "device_id": "device.id", "max_frames": "service.max_frames",
             "duration": "service.duration_s", "print_events": "service.print_events"}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-kind", choices=["demo", "opencv", "images", "picamera2"], help="source.kind")
    p.add_argument("--source-uri", metavar="URI", help="source.uri (camera index, /dev/videoN, URL, file, folder)")
    p.add_argument("--mqtt-host", metavar="HOST", help="mqtt.host")
    p.add_argument("--mqtt-port", metavar="PORT", help="mqtt.port")
    p.add_argument("--device-id", metavar="ID", help="device.id (default: hostname)")
    p.add_argument("--max-frames", metavar="N", help="stop after N frames (service.max_frames)")
    p.add_argument("--duration", metavar="SECONDS", help="stop after this many seconds (service.duration_s)")
    p.add_argument("--print-events", action="store_const", const=True, default=None,
                   help="also print every event as a JSON line on stdout")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT, a limit, or the end of a finite source."""
    overrides = collect_overrides(args, RUN_FLAGS)
    _source_flags(args, overrides)
    if args.verbose:  # an override, so a SIGHUP reload keeps it
        overrides["service.log_level"] = "DEBUG"
    cfg, path, merged = load_for_command(args, overrides)
    setup_logging(cfg.service.log_level)
    log.info("fer-edge %s starting (config %s)", edge.__version__, path or "built-in defaults")
    from edge.service import Service

    return Service(cfg, overrides=merged).run()
