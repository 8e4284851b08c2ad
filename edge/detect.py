"""Face detectors behind one small plug-in interface.

Two backends:

* ``yunet`` (default) - OpenCV Zoo's YuNet CNN, bundled as ``edge/models/face_detection_yunet_2026may.onnx`` (MIT,
  provenance beside it) and as the same weights exported for LiteRT (``.tflite``, ``quantization.yunet``). The
  daemon runs the ``.tflite`` through LiteRT/XNNPACK (``edge.detect_litert``; half OpenCV DNN's time, and it needs
  no OpenCV >= 4.8, which 32-bit Pi OS lacks) and the ``.onnx`` through ``cv2.FaceDetectorYN`` if LiteRT cannot
  load it. Finds more faces than Haar (pose, light, small faces) at a lower cost per frame, and gives five
  landmarks per face.
* ``haar`` - OpenCV's frontal-face Haar cascade shipped inside opencv-python(-headless).

Both detect on a copy of the frame downscaled to ``detect_width`` (detection cost grows with pixel count) and return
boxes in source-resolution pixels, clipped to the frame, largest first. YuNet adds its fine search
(``edge.detect_fine``, on by default: ``fine_scale``/``fine_tile``): one full-resolution sweep tile a frame and
re-detection around known faces, for the small faces the downscaled pass misses. YuNet's boxes are the square face frame its
raw box implies (``yunet_square``), so ``crop_face`` cuts faces framed like the classifier's training faces.

Which detector runs, and why, is ``Detector.reason``: with ``model_path`` empty the bundled YuNet is used and, if it
cannot load through either runtime (a damaged package), the daemon logs one line and runs Haar instead of refusing
to start. A ``model_path`` the user set is a deliberate choice: if that file is missing or broken the
config is refused (``DetectConfig.validate``, so ``config --check`` and ``run`` agree) rather than silently
replaced by Haar.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from edge.detect_fine import PROPOSAL_SCORE, FineSearch

log = logging.getLogger(__name__)

BACKENDS = ("yunet", "haar")
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
YUNET_FILE = "face_detection_yunet_2026may.onnx"
BUNDLED_YUNET = Path(__file__).resolve().parent / "models" / YUNET_FILE
# The same weights for LiteRT (python -m quantization.yunet); tried first, the .onnx is its fallback.
YUNET_TFLITE_FILE = "face_detection_yunet_2026may.tflite"
BUNDLED_YUNET_TFLITE = BUNDLED_YUNET.with_name(YUNET_TFLITE_FILE)
YUNET_SUFFIXES = (".onnx", ".tflite")
YUNET_MAX_BYTES = 64 * 2**20  # YuNet is ~230 KB; a huge file is a wrong path, not a face detector
MAX_FINE_ANGLES = 6  # each roll adds a full sweep: more would leave a tile unvisited for seconds
YUNET_MAX_NETS = 4  # input sizes kept loaded: coarse frame, sweep tile, re-detection window, one spare


class DetectorError(Exception):
    """A detector cannot be built (missing/corrupt model, unknown backend); the message says what to do."""


@dataclass
class DetectConfig:
    """Face detection settings ([detect] section)."""

    backend: str = "yunet"  # "yunet" | "haar"
    model_path: str = ""  # YuNet .onnx (OpenCV) or .tflite (LiteRT, quantization.yunet); "" = the bundled YuNet
    detect_width: int = 320  # detect on a copy downscaled to this width (keeps aspect); 0 = full resolution
    min_face: int = 48  # smallest face kept: longer box side in source pixels (smaller crops classify poorly)
    max_faces: int = 5  # keep at most this many faces per frame (largest first)
    score_threshold: float = 0.6  # YuNet confidence threshold
    every_n: int = 1  # run the detector every N frames; the service tracks boxes in between
    # YuNet's fine search (edge.detect_fine): scale of its sweep tiles and re-detection windows relative to the
    # source frame (1 = full resolution; 0 = off, the coarse detect_width pass only) and the side of the one sweep
    # tile searched per frame, in detector input pixels (0 = no sweep, re-detect known faces only).
    fine_scale: float = 1.0
    fine_tile: int = 256
    # Rolls (degrees) at which the sweep searches each tile in turn, a full sweep per roll: faces tilted by about
    # these angles (a head on a shoulder or a pillow) are found turned upright, and then looked for again at their
    # roll. [0] = upright only.
    fine_angles: list[float] = field(default_factory=lambda: [0.0, 30.0, -30.0])

    def validate(self) -> None:
        """Raise ValueError("<field>: ...") for values the daemon would refuse, including an unusable model_path."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
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
        if self.fine_scale != 0 and not 0.25 <= self.fine_scale <= 4.0:
            raise ValueError(f"fine_scale: {self.fine_scale} out of range; use 0 (off) or 0.25..4 (1 = full "
                             "resolution)")
        if self.fine_tile != 0 and not 64 <= self.fine_tile <= 2048:
            raise ValueError(f"fine_tile: {self.fine_tile} out of range; use 0 (no sweep) or 64..2048 pixels")
        angles = list(self.fine_angles)
        if not 1 <= len(angles) <= MAX_FINE_ANGLES or any(not -90.0 <= float(a) <= 90.0 for a in angles):
            raise ValueError(f"fine_angles: {angles} must be 1..{MAX_FINE_ANGLES} rolls of -90..90 degrees "
                             "(e.g. [0, 30, -30]; [0] = upright only)")
        if self.backend == "yunet" and self.model_path:
            try:
                probe_yunet(self.model_path)
            except DetectorError as e:
                raise ValueError(f"model_path: {e}") from None


