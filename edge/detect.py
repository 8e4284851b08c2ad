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
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("haar", "yunet")
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

    def validate(self) -> None:
        """Raise ValueError("<field>: ...") for out-of-range values."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.backend == "yunet" and not self.model_path:
            raise ValueError("model_path: required for backend 'yunet'; download face_detection_yunet_2023mar.onnx "
                             "from the OpenCV Zoo and set its path")
        if self.detect_width != 0 and not 64 <= self.detect_width <= 8192:
            raise ValueError(f"detect_width: {self.detect_width} out of range; use 0 (full resolution) or 64..8192")
        if not 1 <= self.min_face <= 8192:
            raise ValueError(f"min_face: {self.min_face} must be 1..8192 pixels")
        if not 1 <= self.max_faces <= 1000:
            raise ValueError(f"max_faces: {self.max_faces} must be 1..1000")
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"score_threshold: {self.score_threshold} must be between 0 and 1 (exclusive)")
        if not 1 <= self.every_n <= 1000:
            raise ValueError(f"every_n: {self.every_n} must be 1..1000 (1 = detect on every frame)")


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


def make_detector(cfg: DetectConfig) -> Detector:
    """Build the detector named by ``cfg.backend``; raises DetectorError with an actionable message."""
    try:
        cfg.validate()
    except ValueError as e:
        raise DetectorError(str(e)) from None
    if cfg.backend == "yunet":
        return YuNetDetector(cfg)
    return HaarDetector(cfg)
