"""``fer-edge`` command line: one module per sub-command in this package.

A command module defines ``register(subparsers)``, which adds its sub-parser with
``set_defaults(func=handler)`` (``handler(args) -> int``); every module here that has one is picked up, so a
new command is a new file and nothing else. Modules without ``register`` are helpers (common, subscriber,
local_broker). A command's work that is not argument handling lives in a helper module named for it outside
this package (edge/doctor.py, edge/install.py, edge/bench.py).

Every user error ends in one clear line on stderr and exit status 2 (1 for runtime failures such as an
unreachable broker or unreadable images); never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Iterator

import edge
from edge.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, UserError, add_config_args, setup_logging
from edge.cli.demo import DEMO_SETTINGS

__all__ = ["main", "build_parser", "add_config_args", "setup_logging", "UserError", "DEMO_SETTINGS",
           "EXIT_OK", "EXIT_FAIL", "EXIT_USAGE"]

log = logging.getLogger(__name__)

# The order `fer-edge --help` lists the everyday commands in; the others follow alphabetically.
FIRST = ("run", "demo", "predict", "listen", "config", "version")


def command_modules() -> Iterator[str]:
    """Names of the modules that may hold a command: this package's, everyday commands first."""
    here = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    for name in sorted(here, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n)):
        yield f"edge.cli.{name}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer-edge", description="Facial-emotion-recognition appliance: camera -> faces -> emotions -> MQTT.")
    parser.add_argument("--version", action="version", version=f"fer-edge {edge.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in command_modules():
        try:
            module = importlib.import_module(name)
            register = getattr(module, "register", None)
            if register is not None:
                register(sub)
        except Exception as e:  # a broken command module must not take the other commands down
            print(f"warning: command module {name} not loaded: {e}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fer-edge`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage + error (status 2) or help (0)
        return int(e.code or 0)
    from edge.config import ConfigError

    user_errors: tuple[type[BaseException], ...] = (ConfigError,)
    for mod, name in (("edge.classify", "ModelError"), ("edge.detect", "DetectorError"),
                      ("edge.sources", "SourceError"), ("edge.mqtt", "MqttError")):
        try:
            user_errors += (getattr(importlib.import_module(mod), name),)
        except (ImportError, AttributeError):
            pass
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fer-edge predict *.jpg | head -1`
        from edge.cli.subscriber import stdout_closed

        stdout_closed()
        return EXIT_OK
    except Exception as e:  # a bug, not a user error: one line, details only when asked for
        if getattr(args, "verbose", False):
            log.exception("internal error")
        print(f"fer-edge: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_FAIL