@dataclass
class Box:
    """A face box in source-resolution pixels; YuNet adds its five landmarks (eyes, nose tip, mouth corners)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0
    # (right eye, left eye, nose tip, right mouth corner, left mouth corner) as ((x, y), ...) in source pixels,
    # "right" meaning the person's right (the image's left); None when the backend gives none (Haar).
    landmarks: Optional[tuple] = None
    # The roll (degrees, cv2.getRotationMatrix2D's sense) at which the detector found the face: a face found only
    # in a rotated search is looked for again at that roll (edge.detect_fine).
    angle: float = 0.0

    @property
    def area(self) -> int:
        return self.w * self.h


class Detector:
    """Base class: downscale, run the backend, map boxes back, clip, filter, sort, cap.

    Subclasses implement ``_detect_small(small_bgr, scale) -> iterable of (x, y, w, h, score, landmarks)`` in the
    downscaled image's pixels (landmarks: 10 floats or None); ``scale`` is small/source and lets a backend convert
    source-pixel limits. ``reason`` says why this detector runs (the doctor and the stats show it).
    """

    name = "detector"

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg
        self.reason = ""
        self.fallback = ""  # why the preferred detector (bundled YuNet through LiteRT) is not the one running
        self.model_path: Optional[str] = None
        self._small: np.ndarray | None = None  # reused resize buffer

    def detect(self, image_bgr: np.ndarray) -> list[Box]:
        """Return faces in ``image_bgr`` (BGR or gray uint8) as source-pixel boxes, largest first, <= max_faces."""
        if image_bgr is None or image_bgr.size == 0:
            return []
        if image_bgr.ndim == 2:
            image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
        elif image_bgr.shape[2] == 4:
            image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_BGRA2BGR)
        small, scale = self._downscale(image_bgr)
        boxes = self._to_source(self._detect_small(small, scale), scale, (0, 0), image_bgr.shape)
        boxes = self._refine(image_bgr, boxes)
        # crop_face squares the box on its longer side, so that side is the resolution the classifier gets
        # (YuNet's boxes are ~0.8 as wide as tall: the shorter side would drop faces that crop well).
        boxes = [b for b in boxes if max(b.w, b.h) >= self.cfg.min_face]
        boxes.sort(key=lambda b: b.area, reverse=True)
        boxes = boxes[: self.cfg.max_faces]
        self._found(boxes)
        return boxes

    def _to_source(self, found, scale: float, origin: tuple[int, int], shape) -> list[Box]:
        """Backend results in a region's resized pixels -> Boxes in source pixels, clipped to the frame."""
        h, w = shape[:2]
        ox, oy = origin
        boxes = []
        for x, y, bw, bh, score, marks in found:
            # Map back with floor/ceil so the box never shrinks below what was detected.
            x0 = max(0, ox + int(np.floor(x / scale)))
            y0 = max(0, oy + int(np.floor(y / scale)))
            x1 = min(w, ox + int(np.ceil((x + bw) / scale)))
            y1 = min(h, oy + int(np.ceil((y + bh) / scale)))
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            lm = None
            if marks is not None:
                lm = tuple((ox + float(marks[2 * k]) / scale, oy + float(marks[2 * k + 1]) / scale)
                           for k in range(5))
            boxes.append(Box(x0, y0, x1 - x0, y1 - y0, float(score), lm))
        return boxes

    def _detect_region(self, image: np.ndarray, rect: tuple[int, int, int, int], scale: float,
                       pad_to: int = 0, angle: float = 0.0) -> list[Box]:
        """Run the backend on source rectangle ``rect`` (x0, y0, x1, y1) resized by ``scale`` (and padded with gray
        to a ``pad_to`` square, so every call has the same input size), rotated by ``angle`` degrees about its
        centre (a face rolled by -angle is upright there); source-pixel Boxes, axis-aligned, of the same side."""
        x0, y0, x1, y1 = rect
        region = image[y0:y1, x0:x1]
        if scale != 1.0:
            size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
            region = cv2.resize(region, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        rh, rw = region.shape[:2]
        if pad_to:
            canvas = np.full((pad_to, pad_to, 3), 128, np.uint8)
            rh, rw = min(pad_to, rh), min(pad_to, rw)
            canvas[:rh, :rw] = region[:rh, :rw]
            region = canvas
        else:
            region = np.ascontiguousarray(region)
        if not angle:
            return self._to_source(self._detect_small(region, scale), scale, (x0, y0), image.shape)
        turn = cv2.getRotationMatrix2D((rw / 2.0, rh / 2.0), angle, 1.0)
        region = cv2.warpAffine(region, turn, (region.shape[1], region.shape[0]), borderValue=(128, 128, 128))
        back = cv2.invertAffineTransform(turn)
        found = []
        for x, y, w, h, score, marks in self._detect_small(region, scale):
            cx, cy = back @ (x + w / 2.0, y + h / 2.0, 1.0)
            if marks is not None:
                pts = np.asarray(marks, np.float64).reshape(5, 2)
                marks = (np.column_stack([pts, np.ones(5)]) @ back.T).reshape(-1)
            found.append((cx - w / 2.0, cy - h / 2.0, w, h, score, marks))
        boxes = self._to_source(found, scale, (x0, y0), image.shape)
        for b in boxes:
            b.angle = angle
        return boxes

    def _refine(self, image: np.ndarray, boxes: list[Box]) -> list[Box]:
        """Hook for a backend's extra passes over the frame (YuNet's fine search); the coarse boxes by default."""
        return boxes

    def _found(self, boxes: list[Box]) -> None:
        """Hook: the boxes this frame returned."""

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


def _haar_dir() -> str:
    """Where the Haar cascades are: cv2.data in the opencv-python wheels; Debian's python3-opencv (32-bit Pi OS)
    has no cv2.data, its cascades come with opencv-data."""
    data = getattr(cv2, "data", None)
    if data is not None:
        return data.haarcascades
    for d in ("/usr/share/opencv4/haarcascades", "/usr/share/opencv/haarcascades"):
        if os.path.isdir(d):
            return d
    return ""


class HaarDetector(Detector):
    """OpenCV's bundled frontal-face Haar cascade (score is always 1.0)."""

    name = "haar"

    def __init__(self, cfg: DetectConfig, cascade_path: str | None = None):
        super().__init__(cfg)
        path = cascade_path or os.path.join(_haar_dir(), HAAR_CASCADE)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise DetectorError(f"cannot load Haar cascade {path}: reinstall opencv-python-headless (with Debian's "
                                "python3-opencv: apt install opencv-data)")
        self.model_path = path
        self.reason = 'detect.backend = "haar"'
        self._gray: np.ndarray | None = None

    def _detect_small(self, small: np.ndarray, scale: float):
        if self._gray is None or self._gray.shape != small.shape[:2]:
            self._gray = np.empty(small.shape[:2], np.uint8)
        cv2.cvtColor(small, cv2.COLOR_BGR2GRAY, dst=self._gray)
        cv2.equalizeHist(self._gray, dst=self._gray)  # evens out exposure; the cascade is trained on equalized faces
        side = max(1, int(self.cfg.min_face * scale))
        found = self._cascade.detectMultiScale(self._gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return [(x, y, w, h, 1.0, None) for (x, y, w, h) in found]


YUNET_HINT = ('set [detect] model_path = "" for the bundled YuNet, point it at a YuNet .onnx from the OpenCV Zoo '
              '(or a .tflite made from one by python -m quantization.yunet), or use backend = "haar"')


YUNET_MIN_OPENCV = (4, 8)  # YuNet's 2023+ ONNX graphs (OpenCV Zoo's note; see face_detection_yunet_*.LICENSE)


def _opencv_version() -> tuple[int, ...]:
    """cv2.__version__ as numbers ("4.6.0" -> (4, 6, 0)); suffixes such as "-dev" are ignored."""
    parts = []
    for piece in cv2.__version__.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits[:4]))
    return tuple(parts)


