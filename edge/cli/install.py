"""``fer-edge install-service`` and ``fer-edge uninstall-service`` (see edge/install.py)."""

from __future__ import annotations

import argparse
import sys

from edge.install import DEFAULT_PREFIX, DEFAULT_USER, InstallError, Installer, InstallOptions


def register(sub) -> None:
    """Add the install-service and uninstall-service sub-commands."""
    p = sub.add_parser(
        "install-service", help="install the systemd service: config, unit, user; enable and start it",
        description="Writes /etc/fer-edge/config.toml (only if absent: never overwrites yours), installs "
                    "fer-edge.service, creates the system user and enables the service. Idempotent: a second "
                    "run changes nothing. Expects the venv at PREFIX/venv (scripts/install.sh makes it).")
    _common(p)
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"install prefix holding venv/ (default {DEFAULT_PREFIX})")
    p.add_argument("--user", default=DEFAULT_USER, help=f"system user to run as (default {DEFAULT_USER})")
    p.add_argument("--source", metavar="DIR", help="fer-edge source checkout with systemd/ and config/ (default: auto)")
    p.add_argument("--source-kind", default="auto", choices=["auto", "picamera2", "opencv", "demo"],
                   help="source.kind for a newly written config (auto: picamera2 if installed, else a V4L2 "
                        "camera if /dev/video0 exists, else the demo clip)")
    p.add_argument("--no-enable", dest="enable", action="store_false",
                   help="install but do not enable/start the service")
    p.set_defaults(func=_install)

    p = sub.add_parser(
        "uninstall-service", help="stop and remove the systemd service (--purge: also config, state, user)",
        description="Stops, disables and removes fer-edge.service. The config in /etc/fer-edge and the state in "
                    "/var/lib/fer-edge are kept unless --purge is given.")
    _common(p)
    p.add_argument("--user", default=DEFAULT_USER, help=f"system user removed by --purge (default {DEFAULT_USER})")
    p.add_argument("--purge", action="store_true", help="also remove /etc/fer-edge, /var/lib/fer-edge and the user")
    p.set_defaults(func=_uninstall)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/", metavar="DIR",
                   help="install below DIR instead of the live system (no user, no systemctl)")
    p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")


def _execute(opts: InstallOptions, action: str, **kwargs) -> int:
    """Run one Installer action; on failure still show the steps already done, then one error line."""
    try:
        installer = Installer(opts)
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        getattr(installer, action)(**kwargs)
        failed = None
    except (InstallError, OSError) as e:
        failed = e
    for line in installer.report.lines:
        print(line, flush=True)
    if failed is not None:
        print(f"error: {failed}", file=sys.stderr, flush=True)
        return 1
    return 0


def _install(args: argparse.Namespace) -> int:
    return _execute(InstallOptions(root=args.root, prefix=args.prefix, user=args.user, dry_run=args.dry_run,
                                   source=args.source, source_kind=args.source_kind, enable=args.enable),
                    "install")


def _uninstall(args: argparse.Namespace) -> int:
    return _execute(InstallOptions(root=args.root, user=args.user, dry_run=args.dry_run), "uninstall",
                    purge=args.purge)
