"""Measure how FER-2013 frames a face relative to a face detector's box -> the manifest's ``margin``.

    python -m training.framing --data ../shared/data/fer2013/test [--yunet ../shared/models/face_detection_yunet_2026may.onnx]

Each 48x48 face is upscaled 4x and centred on a larger canvas (edge-replicated) so the detector sees a
face in context; the detector box's size and offset relative to the 48x48 image are collected. The
margin that makes ``edge.preprocess.crop_face`` reproduce FER-2013 framing is ``image_side / box_side - 1``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np


def measure(images, detect, up=4, pad=96):
    sides, dx, dy = [], [], []
    for img in images:
        big = cv2.resize(img, None, fx=up, fy=up, interpolation=cv2.INTER_CUBIC)
        canvas = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        boxes = detect(canvas)
        if not boxes:
            continue
        x, y, w, h = max(boxes, key=lambda b: b[2] * b[3])
        side = max(w, h) / up
        cx, cy = (x + w / 2 - pad) / up, (y + h / 2 - pad) / up
        if not (0 < cx < 48 and 0 < cy < 48):
            continue
        sides.append(side)
        dx.append(cx - 24)
        dy.append(cy - 24)
    return np.array(sides), np.array(dx), np.array(dy)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder of FER-2013 faces (searched recursively)")
    p.add_argument("--yunet", default="", help="YuNet ONNX model; default: OpenCV's Haar cascade")
    p.add_argument("--limit", type=int, default=600)
    a = p.parse_args(argv)
    files = sorted(Path(a.data).rglob("*.jpg"))
    if not files:
        print(f"training.framing: no .jpg faces under {a.data} (give e.g. ../shared/data/fer2013/test)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))[: a.limit]]
    images = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]
    if a.yunet:
        det = cv2.FaceDetectorYN.create(a.yunet, "", (320, 320), 0.6, 0.3, 50)

        def detect(c):
            det.setInputSize((c.shape[1], c.shape[0]))
            _, faces = det.detect(cv2.cvtColor(c, cv2.COLOR_GRAY2BGR))
            return [] if faces is None else [tuple(f[:4]) for f in faces]
        name = "yunet"
    else:
        casc = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

        def detect(c):
            return [tuple(b) for b in casc.detectMultiScale(c, 1.1, 5, minSize=(80, 80))]
        name = "haar"
    s, dx, dy = measure(images, detect)
    if not len(s):
        print(f"training.framing: {name} found no face in {len(images)} images", file=sys.stderr)
        return 1
    print(f"{name}: detected {len(s)}/{len(images)}; box side median {np.median(s):.1f}px of 48 "
          f"(IQR {np.percentile(s, 25):.1f}-{np.percentile(s, 75):.1f}); centre offset median "
          f"({np.median(dx):+.1f}, {np.median(dy):+.1f})px; margin = 48/side - 1 = {48 / np.median(s) - 1:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
