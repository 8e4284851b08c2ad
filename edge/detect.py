"""Face detectors behind one small plug-in interface.

Two backends:

* ``haar``  - OpenCV's frontal-face Haar cascade shipped inside opencv-python(-headless); no download, fast on a Pi.
* ``yunet`` - OpenCV Zoo's YuNet ONNX model via ``cv2.FaceDetectorYN``; more robust to pose and light, needs a model file.

Both detect on a copy of the frame downscaled to ``detect_width`` (detection cost grows with pixel count, faces from a
desk camera are large) and return boxes in source-resolution pixels, clipped to the frame, largest first.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("haar", "yunet")
MODES = ("sync", "async")
ROI_FACE_PX = 64  # a known face is re-found in its region downscaled so the face is about this wide
ROI_PAD = 0.4  # region around a known face searched on the next frame, as a fraction of its side
HAAR_CASCADE = "haarcascade_frontalface_default.xml"


class DetectorError(Exception):
    """A detector cannot be built (missing/corrupt model, unknown backend); the message says what to do."""


@dataclass
class DetectConfig:
    """Face detection settings ([detect] section)."""

    backend: str = "haar"  # "haar" | "yunet"
    model_path: str = ""  # YuNet .onnx file; required for backend "yunet"
    detect_width: int = 320  # detect on a copy downscaled to this width (keeps aspect); 0 = full resolution
    min_face: int = 48  # smallest face kept, in source pixels (smaller crops classify poorly)
    max_faces: int = 5  # keep at most this many faces per frame (largest first)
    score_threshold: float = 0.6  # YuNet confidence threshold
    every_n: int = 1  # run the detector every N frames; the service tracks boxes in between
    # "sync": full-frame detection on every (Nth) frame, in the frame loop. "async": full-frame detection runs in a
    # worker thread on the newest frame while each frame only re-finds the known faces in small regions around
    # them: per-frame latency stays bounded whatever the full detection costs (Haar on a Pi).
    mode: str = "sync"

    def validate(self) -> None:
        """Raise ValueError("<field>: ...") for out-of-range values."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.backend == "yunet" and not self.model_path:
            raise ValueError("model_path: required for backend 'yunet'; download face_detection_yunet_2023mar.onnx "
                             "from the OpenCV Zoo and set its path")
        if self.detect_width != 0 and self.detect_width < 64:
            raise ValueError(f"detect_width: {self.detect_width} is too small; use 0 (full resolution) or >= 64")
        if self.min_face < 1:
            raise ValueError(f"min_face: {self.min_face} must be >= 1 pixel")
        if self.max_faces < 1:
            raise ValueError(f"max_faces: {self.max_faces} must be >= 1")
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"score_threshold: {self.score_threshold} must be between 0 and 1 (exclusive)")
        if self.every_n < 1:
            raise ValueError(f"every_n: {self.every_n} must be >= 1 (1 = detect on every frame)")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")


