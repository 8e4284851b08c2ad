"""``fer-edge predict IMAGE...``: faces and emotions in image files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.cli.common import EXIT_FAIL, EXIT_OK, add_config_args, collect_overrides, load_for_command, setup_logging


def register(sub) -> None:
    p = sub.add_parser("predict", help="faces and emotions in image files",
                       description="Detect faces in each image and classify their emotions. Images that cannot "
                                   "be read are reported and skipped; exit status 1 if any failed.")
    add_config_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    p.add_argument("--annotate", metavar="OUT", help="write an annotated copy (a directory if several images)")
    p.add_argument("--model", metavar="PATH", help="model .tflite (default: config model.path / bundled)")
    p.add_argument("--whole", action="store_true",
                   help="skip detection: treat each image as one already-cropped face (like FER-2013 images)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """Faces and emotions in still images."""
    import cv2
    import numpy as np

    from edge.classify import load_classifier
    from edge.detect import Box, make_detector
    from edge.preprocess import crop_face, inner_box

    overrides = collect_overrides(args)
    if args.model:
        overrides["model.path"] = args.model
    cfg, _, _ = load_for_command(args, overrides)
    setup_logging("DEBUG" if args.verbose else "WARNING")
    from edge.model_store import current_model_path

    model = args.model or current_model_path(cfg.device.state_dir, cfg.model.path)
    clf = load_classifier(model, threads=cfg.model.threads)
    detector = make_detector(cfg.detect)
    annotate_dir = None
    if args.annotate and len(args.images) > 1:
        annotate_dir = Path(args.annotate)
        annotate_dir.mkdir(parents=True, exist_ok=True)

    failed = 0
    for path in args.images:
        image = cv2.imread(path, cv2.IMREAD_COLOR) if Path(path).is_file() else None
        if image is None:
            why = "file not found" if not Path(path).exists() else "not a readable image"
            print(f"error: {path}: {why}", file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps({"image": path, "error": why}), flush=True)
            failed += 1
            continue
        h, w = image.shape[:2]
        whole = args.whole
        boxes = [] if whole else detector.detect(image)
        if not boxes and (whole or max(h, w) <= 2 * cfg.detect.min_face):
            # An already-cropped face (e.g. a 48x48 FER image): classify the whole image as framed.
            ib = inner_box(min(h, w), clf.margin)
            boxes, whole = [Box(int(round(ib.x)), int(round(ib.y)), int(round(ib.w)), int(round(ib.h)))], True
        probs = clf.predict(np.stack([crop_face(image, b, clf.input_size, clf.margin) for b in boxes]),
                            flip_average=cfg.model.flip_average) if boxes else np.zeros((0, len(clf.labels)), np.float32)
        faces = []
        for b, p in zip(boxes, probs):
            k = int(np.argmax(p))
            faces.append({"bbox": {"x": b.x, "y": b.y, "w": b.w, "h": b.h}, "emotion": clf.labels[k],
                          "confidence": round(float(p[k]), 4),
                          "scores": {lab: round(float(v), 4) for lab, v in zip(clf.labels, p)}})
        result = {"image": path, "width": w, "height": h, "whole_image": whole, "faces": faces,
                  "model": {"version": clf.version, "sha256": clf.sha256}}
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{path}: {len(faces)} face{'s' if len(faces) != 1 else ''}"
                  + (" (whole image classified as one face)" if whole else ""), flush=True)
            for i, f in enumerate(faces, 1):
                b = f["bbox"]
                rest = sorted(f["scores"].items(), key=lambda kv: -kv[1])[1:3]
                print(f"  #{i} at {b['x']},{b['y']} {b['w']}x{b['h']}: {f['emotion']} {f['confidence']:.0%}"
                      f"  ({', '.join(f'{k} {v:.0%}' for k, v in rest)})", flush=True)
            if not faces:
                print("  no face found (for a pre-cropped face try --whole)", flush=True)
        if args.annotate:
            out = annotate_dir / f"{Path(path).stem}_annotated.png" if annotate_dir else Path(args.annotate)
            if not _annotate(image, faces, out):
                print(f"error: {out}: cannot write annotated image", file=sys.stderr, flush=True)
                failed += 1
    return EXIT_FAIL if failed else EXIT_OK


def _annotate(image, faces: list[dict], out: Path) -> bool:
    import cv2

    img = image.copy()
    thick = max(1, round(max(img.shape[:2]) / 320))
    for f in faces:
        b = f["bbox"]
        cv2.rectangle(img, (b["x"], b["y"]), (b["x"] + b["w"], b["y"] + b["h"]), (0, 255, 0), thick)
        label = f"{f['emotion']} {f['confidence']:.0%}"
        cv2.putText(img, label, (b["x"], max(12, b["y"] - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick,
                    (0, 255, 0), thick, cv2.LINE_AA)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return bool(cv2.imwrite(str(out), img))
    except (OSError, cv2.error):
        return False
