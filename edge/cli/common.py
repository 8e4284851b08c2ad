"""What the ``fer-edge`` sub-commands share: exit codes, UserError, logging setup, the config options."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Mapping

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def plural(n: int, word: str) -> str:
    """ "1 face", "2 faces" """
    return f"{n} {word}{'' if n == 1 else 's'}"


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status ``code``."""

    def __init__(self, msg: str, code: int = EXIT_USAGE):
        super().__init__(msg)
        self.code = code


# --- logging ----------------------------------------------------------------------------------------

class _JournalFormatter(logging.Formatter):
    """journald adds its own timestamps; a "<N>" prefix sets the syslog priority (SyslogLevelPrefix)."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self.PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {record.getMessage()}"


def _under_journald(env: Mapping[str, str]) -> bool:
    """True if stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode of it)."""
    stream = env.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        dev, ino = stream.split(":")
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (OSError, ValueError, AttributeError):
        return True  # cannot check: trust the variable


def setup_logging(level: str = "INFO", env: Mapping[str, str] | None = None) -> None:
    """One-line log records on stderr; without timestamps under systemd's journal."""
    env = os.environ if env is None else env
    handler = logging.StreamHandler(sys.stderr)
    if _under_journald(env):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    _replace_root_handlers(handler, level)


def command_logging(verbose: bool, quiet_level: int = logging.ERROR) -> None:
    """A one-shot command's logging: its modules' messages at ``quiet_level`` and above (DEBUG with -v) as
    "LEVEL name: message" on stderr. Unlike logging.basicConfig, which does nothing once the root logger has a
    handler, this always applies: a handler left by the embedding process (one bound to a stream since closed)
    would otherwise receive a source thread's retries at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _replace_root_handlers(handler, logging.DEBUG if verbose else quiet_level)


def _replace_root_handlers(handler: logging.Handler, level) -> None:
    # Removed, not closed: a handler's stream belongs to whoever made it (closing sys.stderr's would end output).
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


# --- config helpers -------------------------------------------------------------------------------

def add_config_args(p: argparse.ArgumentParser, verbose_help: str = "debug logging") -> None:
    """The -c/--config, --set and -v options every config-reading sub-command shares."""
    p.add_argument("-c", "--config", metavar="FILE",
                   help="TOML config file (default: $FER_EDGE_CONFIG, else /etc/fer-edge/config.toml if present)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set mqtt.host=broker.local (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


def collect_overrides(args: argparse.Namespace, flag_map: Mapping[str, str] = {}) -> dict[str, str]:
    """--set items, then dedicated flags (flag attribute -> dotted key), later ones winning."""
    from edge.config import parse_set_option

    out = {}
    for item in args.sets:
        key, value = parse_set_option(item)
        out[key] = value
    for attr, key in flag_map.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def load_for_command(args: argparse.Namespace, overrides: dict[str, str], base: Mapping[str, str] | None = None):
    """Config for a command -> (cfg, path, overrides); ``base`` are command defaults below the file (the demo's)."""
    from edge.config import find_config_path, load_config

    # The demo must not pick up the appliance's /etc config (its camera source etc.): only an explicit -c.
    path = getattr(args, "config", None) if base else find_config_path(getattr(args, "config", None))
    return load_config(path, overrides, base=base), path, overrides
