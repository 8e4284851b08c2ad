"""``fer-edge snapshot -o FILE.jpg``: one annotated frame to check the camera's aim (see edge/snapshot.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def register(sub) -> None:
    """Add the snapshot sub-command."""
    from edge.cli.common import add_config_args

    p = sub.add_parser(
        "snapshot", help="write one annotated frame (face boxes, emotions) to check the camera's aim",
        description="Captures one frame from the configured source (after a short warm-up so the camera "
                    "settles its exposure), runs detection and classification, writes an annotated JPEG/PNG "
                    "and prints a JSON summary (faces, boxes, emotions) on stdout. Copy the file off the Pi "
                    "(scp) to look at it. Stop the service first if it holds the camera.")
    add_config_args(p, verbose_help="also show the modules' log messages")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="output image (.jpg or .png)")
    p.add_argument("--warmup", type=float, default=2.0, metavar="SECONDS",
                   help="capture this long before taking the frame, for exposure to settle (default 2)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="longest wait for the first frame (default 10)")
    p.set_defaults(func=cmd_snapshot)


def cmd_snapshot(args: argparse.Namespace) -> int:
    from edge.cli.common import command_logging
    from edge.config import find_config_path, load_config, parse_set_option
    from edge.doctor import is_camera, service_state
    from edge.snapshot import SnapshotError, take_snapshot

    command_logging(args.verbose, logging.ERROR)
    if args.warmup < 0 or args.timeout <= 0:
        print("error: --warmup must be >= 0 and --timeout > 0", file=sys.stderr)
        return 2
    overrides = dict(parse_set_option(item) for item in args.sets)
    cfg = load_config(find_config_path(args.config), overrides)  # ConfigError: reported by the CLI (exit 2)
    try:
        summary = take_snapshot(cfg, args.output, warmup_s=args.warmup, timeout_s=args.timeout)
    except SnapshotError as e:
        hint = ""
        props = service_state()
        if is_camera(cfg.source) and props and props.get("ActiveState") == "active":
            hint = " (the running fer-edge service holds the camera: sudo systemctl stop fer-edge first)"
        elif "no frame" in str(e):
            hint = " (fer-edge doctor checks the camera and says what to fix)"
        print(f"error: {e}{hint}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary), flush=True)
    n = len(summary["faces"])
    print(f"wrote {summary['output']}: {summary['width']}x{summary['height']}, {n} face{'s' if n != 1 else ''}",
          file=sys.stderr, flush=True)
    return 0
