"""``fer-edge predict IMAGE...``: faces and emotions in image files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.cli.common import (EXIT_FAIL, EXIT_OK, UserError, add_config_args, collect_overrides, load_for_command,
                             plural, setup_logging)


def register(sub) -> None:
    p = sub.add_parser("predict", help="faces and emotions in image files",
                       description="Detect faces in each image and classify their emotions. Images that cannot "
                                   "be read are reported and skipped; exit status 1 if any failed.")
    add_config_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    p.add_argument("--annotate", metavar="OUT", help="write a copy with boxes and labels (.png/.jpg; with several images a directory, created "
                        "if its parent exists)")
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
    from edge.preprocess import inner_box

    overrides = collect_overrides(args)
    if args.model:
        overrides["model.path"] = args.model
    cfg, _, _ = load_for_command(args, overrides)
    setup_logging("DEBUG" if args.verbose else "WARNING")
    from edge.model_store import current_model_path

    annotate_dir = _annotate_target(args.annotate, len(args.images)) if args.annotate else None
    model = args.model or current_model_path(cfg.device.state_dir, cfg.model.path, cfg.update)
    clf = load_classifier(model, threads=cfg.model.threads)
    detector = make_detector(cfg.detect)
    if annotate_dir is not None and not annotate_dir.is_dir():
        annotate_dir.mkdir()
        print(f"created directory {annotate_dir}", file=sys.stderr, flush=True)

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
        probs = clf.classify_faces(image, boxes, flip_average=cfg.model.flip_average)
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
            print(f"{path}: {plural(len(faces), 'face')}"
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
            failed += not _annotate(image, faces, out)
    return EXIT_FAIL if failed else EXIT_OK


def _annotate_target(annotate: str, n_images: int) -> Path | None:
    """Check --annotate before any work: the directory for several images (None for one), or UserError."""
    from edge.snapshot import WRITABLE_EXTS

    out = Path(annotate).expanduser()
    if n_images == 1:
        if out.is_dir():
            raise UserError(f"--annotate {annotate}: is a directory; give a file name (.png or .jpg)")
        if out.suffix.lower() not in WRITABLE_EXTS:
            raise UserError(f"--annotate {annotate}: unsupported extension; use .png or .jpg")
        if not out.parent.is_dir():
            raise UserError(f"--annotate {annotate}: directory {out.parent} does not exist")
        return None
    if out.exists() and not out.is_dir():
        raise UserError(f"--annotate {annotate}: not a directory (with several images it names a directory)")
    if not out.exists() and not out.parent.is_dir():
        raise UserError(f"--annotate {annotate}: directory {out.parent} does not exist")
    return out


def _annotate(image, faces: list[dict], out: Path) -> bool:
    """Write ``image`` with a box and a filled "#N emotion NN%" label per face; say what was written."""
    import cv2

    from edge.snapshot import GREEN, SnapshotError, draw_label, write_image

    img = image.copy()
    thick = max(1, round(max(img.shape[:2]) / 480))
    for i, f in enumerate(faces, 1):
        b = f["bbox"]
        cv2.rectangle(img, (b["x"], b["y"]), (b["x"] + b["w"] - 1, b["y"] + b["h"] - 1), GREEN, 2 * thick)
        draw_label(img, f"#{i} {f['emotion']} {f['confidence']:.0%}", (b["x"], b["y"] - 2 * thick), 0.45 * thick,
                   GREEN, thick)
    try:
        write_image(out, img)
    except SnapshotError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return False
    print(f"wrote {out} ({plural(len(faces), 'face')} marked)", file=sys.stderr, flush=True)
    return True
