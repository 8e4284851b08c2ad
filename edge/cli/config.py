"""``fer-edge config [--check]``: the effective configuration as TOML, or only its validation."""

from __future__ import annotations

import argparse

from edge.cli.common import EXIT_OK, add_config_args, collect_overrides, load_for_command


def register(sub) -> None:
    p = sub.add_parser("config", help="print the effective configuration as TOML",
                       description="Shows the configuration after defaults, file, environment and --set.")
    add_config_args(p)
    p.add_argument("--check", action="store_true", help="only validate; print OK or the error")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective configuration (TOML) or just check it."""
    from edge.config import to_toml

    cfg, path, _ = load_for_command(args, collect_overrides(args))
    if args.check:
        print(f"{path or 'built-in defaults'}: OK")
        return EXIT_OK
    if cfg.mqtt.password:
        cfg.mqtt.password = "***"
    print(f"# effective configuration ({path or 'built-in defaults'} + environment + command line)")
    print(to_toml(cfg))
    return EXIT_OK
