"""``fer-edge doctor``: check camera, model, speed, broker, clock, disk and CPU; print what to fix (see edge/doctor.py)."""

from __future__ import annotations

import argparse
import logging
import sys


def register(sub) -> None:
    """Add the doctor sub-command."""
    from edge.cli import add_config_args

    p = sub.add_parser(
        "doctor", help="check camera, model, speed, broker, clock, disk and CPU; print what to fix",
        description="One line per check: OK, WARN, FAIL or SKIP, with the fix. Exit status 1 if any check "
                    "failed. Uses the same config as the daemon (default /etc/fer-edge/config.toml).")
    add_config_args(p, verbose_help="also show the modules' log messages")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="longest wait for the first camera frame (default 10)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from edge.cli.common import command_logging
    from edge.config import ConfigError, find_config_path, load_config, parse_set_option
    from edge.doctor import FAIL, Check, DoctorOptions, run_doctor

    command_logging(args.verbose, logging.ERROR)
    path = find_config_path(args.config)
    try:
        overrides = dict(parse_set_option(item) for item in args.sets)
        cfg = load_config(path, overrides)
    except ConfigError as e:
        if "Permission denied" in str(e):
            fix = "run it as root (sudo fer-edge doctor): the config is readable by root and the service's group only"
        else:
            fix = "fix the file (`fer-edge config --check -c FILE` shows the same error)"
        print(Check("config", FAIL, f"{path or 'built-in defaults'}: {e}", fix).line(), flush=True)
        return 1
    if args.timeout <= 0:
        print("error: --timeout must be > 0", file=sys.stderr)
        return 2
    return run_doctor(cfg, DoctorOptions(camera_timeout_s=args.timeout))
