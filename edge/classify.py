"""Emotion classifier: an int8 (or float) TFLite model plus its JSON manifest.

Labels, input size, normalization and face margin come from the manifest beside the ``.tflite``
(same stem, ``.json``); nothing about the model is hard-coded here. Interpreter backends are tried in
order: ai-edge-litert (LiteRT), then tflite-runtime. TensorFlow itself is never imported.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.native_stderr import filtered_stderr, is_litert_info
from edge.preprocess import crop_face

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).with_name("models") / "fer_emotion.tflite"
# model.variant -> the bundled model it selects: "default" for Pi 4 / Pi 5 class CPUs, "small" (less time per
# face, lower accuracy; see edge/models/MODEL_CARD.md) for Pi Zero 2 W / Pi 3
VARIANTS = {"default": DEFAULT_MODEL, "small": DEFAULT_MODEL.with_name("fer_emotion_small.tflite")}
MANIFEST_FORMAT = "fer-edge-model/1"


class ModelError(Exception):
    """The model or its manifest cannot be used; the message says why and what to do."""


@dataclass
class ModelConfig:
    path: str = ""  # "" = the bundled default model
    threads: int = 1
    flip_average: bool = False  # also classify the mirrored face and average: +0.4-1.2 points, 2x the time
    variant: str = "default"  # which bundled model when path is "": "default" or "small" (VARIANTS)
    # Classifications a frame may cost once its faces are tracked: with more faces, the tracked ones take turns
    # (new faces are always classified). Bounds the frame time however many faces are in view; 0 = every face
    # every frame. Two keeps a 3-face frame within 15 ms on a CPU without an int8 dot product (README, Budget).
    max_faces_per_frame: int = 2

    def validate(self) -> None:
        if not isinstance(self.variant, str) or self.variant not in VARIANTS:
            raise ValueError(f"variant: must be one of {', '.join(map(repr, VARIANTS))} (got {self.variant!r})")
        if self.variant != "default":
            bundled = VARIANTS[self.variant]
            if self.path and Path(self.path) != bundled:
                raise ValueError(f"variant: {self.variant!r} selects a bundled model, but path is set too "
                                 f"({self.path}); set one of them")
            if not bundled.is_file() or not manifest_path(bundled).is_file():
                raise ValueError(f"variant: the {self.variant!r} model ({bundled.name} with its .json manifest) "
                                 "is not installed with this version; use \"default\"")
            # every loader reads model.path ("" = the default bundle), so the variant resolves to it here, once
            self.path = str(bundled)
        if not isinstance(self.flip_average, bool):
            raise ValueError(f"flip_average: must be true or false (got {self.flip_average!r})")
        if not 1 <= self.threads <= 16:
            raise ValueError(f"threads: must be 1..16 (got {self.threads})")
        if not 0 <= self.max_faces_per_frame <= 1000:
            raise ValueError(f"max_faces_per_frame: must be 0..1000 (got {self.max_faces_per_frame}; 0 = every "
                             "face every frame)")
        if self.path and not Path(self.path).expanduser().is_file():
            raise ValueError(f"path: model file {self.path} does not exist (leave empty for the bundled model)")


def _interpreter_class():
    """Return (Interpreter class, backend name) for the first importable backend."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        import ai_edge_litert

        return Interpreter, f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '')}".strip()
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        import tflite_runtime

        return Interpreter, f"tflite-runtime {getattr(tflite_runtime, '__version__', '')}".strip()
    except ImportError:
        pass
    raise ModelError("no TFLite interpreter installed: pip install ai-edge-litert (or tflite-runtime)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def read_manifest(model_path: Path) -> dict:
    """Read and check the manifest that travels with a model file."""
    mpath = manifest_path(model_path)
    if not mpath.is_file():
        raise ModelError(f"{mpath}: manifest missing; every model needs its JSON manifest beside the .tflite")
    try:
        man = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{mpath}: unreadable manifest ({e})") from None
    need = ["labels", "input", "version"]
    missing = [k for k in need if k not in man]
    if missing:
        raise ModelError(f"{mpath}: manifest lacks {', '.join(missing)}")
    inp = man["input"]
    for k in ("size", "scale", "offset", "margin"):
        if not isinstance(inp.get(k), (int, float)):
            raise ModelError(f"{mpath}: manifest input.{k} must be a number")
    if not (isinstance(man["labels"], list) and len(man["labels"]) >= 2 and all(isinstance(x, str) for x in man["labels"])):
        raise ModelError(f"{mpath}: manifest labels must be a list of at least 2 names")
    return man


class Classifier:
    """A loaded emotion model: ``predict`` maps gray faces to probabilities, one invoke per call."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 1):
        path = Path(model_path).expanduser() if model_path else DEFAULT_MODEL
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        self.path = path
        self.manifest = man = read_manifest(path)
        self.sha256 = sha256_file(path)
        if man.get("sha256") and man["sha256"] != self.sha256:
            raise ModelError(f"{path}: sha256 {self.sha256[:12]}… does not match the manifest's {man['sha256'][:12]}… "
                             "(file corrupt or manifest from another model)")
        self.labels: list[str] = list(man["labels"])
        self.version: str = str(man["version"])
        self.input_size = int(man["input"]["size"])
        self.margin = float(man["input"]["margin"])
        Interpreter, self.backend = _interpreter_class()
        try:
            # The runtime prints an INFO line on fd 2 when the first allocation creates its CPU delegate.
            with filtered_stderr(is_litert_info):
                self._it = Interpreter(model_path=str(path), num_threads=threads)
                self._it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{path}: not a loadable TFLite model ({e})") from None
        inp = self._it.get_input_details()[0]
        out = self._it.get_output_details()[0]
        self._in, self._out = inp["index"], out["index"]
        shape = tuple(int(v) for v in inp["shape"])
        if len(shape) != 4 or shape[1:] != (self.input_size, self.input_size, 1):
            raise ModelError(f"{path}: input shape {list(shape)} does not match the manifest "
                             f"(expected [N, {self.input_size}, {self.input_size}, 1])")
        if int(out["shape"][-1]) != len(self.labels):
            raise ModelError(f"{path}: model has {int(out['shape'][-1])} outputs but the manifest lists "
                             f"{len(self.labels)} labels")
        sig = inp.get("shape_signature")
        self._dynamic_batch = sig is not None and len(sig) and int(sig[0]) == -1
        self._batch = shape[0]
        self.input_dtype = np.dtype(inp["dtype"])
        self._lut = self._input_lut(inp, man["input"])
        oq = out.get("quantization") or (0.0, 0)
        self._out_scale, self._out_zp = float(oq[0]), int(oq[1])
        self.output_dtype = np.dtype(out["dtype"])

    def _input_lut(self, inp: dict, spec: dict) -> np.ndarray:
        """Pixel (0..255) -> input tensor value, folding normalization and quantization into one lookup."""
        x = np.arange(256, dtype=np.float64) * float(spec["scale"]) + float(spec["offset"])
        if self.input_dtype in (np.int8, np.uint8):
            qs, zp = inp.get("quantization") or (0.0, 0)
            if not qs:
                raise ModelError(f"{self.path}: integer input without quantization parameters")
            info = np.iinfo(self.input_dtype)
            return np.clip(np.round(x / qs + zp), info.min, info.max).astype(self.input_dtype)
        return x.astype(self.input_dtype)

    def _set_batch(self, n: int) -> None:
        if n != self._batch:
            self._it.resize_tensor_input(self._in, [n, self.input_size, self.input_size, 1])
            self._it.allocate_tensors()
            self._batch = n

    def predict(self, faces: np.ndarray, flip_average: bool = False) -> np.ndarray:
        """Probabilities (N, len(labels)) for gray uint8 faces of shape (N, size, size).

        ``flip_average`` also classifies each face mirrored (in the same invoke) and averages the two:
        the models are trained with flips, so the mirror is a second, equally valid view.
        """
        faces = np.asarray(faces)
        if faces.ndim == 2:
            faces = faces[None]
        if flip_average and faces.shape[0]:
            n = faces.shape[0]
            p = self.predict(np.concatenate([faces, faces[:, :, ::-1]]))
            return ((p[:n] + p[n:]) / 2).astype(np.float32)
        n = faces.shape[0]
        if n == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        x = self._lut[faces][..., None]
        if self._dynamic_batch:
            self._set_batch(n)
            self._it.set_tensor(self._in, x)
            self._it.invoke()
            raw = self._it.get_tensor(self._out).reshape(n, -1)
        else:  # fixed batch of 1: one invoke per face
            rows = []
            for i in range(n):
                self._it.set_tensor(self._in, x[i : i + 1])
                self._it.invoke()
                rows.append(self._it.get_tensor(self._out).reshape(-1))
            raw = np.stack(rows)
        if self.output_dtype in (np.int8, np.uint8):
            probs = (raw.astype(np.float32) - self._out_zp) * self._out_scale
        else:
            probs = raw.astype(np.float32)
        probs = np.clip(probs, 0.0, None)
        s = probs.sum(axis=1, keepdims=True)
        return np.where(s > 0, probs / np.maximum(s, 1e-12), 1.0 / len(self.labels)).astype(np.float32)

    def face_input(self, image: np.ndarray, box) -> np.ndarray:
        """The face at ``box`` in a BGR or gray ``image``, framed as this model wants it: ``crop_face`` with the
        manifest's input size and margin, a (size, size) uint8 gray face for ``predict``."""
        return crop_face(image, box, self.input_size, self.margin)

    def classify_faces(self, image: np.ndarray, boxes, flip_average: bool = False) -> np.ndarray:
        """Probabilities (len(boxes), len(labels)) for the faces at ``boxes`` in ``image``, in one predict call."""
        boxes = list(boxes)
        if not boxes:
            return np.zeros((0, len(self.labels)), np.float32)
        return self.predict(np.stack([self.face_input(image, b) for b in boxes]), flip_average=flip_average)

    def info(self) -> dict:
        return {"path": str(self.path), "version": self.version, "sha256": self.sha256, "backend": self.backend,
                "labels": self.labels, "input_size": self.input_size, "input_dtype": str(self.input_dtype)}


def load_classifier(model_path: str | Path | None = None, threads: int = 1) -> Classifier:
    """Load a model bundle (None = the bundled default); raises ModelError with a user-facing message."""
    clf = Classifier(model_path, threads)
    log.info("model %s v%s (%s…) on %s, %d thread(s)", clf.path.name, clf.version, clf.sha256[:12], clf.backend, threads)
    return clf
