"""``fer-edge homeassistant show|remove``: print this device's Home Assistant discovery configs, or clear them
from the broker (see edge/discovery.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from edge.cli.common import add_config_args, collect_overrides, command_logging


def register(sub) -> None:
    """Add the homeassistant sub-command."""
    p = sub.add_parser(
        "homeassistant", help="Home Assistant MQTT discovery: show the configs, or remove the device",
        description="show: print the retained discovery configs the daemon announces with "
                    "[homeassistant] enabled = true (no broker needed). remove: clear this device's discovery "
                    "configs and state from the broker with empty retained messages, so Home Assistant drops "
                    "the device. Uses the daemon's config (default /etc/fer-edge/config.toml).")
    p.add_argument("action", choices=["show", "remove"])
    add_config_args(p)
    p.add_argument("--device-id", metavar="ID", help="device.id (default: the config's, else the hostname)")
    p.add_argument("--host", help="broker host (mqtt.host)")
    p.add_argument("--port", help="broker port (mqtt.port)")
    p.add_argument("--prefix", help="topic prefix (mqtt.prefix)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="broker timeout (remove)")
    p.set_defaults(func=cmd_homeassistant)


FLAGS = {"device_id": "device.id", "host": "mqtt.host", "port": "mqtt.port", "prefix": "mqtt.prefix"}


def cmd_homeassistant(args: argparse.Namespace) -> int:
    from edge.config import ConfigError, find_config_path, load_config
    from edge.mqtt import MqttError

    command_logging(args.verbose, logging.WARNING)
    try:
        overrides = collect_overrides(args, FLAGS)
        cfg = load_config(find_config_path(args.config), overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        return _show(cfg) if args.action == "show" else _remove(cfg, args.timeout)
    except MqttError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _show(cfg) -> int:
    from pathlib import Path

    from edge.classify import DEFAULT_MODEL, ModelError, read_manifest
    from edge.discovery import discovery_configs, dumps

    try:
        man = read_manifest(Path(cfg.model.path) if cfg.model.path else DEFAULT_MODEL)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.homeassistant.enabled:
        print("# homeassistant.enabled = false: the daemon does not announce these (set it to true)", flush=True)
    print(dumps(discovery_configs(cfg.homeassistant, cfg.mqtt, cfg.device.id, labels=list(man["labels"]),
                                  model_version=str(man["version"]))), flush=True)
    return 0


def _remove(cfg, timeout: float) -> int:
    from edge.discovery import node_id, remove_device

    if timeout <= 0:
        print("error: --timeout must be > 0", file=sys.stderr)
        return 2
    res = remove_device(cfg.homeassistant, cfg.mqtt, cfg.device.id, timeout=timeout)
    where = f"{cfg.mqtt.host}:{cfg.mqtt.port}"
    node = node_id(cfg.homeassistant, cfg.device.id)
    if res.cleared:
        print(f"removed {len(res.cleared)} Home Assistant discovery configs of node {node} from {where}:", flush=True)
        for topic in res.cleared:
            print(f"  {topic}", flush=True)
    else:
        print(f"no Home Assistant discovery configs of node {node} on {where} (nothing to remove)", flush=True)
    if res.daemon_status == "online" and cfg.homeassistant.enabled:
        print(f"warning: device {cfg.device.id} is online with homeassistant.enabled = true: it announces itself "
              "again on its next connection; set [homeassistant] enabled = false and restart it "
              "(systemctl restart fer-edge)", file=sys.stderr, flush=True)
    return 0