BUNDLED_HINT = 'reinstall fer-edge (the packaged model is damaged) or set [detect] backend = "haar"'


def _create_yunet(path: Path, size: tuple[int, int], score_threshold: float, top_k: int, hint: str = YUNET_HINT):
    """A YuNet runner for ``path`` (.tflite: LiteRT, .onnx: cv2.FaceDetectorYN), checked on one blank frame;
    DetectorError with the reason otherwise. Both have ``detect(bgr)`` and ``setScoreThreshold``."""
    if path.suffix.lower() not in YUNET_SUFFIXES:
        raise DetectorError(f"YuNet model must be an .onnx or .tflite file, got {path.name}: {hint}")
    if not path.is_file():
        raise DetectorError(f"YuNet model not found: {path}: {hint}")
    n = path.stat().st_size
    if not 0 < n <= YUNET_MAX_BYTES:
        raise DetectorError(f"YuNet model {path} is {n} bytes, not a YuNet model: {hint}")
    if path.suffix.lower() == ".tflite":
        from edge.detect_litert import LiteYuNet, LiteYuNetError

        try:
            return LiteYuNet(path, size, score_threshold, 0.3, top_k)
        except LiteYuNetError as e:
            raise DetectorError(f"YuNet model {e}: {hint}") from None
    if not hasattr(cv2, "FaceDetectorYN"):
        raise DetectorError(f"this OpenCV ({cv2.__version__}) has no cv2.FaceDetectorYN: "
                            "pip install 'opencv-python-headless>=4.10,<5'")
    try:
        net = cv2.FaceDetectorYN.create(str(path), "", size, score_threshold, 0.3, top_k)
        # A valid ONNX file that is not YuNet only fails at inference: run one blank frame now.
        net.detect(np.zeros((size[1], size[0], 3), np.uint8))
    except cv2.error as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if _opencv_version() < YUNET_MIN_OPENCV:
            # Not a damaged file: Debian's OpenCV 4.6 (the only one on 32-bit Pi OS) fails on every YuNet 2023+.
            raise DetectorError(f"this OpenCV ({cv2.__version__}) is too old for YuNet {path.name}: it needs OpenCV "
                                f">= {'.'.join(map(str, YUNET_MIN_OPENCV))} ({msg}); install a newer OpenCV "
                                "(pip install 'opencv-python-headless>=4.10,<5'; 32-bit Pi OS has none: use the "
                                '64-bit OS) or set [detect] backend = "haar"') from None
        raise DetectorError(f"YuNet model {path} is corrupt or not a YuNet ONNX model ({msg}): {hint}") from None
    return net