@dataclass
class Box:
    """A face box in source-resolution pixels."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def area(self) -> int:
        return self.w * self.h


class Detector:
    """Base class: downscale, run the backend, map boxes back, clip, filter, sort, cap.

    Subclasses implement ``_detect_small(small_bgr, scale) -> iterable of (x, y, w, h, score)`` in the downscaled
    image's pixels; ``scale`` is small/source and lets a backend convert source-pixel limits.
    """

    name = "detector"

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg
        self._small: np.ndarray | None = None  # reused resize buffer

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        """Return faces in ``image_bgr`` (BGR or gray uint8) as source-pixel boxes, largest first, <= max_faces."""
        if image_bgr is None or image_bgr.size == 0:
            return []
        if image_bgr.ndim == 2:
            image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
        elif image_bgr.shape[2] == 4:
            image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_BGRA2BGR)
        h, w = image_bgr.shape[:2]
        small, scale = self._downscale(image_bgr)
        boxes = []
        for x, y, bw, bh, score in self._detect_small(small, scale):
            # Map back with floor/ceil so the box never shrinks below what was detected.
            x0 = max(0, int(np.floor(x / scale)))
            y0 = max(0, int(np.floor(y / scale)))
            x1 = min(w, int(np.ceil((x + bw) / scale)))
            y1 = min(h, int(np.ceil((y + bh) / scale)))
            bw_src, bh_src = x1 - x0, y1 - y0
            if bw_src < self.cfg.min_face or bh_src < self.cfg.min_face:
                continue
            boxes.append(Box(x0, y0, bw_src, bh_src, float(score)))
        boxes.sort(key=lambda b: b.area, reverse=True)
        return boxes[: self.cfg.max_faces]

    def _downscale(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = image.shape[:2]
        dw = self.cfg.detect_width
        if dw <= 0 or w <= dw:
            return image, 1.0
        dh = max(1, round(h * dw / w))
        if self._small is None or self._small.shape[:2] != (dh, dw):
            self._small = np.empty((dh, dw, 3), np.uint8)
        cv2.resize(image, (dw, dh), dst=self._small, interpolation=cv2.INTER_AREA)
        return self._small, dw / w

    def _detect_small(self, small: np.ndarray, scale: float):  # pragma: no cover - abstract
        raise NotImplementedError

    def refine(self, image_bgr: np.ndarray, box: Box) -> Box | None:
        """Re-find a known face near ``box`` in a new frame; None if it is not there any more.

        Searches a region ROI_PAD larger than the box, downscaled so the face is about ROI_FACE_PX wide, for faces
        of 0.6-1.6x the known size: a small fraction of a full-frame detection's cost.
        """
        h, w = image_bgr.shape[:2]
        side = max(box.w, box.h)
        pad = int(side * ROI_PAD)
        x0, y0 = max(0, box.x - pad), max(0, box.y - pad)
        x1, y1 = min(w, box.x + box.w + pad), min(h, box.y + box.h + pad)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        roi = image_bgr[y0:y1, x0:x1]
        if roi.ndim == 2:
            roi = cv2.cvtColor(roi, cv2.COLOR_GRAY2BGR)
        s = min(1.0, ROI_FACE_PX / side)
        small = cv2.resize(roi, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1.0 else roi
        expected = Box(int((box.x - x0) * s), int((box.y - y0) * s), max(1, int(box.w * s)), max(1, int(box.h * s)))
        best, best_iou = None, 0.2
        for x, y, bw, bh, score in self._detect_roi(small, side * s):
            o = _iou(expected, Box(int(x), int(y), int(bw), int(bh)))
            if o > best_iou:
                best, best_iou = (x, y, bw, bh, score), o
        if best is None:
            return None
        x, y, bw, bh, score = best
        bx0, by0 = max(0, int(np.floor(x0 + x / s))), max(0, int(np.floor(y0 + y / s)))
        bx1, by1 = min(w, int(np.ceil(x0 + (x + bw) / s))), min(h, int(np.ceil(y0 + (y + bh) / s)))
        if min(bx1 - bx0, by1 - by0) < self.cfg.min_face:
            return None
        return Box(bx0, by0, bx1 - bx0, by1 - by0, float(score))

    def _detect_roi(self, small: np.ndarray, face_px: float):
        """Faces in a small region image, about ``face_px`` wide: (x, y, w, h, score) in its pixels."""
        return self._detect_small(small, 1.0)

    def close(self) -> None:
        """Release background resources (none for a plain detector)."""


class HaarDetector(Detector):
    """OpenCV's bundled frontal-face Haar cascade (score is always 1.0)."""

    name = "haar"

    def __init__(self, cfg: DetectConfig, cascade_path: str | None = None):
        super().__init__(cfg)
        path = cascade_path or os.path.join(cv2.data.haarcascades, HAAR_CASCADE)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise DetectorError(f"cannot load Haar cascade {path}: reinstall opencv-python-headless")
        self._gray: np.ndarray | None = None

    def _detect_small(self, small: np.ndarray, scale: float):
        if self._gray is None or self._gray.shape != small.shape[:2]:
            self._gray = np.empty(small.shape[:2], np.uint8)
        cv2.cvtColor(small, cv2.COLOR_BGR2GRAY, dst=self._gray)
        cv2.equalizeHist(self._gray, dst=self._gray)  # evens out exposure; the cascade is trained on equalized faces
        side = max(1, int(self.cfg.min_face * scale))
        found = self._cascade.detectMultiScale(self._gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return [(x, y, w, h, 1.0) for (x, y, w, h) in found]

    def _detect_roi(self, small: np.ndarray, face_px: float):
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
        lo, hi = max(24, int(face_px * 0.6)), int(face_px * 1.6) + 1
        if lo >= min(gray.shape):
            return []
        found = self._cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3, minSize=(lo, lo),
                                               maxSize=(hi, hi))
        return [(x, y, w, h, 1.0) for (x, y, w, h) in found]


