"""``fer-edge snapshot``: one annotated frame from the configured source, to check a camera's aim without a screen.

The frame goes through the daemon's own stages (source with rotate/flip, detector, classifier), so what the
picture shows is what the daemon sees: face boxes with emotion and confidence, a header with the source and
orientation, a centre cross and a square of ``detect.min_face`` pixels (faces smaller than it are ignored).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from edge.fsutil import atomic_write

WRITABLE_EXTS = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png"}
GREEN, WHITE, BLACK, YELLOW = (0, 220, 0), (255, 255, 255), (0, 0, 0), (0, 220, 255)


class SnapshotError(Exception):
    """No snapshot could be taken or written; the message says what to do."""


def grab_frame(source_cfg, warmup_s: float = 2.0, timeout_s: float = 10.0):
    """Newest frame after ``warmup_s`` seconds of capture (cameras settle exposure); (image, source name).

    Raises SnapshotError if no frame arrives within ``timeout_s``; ValueError/SourceError for a bad source.
    """
    from edge.sources import open_source

    _check_video_file(source_cfg)
    src = open_source(source_cfg)
    frame = None
    try:
        src.start()
        deadline = time.monotonic() + timeout_s
        while frame is None and time.monotonic() < deadline and not src.finished:
            frame = src.read(timeout=0.2)
        if frame is not None:
            settle_until = time.monotonic() + warmup_s
            while time.monotonic() < settle_until and not src.finished:
                newer = src.read(timeout=min(0.2, max(0.01, settle_until - time.monotonic())))
                if newer is not None:
                    frame = newer
    finally:
        src.stop()
    if frame is None:
        raise SnapshotError(f"{src.name}: no frame within {timeout_s:g} s")
    return frame.image, src.name


def _check_video_file(source_cfg) -> None:
    """A video file that is missing or not a video: say so at once. The daemon keeps retrying such a source
    (the file may appear later), which for a one-shot snapshot is only a silent wait for the timeout."""
    uri = str(getattr(source_cfg, "uri", "") or "")
    if source_cfg.kind != "opencv" or not uri or uri.isdigit() or uri.startswith("/dev/") or "://" in uri:
        return
    path = Path(uri).expanduser()
    if not path.exists():
        raise SnapshotError(f"{uri}: video file not found (source.uri)")
    if not path.is_file():
        raise SnapshotError(f"{uri}: not a file (source.uri names a video file, a camera index or a URL)")
    from edge.native_stderr import filtered_stderr

    with filtered_stderr(lambda line: True) as ffmpeg_said:  # FFmpeg's own "[mov @ 0x…] moov atom not found"
        cap = cv2.VideoCapture(str(path))
        try:
            ok = cap.isOpened() and cap.read()[0]
        finally:
            cap.release()
    if not ok:
        why = f" ({ffmpeg_said[-1].split('] ', 1)[-1].strip()})" if ffmpeg_said else ""
        raise SnapshotError(f"{uri}: not a readable video file{why}")


def draw_label(img: np.ndarray, text: str, org: tuple[int, int], scale: float, color, thick: int) -> None:
    """Text on a filled dark box, readable on any background."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = org
    x = max(0, min(x, img.shape[1] - tw - 4))
    y = max(th + 4, y)
    cv2.rectangle(img, (x, y - th - 4), (x + tw + 4, y + base), BLACK, -1)
    cv2.putText(img, text, (x + 2, y - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def annotate(image: np.ndarray, faces: list[dict], header: list[str], min_face: int) -> np.ndarray:
    """A copy of ``image`` with face boxes + "emotion NN%" labels, header lines, centre cross, min_face square."""
    img = image.copy()
    h, w = img.shape[:2]
    thick = max(1, round(max(h, w) / 480))
    scale = 0.45 * thick
    cx, cy, arm = w // 2, h // 2, max(6, min(h, w) // 40)
    cv2.line(img, (cx - arm, cy), (cx + arm, cy), YELLOW, thick)
    cv2.line(img, (cx, cy - arm), (cx, cy + arm), YELLOW, thick)
    if 0 < min_face < min(h, w) // 2:
        m = 6 * thick
        cv2.rectangle(img, (m, h - m - min_face), (m + min_face, h - m), YELLOW, thick)
        draw_label(img, "min face", (m, h - m - min_face - 2), scale * 0.8, YELLOW, max(1, thick - 1))
    for i, f in enumerate(faces, 1):
        b = f["bbox"]
        cv2.rectangle(img, (b["x"], b["y"]), (b["x"] + b["w"] - 1, b["y"] + b["h"] - 1), GREEN, 2 * thick)
        text = f.get("label") or f"#{i} {f['emotion']} {f['confidence']:.0%}"  # the web preview labels by face id
        draw_label(img, text, (b["x"], b["y"] - 2 * thick), scale, GREEN, thick)
    y = 0
    for text in header:
        (_, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        y += th + base + 4
        draw_label(img, text, (0, y - base), scale, WHITE, thick)
    return img


def write_image(path: Path, img: np.ndarray, quality: int = 90) -> None:
    """Encode by extension and write atomically (no half-written file if interrupted)."""
    ext = WRITABLE_EXTS.get(path.suffix.lower())
    if ext is None:
        raise SnapshotError(f"{path}: unsupported extension; use .jpg or .png")
    if not path.parent.is_dir():
        raise SnapshotError(f"{path.parent}: no such directory")
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise SnapshotError(f"{path}: could not encode the image")
    try:
        atomic_write(path, buf.tobytes(), 0o644, tmp_prefix=f".{path.name}.")
    except OSError as e:
        raise SnapshotError(f"{path}: cannot write: {e.strerror or e}") from None


def take_snapshot(cfg, out: str, warmup_s: float = 2.0, timeout_s: float = 10.0,
                  image: Optional[np.ndarray] = None) -> dict:
    """Capture (or use ``image``), detect, classify, annotate and write ``out``; returns the JSON summary.

    Raises SnapshotError (no frame, cannot write), ModelError, DetectorError, SourceError or ValueError.
    """
    from edge.classify import load_classifier
    from edge.detect import make_detector

    out_path = Path(out).expanduser()
    if out_path.suffix.lower() not in WRITABLE_EXTS:
        raise SnapshotError(f"{out}: unsupported extension; use .jpg or .png")
    from edge.model_store import current_model_path

    clf = load_classifier(current_model_path(cfg.device.state_dir, cfg.model.path, cfg.update),
                          threads=cfg.model.threads)
    detector = make_detector(cfg.detect)
    source_name = "image"
    if image is None:
        image, source_name = grab_frame(cfg.source, warmup_s, timeout_s)
    ts = time.time()
    boxes = detector.detect(image)
    faces = []
    if boxes:
        probs = clf.classify_faces(image, boxes, flip_average=cfg.model.flip_average)
        for b, p in zip(boxes, probs):
            k = int(np.argmax(p))
            faces.append({"bbox": {"x": int(b.x), "y": int(b.y), "w": int(b.w), "h": int(b.h)},
                          "emotion": clf.labels[k], "confidence": round(float(p[k]), 4),
                          "scores": {lab: round(float(v), 4) for lab, v in zip(clf.labels, p)}})
    h, w = image.shape[:2]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    header = [f"{cfg.device.id}  {source_name}  {w}x{h}  rotate {cfg.source.rotate}  flip {cfg.source.flip}",
              f"{stamp}  {len(faces)} face{'s' if len(faces) != 1 else ''}"]
    write_image(out_path, annotate(image, faces, header, cfg.detect.min_face))
    return {"output": str(out_path), "device_id": cfg.device.id, "source": source_name, "width": w, "height": h,
            "rotate": cfg.source.rotate, "flip": cfg.source.flip,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)), "detector": detector.name,
            "model": {"version": clf.version, "sha256": clf.sha256}, "faces": faces}