@functools.lru_cache(maxsize=8)
def _probe_cached(path: str, mtime_ns: int, size: int) -> None:
    _create_yunet(Path(path), (64, 64), 0.6, 1)


def probe_yunet(model_path: str) -> None:
    """Load ``model_path`` once to prove it is a working YuNet model (cached per file version); DetectorError."""
    path = Path(model_path).expanduser()
    try:
        st = path.stat()
    except OSError:
        _create_yunet(path, (64, 64), 0.6, 1)  # raises the not-found message
        return
    _probe_cached(str(path), st.st_mtime_ns, st.st_size)


class YuNetDetector(Detector):
    """OpenCV Zoo's YuNet CNN (LiteRT for a .tflite, cv2.FaceDetectorYN for an .onnx); score is the model's face
    confidence."""

    name = "yunet"

    def __init__(self, cfg: DetectConfig, top_k: int = 50, path: Path | str | None = None, bundled: bool = False):
        super().__init__(cfg)
        path = Path(path or cfg.model_path or BUNDLED_YUNET_TFLITE).expanduser()
        bundled = bundled or not cfg.model_path
        hint = BUNDLED_HINT if bundled else YUNET_HINT
        self._path, self._top_k = path, top_k
        self.runtime = "LiteRT" if path.suffix.lower() == ".tflite" else "OpenCV"
        # One net per input size: the coarse frame, the sweep tile and the re-detection window each keep theirs,
        # because setInputSize on every call re-plans the network and costs about as much as a small detection.
        self._nets = {(320, 320): _create_yunet(path, (320, 320), cfg.score_threshold, top_k, hint)}
        self.model_path = str(path)
        self.reason = (f"bundled {path.name} ({self.runtime})" if bundled
                       else f"detect.model_path = {path} ({self.runtime})")
        self.fine = (FineSearch(cfg.fine_scale, cfg.fine_tile, cfg.max_faces, self._detect_region,
                                cfg.score_threshold, cfg.min_face, cfg.fine_angles) if cfg.fine_scale > 0 else None)
        # With the fine search the nets also return weaker boxes: its proposals for a closer look.
        self._net_threshold = min(cfg.score_threshold, PROPOSAL_SCORE) if self.fine is not None else cfg.score_threshold
        self._nets[(320, 320)].setScoreThreshold(self._net_threshold)

    def _refine(self, image: np.ndarray, boxes: list[Box]) -> list[Box]:
        if self.fine is None:
            return boxes
        sure = [b for b in boxes if b.score >= self.cfg.score_threshold]
        return self.fine.search(image, sure, [b for b in boxes if b.score < self.cfg.score_threshold])

    def _found(self, boxes: list[Box]) -> None:
        if self.fine is not None:
            self.fine.remember(boxes)

    def _net_for(self, size: tuple[int, int]):
        net = self._nets.get(size)
        if net is None:
            if len(self._nets) >= YUNET_MAX_NETS:  # sizes keep changing (a resizing source): drop the oldest
                self._nets.pop(next(iter(self._nets)))
            net = _create_yunet(self._path, size, self._net_threshold, self._top_k)
            self._nets[size] = net
        return net

    def _detect_small(self, small: np.ndarray, scale: float):
        _, faces = self._net_for((small.shape[1], small.shape[0])).detect(small)
        if faces is None:
            return []
        return [(*yunet_square(float(f[0]), float(f[1]), float(f[2]), float(f[3])), float(f[14]), f[4:14])
                for f in faces]