class YuNetDetector(Detector):
    """OpenCV Zoo's YuNet CNN via cv2.FaceDetectorYN; score is the model's face confidence."""

    name = "yunet"

    def __init__(self, cfg: DetectConfig, top_k: int = 50):
        super().__init__(cfg)
        path = Path(cfg.model_path).expanduser() if cfg.model_path else None
        hint = "download face_detection_yunet_2023mar.onnx from the OpenCV Zoo and set [detect] model_path"
        if path is None:
            raise DetectorError(f"YuNet needs a model file: {hint}")
        if not path.is_file():
            raise DetectorError(f"YuNet model not found: {path}: {hint}")
        if path.suffix.lower() != ".onnx":
            raise DetectorError(f"YuNet model must be an .onnx file, got {path.name}: {hint}")
        self._size = (320, 320)
        try:
            self._net = cv2.FaceDetectorYN.create(str(path), "", self._size, cfg.score_threshold, 0.3, top_k)
            # A valid ONNX file that is not YuNet only fails at inference: run one blank frame now.
            self._net.detect(np.zeros((self._size[1], self._size[0], 3), np.uint8))
        except cv2.error as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DetectorError(f"YuNet model {path} is corrupt or not a YuNet ONNX model ({msg}): {hint}") from None

    def _detect_small(self, small: np.ndarray, scale: float):
        size = (small.shape[1], small.shape[0])
        if size != self._size:
            self._net.setInputSize(size)
            self._size = size
        _, faces = self._net.detect(small)
        if faces is None:
            return []
        return [(float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[14])) for f in faces]


def _iou(a: Box, b: Box) -> float:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


class AsyncDetector:
    """Full-frame detection in a worker thread; each frame re-finds the known faces in small regions.

    ``detect`` never waits for a full-frame detection: it hands the newest frame to the worker when the worker is
    free, refines the previous boxes with ``Detector.refine`` (about 1 ms a face), and adds the faces of the
    worker's latest result that no refined box covers (new faces, found on a frame a little older). On a multi-core
    Pi the full detection runs in parallel with the frame loop; the per-frame latency is bounded by the refine step.
    """

    def __init__(self, full: Detector, local: Detector):
        self.cfg = local.cfg
        self.name = f"{local.name}+async"
        self._full, self._local = full, local  # two instances: backends are not thread-safe
        self._boxes: list[Box] = []
        self._cond = threading.Condition()
        self._pending: np.ndarray | None = None
        self._result: list[Box] | None = None
        self._stop = False
        self.full_detections = 0
        self._thread = threading.Thread(target=self._work, name="detect-full", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                image = self._pending
            try:
                boxes = self._full.detect(image)
            except Exception as e:  # reported like a frame-loop failure would be, then carry on
                log.warning("background face detection failed: %s: %s", type(e).__name__, e)
                boxes = []
            with self._cond:
                self._result, self._pending = boxes, None
                self.full_detections += 1

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        """Boxes for this frame, in source pixels, largest first (see the class docstring)."""
        with self._cond:
            fresh, self._result = self._result, None
            if self._pending is None:
                self._pending = image_bgr.copy()  # the caller may reuse its buffer
                self._cond.notify()
        boxes = [b for b in (self._local.refine(image_bgr, box) for box in self._boxes) if b is not None]
        for cand in fresh or ():
            if all(_iou(cand, b) < 0.3 for b in boxes):
                boxes.append(cand)
        boxes.sort(key=lambda b: b.area, reverse=True)
        self._boxes = boxes[: self.cfg.max_faces]
        return list(self._boxes)

    def close(self) -> None:
        """Stop the worker thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)


def _build(cfg: DetectConfig) -> Detector:
    return YuNetDetector(cfg) if cfg.backend == "yunet" else HaarDetector(cfg)


def make_detector(cfg: DetectConfig) -> Detector | AsyncDetector:
    """Build the detector named by ``cfg.backend`` (wrapped for ``mode = "async"``); raises DetectorError."""
    try:
        cfg.validate()
    except ValueError as e:
        raise DetectorError(str(e)) from None
    if cfg.mode == "async":
        return AsyncDetector(_build(cfg), _build(cfg))
    return _build(cfg)
