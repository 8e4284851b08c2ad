"""``fer-edge version``: versions of fer-edge, its main dependencies and the bundled model."""

from __future__ import annotations

import argparse
import importlib

import edge
from edge.cli.common import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("version", help="versions of fer-edge, dependencies and the model")
    p.set_defaults(func=cmd_version)


def cmd_version(args: argparse.Namespace) -> int:
    """Versions of fer-edge, its main dependencies and the bundled model."""
    import platform

    print(f"fer-edge {edge.__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    for mod, name in (("numpy", "numpy"), ("cv2", "opencv"), ("paho.mqtt", "paho-mqtt"),
                      ("ai_edge_litert", "ai-edge-litert")):
        try:
            m = importlib.import_module(mod)
            print(f"{name} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{name} not installed")
    try:
        from edge.classify import DEFAULT_MODEL, read_manifest, sha256_file

        man = read_manifest(DEFAULT_MODEL)
        print(f"model {DEFAULT_MODEL.name} v{man['version']} sha256 {sha256_file(DEFAULT_MODEL)[:12]}… "
              f"labels {','.join(man['labels'])}")
    except Exception as e:
        print(f"model: unavailable ({e})")
    return EXIT_OK