# Where YuNet's box sits on a face framed like the classifier's training faces (FER-2013), as fractions of that
# square's side: centre (0.503, 0.534), width 0.82, height 1.04 (median over 1,661 PublicTest faces found of 2,100,
# seeds 2013/3/7: python -m training.scenes --framing 700 --detector yunet --seed S). Returning that square instead
# of the raw box makes the crop the model sees match its training framing.
YUNET_FRAME_CX, YUNET_FRAME_CY, YUNET_FRAME_H = 0.503, 0.534, 1.04


def yunet_square(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
    """YuNet's (x, y, w, h) -> the square face frame it implies (see YUNET_FRAME_*)."""
    side = h / YUNET_FRAME_H
    cx = x + w / 2.0 - (YUNET_FRAME_CX - 0.5) * side
    cy = y + h / 2.0 - (YUNET_FRAME_CY - 0.5) * side
    return cx - side / 2.0, cy - side / 2.0, side, side


def make_detector(cfg: DetectConfig, bundled: Path | None = None) -> Detector:
    """Build the detector named by ``cfg.backend``; raises DetectorError with an actionable message.

    With backend "yunet" and no model_path, the bundled .tflite runs through LiteRT; if it cannot load, the bundled
    .onnx through OpenCV; if neither can, Haar. Each fallback logs one warning and ``reason`` says why.
    ``bundled`` replaces the packaged model files (tests): an .onnx, .tflite, or a list of them tried in order.
    """
    try:
        cfg.validate()
    except ValueError as e:
        raise DetectorError(str(e)) from None
    if cfg.backend == "haar":
        return HaarDetector(cfg)
    if cfg.model_path:
        return YuNetDetector(cfg)
    if bundled is None:
        candidates = [BUNDLED_YUNET_TFLITE, BUNDLED_YUNET]
    else:
        candidates = list(bundled) if isinstance(bundled, (list, tuple)) else [bundled]
    failed = []
    for path in candidates:
        try:
            det = YuNetDetector(cfg, path=path, bundled=True)
        except DetectorError as e:
            failed.append(str(e))
            continue
        if failed:
            det.fallback = " ".join(failed)
            det.reason += f"; {det.fallback}"
            log.warning("detector: running the bundled YuNet through %s: %s", det.runtime, " ".join(failed))
        return det
    why = " ".join(failed)
    log.warning("detector: bundled YuNet unavailable, falling back to Haar: %s", why)
    det = HaarDetector(cfg)
    det.reason = f"fallback from YuNet: {why}"
    det.fallback = why
    return det
