"""Face-detection benchmark on generated scene videos, run through the daemon's own pipeline.

    python -m training.scenes [--data ../shared/data/fer2013/test] [--scenes 60] [--detector yunet haar]
                              [--sizes 40 200] [--set detect.detect_width=480] [--json -o report.json]

Scenes: labelled faces (any Kaggle-layout folder: <class>/<image>; PublicTest by default) pasted, 1-3 at a time, at
log-uniform sizes and random positions on varied backgrounds (gradients, rooms of blurred blocks, textures, tiles),
each with shoulders below it and its own brightness, drifting slowly. Between two scenes the frame shows no face
for longer than ``track.max_missed_s``, so every face's track must end before the next scene starts.

Each detector's run is the real daemon (``edge.service.Service``: an OpenCV file source -> detect -> crop_face ->
classify -> track -> events, MQTT off, events collected from its event sink). Two thin observers are added: the
source's frames are stamped with video time (frame / fps, as a camera at that rate would), so the tracker's
timeouts mean what they do on a device whatever this machine's speed; and every detector call is timed and its
boxes kept, for per-frame recall and latency.

Ground truth is matched by time and position: a track belongs to the scene on screen at its ``first_seen`` and to
the face of that scene whose true box overlaps the track's ``new`` box best (IoU >= --iou); anything else is a false
track. Reported per detector:

* face recall: faces that got at least one track (all faces, and faces of at least ``detect.min_face`` pixels);
* frame recall: face-frames (fully shown) where the detector returned an overlapping box, by face size;
* false tracks, split faces (a face reported as two or more tracks);
* accuracy of ``new`` events and of ``end`` summaries (dominant emotion) against the face's label, and the model's
  accuracy on the same faces as still images (``edge.preprocess.crop_face`` on the original 48x48 file), so the
  two differ only by what the camera, detector and tracker did;
* detector latency (p50/p95 ms per detect call) and the daemon's total per-frame time.

The face size is the side of the pasted (square, FER-framed) face in frame pixels; with the shipped model's margin 0
that is the square crop_face should cut, and YuNet's box height matches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fer2013" / "test"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm"}
T0 = 1_000_000_000.0  # video time origin (epoch seconds); any value works, a round one keeps ISO ms exact
SIZE_EDGES = (64, 96, 128)  # face-size buckets for the per-size rows, besides min_face

log = logging.getLogger("training.scenes")


class ScenesError(Exception):
    """Bad benchmark input; the message says what to do."""


# --- faces and scenes --------------------------------------------------------------------------------------------

@dataclass
class FaceImage:
    path: str
    label: str
    gray: np.ndarray  # as read (48x48 for FER-2013)


def load_faces(folder: Path, labels: list[str], n: int, seed: int) -> list[FaceImage]:
    """``n`` faces drawn (fixed seed, without replacement) from a Kaggle-layout folder, classes mixed as found."""
    from training.data import canonical_label

    if not folder.is_dir():
        raise ScenesError(f"--data: {folder} is not a folder; give a Kaggle-layout folder (<class>/<image>), e.g. "
                          f"../shared/data/fer2013/test")
    items = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        lab = canonical_label(d.name)
        if lab is None or lab not in labels:
            log.warning("skipping folder %s: not one of the model's labels", d.name)
            continue
        items += [(str(f), lab) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTS]
    if not items:
        raise ScenesError(f"--data: no images in class folders under {folder} (expected <class>/<image>.jpg)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    faces = []
    for i in order:
        path, lab = items[i]
        img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if img is None or min(img.shape) < 8:
            log.warning("skipping unreadable image %s", path)
            continue
        faces.append(FaceImage(path, lab, img))
        if len(faces) == n:
            break
    if len(faces) < n:
        log.warning("only %d usable faces in %s (asked for %d): faces repeat", len(faces), folder, n)
        faces = [faces[i % len(faces)] for i in range(n)]
    return faces


@dataclass
class SceneFace:
    face: int  # index into the face list
    label: str
    size: int
    start: tuple[float, float]  # top-left at the scene's first frame
    end: tuple[float, float]  # top-left at its last frame
    gain: float
    bias: float
    shirt: tuple[int, int, int]

    def box(self, t: float) -> tuple[int, int, int, int]:
        """Integer (x, y, side, side) at scene fraction ``t`` in [0, 1]."""
        x = self.start[0] + t * (self.end[0] - self.start[0])
        y = self.start[1] + t * (self.end[1] - self.start[1])
        return int(round(x)), int(round(y)), self.size, self.size


@dataclass
class Scene:
    index: int
    first: int  # frame range, inclusive
    last: int
    background: str
    bg_seed: int
    faces: list[SceneFace] = field(default_factory=list)

    def t(self, f: int) -> float:
        return (f - self.first) / max(1, self.last - self.first)


@dataclass
class Plan:
    width: int
    height: int
    fps: float
    frames: int
    scenes: list[Scene]
    fade: int


BACKGROUNDS = ("gradient", "room", "texture", "tiles")


def plan_scenes(n_scenes: int, faces: list[FaceImage], *, width: int = 640, height: int = 480, fps: float = 10.0,
                scene_s: float = 4.0, gap_s: float = 2.0, sizes: tuple[int, int] = (40, 200), max_faces: int = 3,
                seed: int = 2013, fade: int = 1, jitter: bool = False) -> Plan:
    """Lay out ``n_scenes`` scenes of 1..max_faces faces each, separated by ``gap_s`` without faces.

    ``fade``: frames over which faces fade in and out (1 = they appear and leave at once, as people walking into
    view do). ``jitter``: give each face its own gain and offset, so pipeline and still images see different pixels.
    """
    rng = np.random.default_rng(seed)
    scene_n, gap_n = max(2 * fade + 5, round(scene_s * fps)), max(1, round(gap_s * fps))
    lo, hi = sizes
    if not 8 <= lo <= hi or hi > min(width, height) * 0.8:
        raise ScenesError(f"--sizes: {lo} {hi} must satisfy 8 <= min <= max <= 80% of the frame's shorter side")
    scenes, f, k_face = [], gap_n, 0
    for s in range(n_scenes):
        sc = Scene(s, f, f + scene_n - 1, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], int(rng.integers(1 << 30)))
        placed: list[tuple[float, float, float, float]] = []  # swept rectangles, kept apart
        for _ in range(int(rng.integers(1, max_faces + 1))):
            for _attempt in range(60):
                size = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
                drift = rng.uniform(-0.25, 0.25, 2) * size  # a slow walk over the scene
                x0 = rng.uniform(max(0.0, -drift[0]), width - size - max(0.0, drift[0]))
                y0 = rng.uniform(max(0.0, -drift[1]), height - size * 1.5 - max(0.0, drift[1]))
                if y0 < 0:
                    continue
                rect = (min(x0, x0 + drift[0]) - 0.1 * size, min(y0, y0 + drift[1]) - 0.1 * size,
                        max(x0, x0 + drift[0]) + 1.1 * size, max(y0, y0 + drift[1]) + 1.1 * size)
                if all(rect[2] < r[0] or r[2] < rect[0] or rect[3] < r[1] or r[3] < rect[1] for r in placed):
                    placed.append(rect)
                    fi = k_face % len(faces)
                    k_face += 1
                    shirt = tuple(int(v) for v in rng.integers(20, 220, 3))
                    gain, bias = float(rng.uniform(0.8, 1.15)), float(rng.uniform(-15, 15))
                    if not jitter:
                        gain, bias = 1.0, 0.0
                    sc.faces.append(SceneFace(fi, faces[fi].label, size, (x0, y0), (x0 + drift[0], y0 + drift[1]),
                                              gain, bias, shirt))
                    break
        scenes.append(sc)
        f = sc.last + 1 + gap_n
    return Plan(width, height, fps, f, scenes, fade)


def background(kind: str, width: int, height: int, seed: int) -> np.ndarray:
    """A BGR background of one of BACKGROUNDS, varied by ``seed``."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 210, 3)
    tint = rng.uniform(-50, 50, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    t = ((xx / width - 0.5) * math.cos(a) + (yy / height - 0.5) * math.sin(a))[..., None]
    img = base + tint * t
    if kind == "room":  # walls, a floor, furniture-like blocks, out of focus
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            x1, y1 = x0 + rng.integers(30, width // 2), y0 + rng.integers(30, height // 2)
            img[y0:y1, x0:x1] = rng.uniform(20, 235, 3)
        img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 4)
    elif kind == "texture":
        noise = rng.standard_normal((height // 8 + 1, width // 8 + 1, 3)).astype(np.float32) * 22
        img = img + cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    elif kind == "tiles":
        step = int(rng.integers(24, 64))
        checker = (((xx // step) + (yy // step)) % 2)[..., None]
        img = img + (checker - 0.5) * rng.uniform(15, 45)
    img = img + rng.standard_normal(img.shape).astype(np.float32) * 3.0  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def render(plan: Plan, faces: list[FaceImage]):
    """Yield the plan's frames (BGR uint8), in order."""
    scene_at = {}
    for sc in plan.scenes:
        for f in range(sc.first, sc.last + 1):
            scene_at[f] = sc
    empty = background("gradient", plan.width, plan.height, 7)
    cached: dict[int, np.ndarray] = {}
    for f in range(plan.frames):
        sc = scene_at.get(f)
        if sc is None:
            yield empty
            continue
        if sc.index not in cached:
            cached.clear()
            cached[sc.index] = background(sc.background, plan.width, plan.height, sc.bg_seed)
        img = cached[sc.index].copy()
        alpha = min(1.0, (f - sc.first + 1) / plan.fade, (sc.last - f + 1) / plan.fade)
        for sf in sc.faces:
            x, y, s, _ = sf.box(sc.t(f))
            layer = img.copy()
            # Shoulders below the face: the context a camera sees, drawn before the face.
            cv2.ellipse(layer, (x + s // 2, y + int(1.45 * s)), (int(0.85 * s), int(0.55 * s)), 0, 180, 360,
                        sf.shirt, -1)
            face = cv2.resize(faces[sf.face].gray, (s, s), interpolation=cv2.INTER_CUBIC).astype(np.float32)
            face = np.clip(face * sf.gain + sf.bias, 0, 255).astype(np.uint8)
            x0, y0, x1, y1 = max(0, x), max(0, y), min(plan.width, x + s), min(plan.height, y + s)
            layer[y0:y1, x0:x1] = face[y0 - y:y1 - y, x0 - x:x1 - x, None]
            img = layer if alpha >= 1.0 else cv2.addWeighted(layer, alpha, img, 1.0 - alpha, 0)
        yield img


def write_video(path: Path, plan: Plan, faces: list[FaceImage]) -> None:
    """Encode the plan to an mp4 with fer-edge bench's writer (mp4v, the demo clip's codec)."""
    from edge.bench import BenchError
    from edge.bench import write_video as encode

    try:
        encode(path, render(plan, faces), (plan.width, plan.height), plan.fps)
    except BenchError as e:
        raise ScenesError(str(e)) from None


def truth_boxes(plan: Plan, f: int, full_only: bool = False) -> list[tuple[int, int, tuple]]:
    """(scene, face-in-scene, box) of the faces on screen at frame ``f`` (``full_only``: not fading)."""
    out = []
    for sc in plan.scenes:
        if sc.first <= f <= sc.last:
            if full_only and not (sc.first + plan.fade - 1 <= f <= sc.last - plan.fade + 1):
                break
            out += [(sc.index, j, sf.box(sc.t(f))) for j, sf in enumerate(sc.faces)]
            break
    return out


# --- running the daemon ----------------------------------------------------------------------------------------------

class _VideoClock:
    """The file source, with each frame stamped at video time (T0 + index / fps) like a camera at that rate."""

    def __init__(self, source, fps: float):
        self._source, self._fps = source, fps
        self.index = -1

    def read(self, timeout=None):
        # A file never stalls like a camera: wait out slow decodes (a loaded machine) instead of letting the daemon
        # age its tracks at wall-clock time, which is not this video's time.
        frame = self._source.read(timeout=timeout)
        while frame is None and not self._source.finished:
            frame = self._source.read(timeout=timeout)
        if frame is None:
            return None
        self.index = frame.index
        return dataclasses.replace(frame, timestamp=T0 + frame.index / self._fps)

    def __getattr__(self, name):
        return getattr(self._source, name)


class _TimedDetector:
    """The daemon's detector, each call timed and its boxes kept by frame index."""

    def __init__(self, detector, clock: _VideoClock):
        self._det, self._clock = detector, clock
        self.calls: list[tuple[int, list, float]] = []

    def detect(self, image):
        t0 = time.perf_counter()
        boxes = self._det.detect(image)
        self.calls.append((self._clock.index, list(boxes), time.perf_counter() - t0))
        return boxes

    def __getattr__(self, name):
        return getattr(self._det, name)


def run_daemon(video: Path, overrides: dict[str, str], state_dir: str, fps: float) -> dict:
    """Run edge.service.Service on ``video``; returns its events, detector calls, final stats and detector."""
    from edge.config import load_config
    from edge.service import Service

    events: list[dict] = []
    base = {"source.kind": "opencv", "source.uri": str(video), "source.realtime": "false", "source.loop": "false",
            "mqtt.enabled": "false", "device.id": "scenes", "device.state_dir": state_dir,
            "service.log_stats_interval_s": "0"}
    cfg = load_config(None, overrides={**base, **overrides}, env={})

    class ObservedService(Service):
        def _start(self):
            super()._start()
            self.source = _VideoClock(self.source, fps)
            self.detector = _TimedDetector(self.detector, self.source)

    svc = ObservedService(cfg, env={}, event_sink=events.append)
    svc.run()
    det = svc.detector
    return {"events": events, "calls": det.calls, "stats": svc.stats(), "detector": det.name,
            "reason": det.reason, "cfg": cfg}


# --- matching and metrics ----------------------------------------------------------------------------------------------

def iou(a, b) -> float:
    """edge.track's IoU (the tracker's own measure) for (x, y, w, h) tuples."""
    from edge.detect import Box
    from edge.track import iou as box_iou

    return box_iou(Box(*a), Box(*b))


def _frame_of(epoch: float, fps: float) -> int:
    return int(round((epoch - T0) * fps))


def _epoch_of(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def match_tracks(plan: Plan, events: list[dict], iou_min: float = 0.3) -> dict:
    """Assign every track (face_id with a ``new`` event) to a (scene, face) by time and position, or to none.

    Returns {"tracks": {face_id: {"face": (scene, j) | None, "new": emotion, "end": dominant | None, ...}}}.
    """
    tracks: dict[str, dict] = {}
    for ev in events:
        fid = ev["face_id"]
        if ev["type"] == "new" and fid not in tracks:
            f_first = _frame_of(_epoch_of(ev["first_seen"]), plan.fps)
            f_new = _frame_of(ev["epoch"], plan.fps)
            b = ev["bbox"]
            box = (b["x"], b["y"], b["w"], b["h"])
            face = None
            scene = next((sc for sc in plan.scenes if sc.first <= f_first <= sc.last), None)
            if scene is not None:
                # The truth box where the track stood when confirmed (clamped to the scene if it outlived it).
                ft = min(max(f_new, scene.first), scene.last)
                best = max(((iou(box, sf.box(scene.t(ft))), j) for j, sf in enumerate(scene.faces)), default=(0, -1))
                if best[0] >= iou_min:
                    face = (scene.index, best[1])
            tracks[fid] = {"face": face, "new": ev["emotion"], "end": None, "first_frame": f_first,
                           "new_frame": f_new, "bbox": box}
        elif ev["type"] == "end" and fid in tracks:
            tracks[fid]["end"] = (ev.get("summary") or {}).get("dominant", ev["emotion"])
    return {"tracks": tracks}


def still_predictions(clf, faces: list[FaceImage]) -> list[str]:
    """The model's label for each face as a still image, through crop_face like training.evaluate."""
    from edge.preprocess import crop_face, inner_box

    out = []
    for fi in faces:
        g = fi.gray
        x = crop_face(g, inner_box(g.shape[0], clf.margin), clf.input_size, clf.margin)
        out.append(clf.labels[int(np.argmax(clf.predict(x[None])[0]))])
    return out


def _bucket(size: int, min_face: int) -> str:
    edges = sorted({min_face, *SIZE_EDGES})
    if size < edges[0]:
        return f"<{edges[0]}"
    for lo, hi in zip(edges, edges[1:]):
        if size < hi:
            return f"{lo}-{hi - 1}"
    return f">={edges[-1]}"


def _pct(n: int, d: int) -> Optional[float]:
    return round(100.0 * n / d, 2) if d else None


def _ms(values) -> dict:
    if not values:
        return {"p50_ms": None, "p95_ms": None}
    p50, p95 = np.percentile(np.asarray(values) * 1e3, [50, 95])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2)}


def score(plan: Plan, faces: list[FaceImage], still: list[str], run: dict, min_face: int, iou_min: float = 0.3) -> dict:
    """Every figure of one detector's run (see the module docstring)."""
    tracks = match_tracks(plan, run["events"], iou_min)["tracks"]
    by_face: dict[tuple[int, int], list[dict]] = {}
    false_tracks = 0
    for t in tracks.values():
        if t["face"] is None:
            false_tracks += 1
        else:
            by_face.setdefault(t["face"], []).append(t)
    all_faces = [(sc.index, j, sf) for sc in plan.scenes for j, sf in enumerate(sc.faces)]
    sizes: dict[str, list[int]] = {}
    for si, j, sf in all_faces:
        b = sizes.setdefault(_bucket(sf.size, min_face), [0, 0])
        b[0] += 1
        b[1] += int((si, j) in by_face)
    big = [(si, j) for si, j, sf in all_faces if sf.size >= min_face]
    # Per-frame detection: each fully shown face-frame, found when a returned box overlaps it.
    frame_hits: dict[str, list[int]] = {}
    face_frames: dict[tuple[int, int], list[int]] = {}
    for idx, boxes, _ in run["calls"]:
        for si, j, tb in truth_boxes(plan, idx, full_only=True):
            hit = any(iou((b.x, b.y, b.w, b.h), tb) >= iou_min for b in boxes)
            fb = frame_hits.setdefault(_bucket(tb[2], min_face), [0, 0])
            fb[0] += 1
            fb[1] += int(hit)
            ff = face_frames.setdefault((si, j), [0, 0])
            ff[0] += 1
            ff[1] += int(hit)
    matched = [t for ts in by_face.values() for t in ts]
    label = {(si, j): sf.label for si, j, sf in all_faces}
    still_of = {(si, j): still[sf.face] for si, j, sf in all_faces}
    new_ok = sum(t["new"] == label[t["face"]] for t in matched)
    ended = [t for t in matched if t["end"] is not None]
    end_ok = sum(t["end"] == label[t["face"]] for t in ended)
    still_ok_matched = sum(still_of[t["face"]] == label[t["face"]] for t in matched)
    still_ok_all = sum(still_of[k] == label[k] for k in label)
    lat = run["stats"].get("latency_ms") or {}
    fr_all = [sum(v[0] for v in frame_hits.values()), sum(v[1] for v in frame_hits.values())]
    fr_big = [sum(v[0] for k, v in frame_hits.items() if not k.startswith("<")),
              sum(v[1] for k, v in frame_hits.items() if not k.startswith("<"))]
    return {
        "detector": run["detector"], "reason": run["reason"],
        "faces": len(all_faces), "faces_min_face": len(big),
        "recall_pct": _pct(len(by_face), len(all_faces)),
        "recall_min_face_pct": _pct(sum(k in by_face for k in big), len(big)),
        "recall_by_size_pct": {k: _pct(v[1], v[0]) for k, v in sorted(sizes.items(), key=lambda kv: _order(kv[0]))},
        "faces_by_size": {k: v[0] for k, v in sorted(sizes.items(), key=lambda kv: _order(kv[0]))},
        "frame_recall_pct": _pct(fr_all[1], fr_all[0]),
        "frame_recall_min_face_pct": _pct(fr_big[1], fr_big[0]),
        "frame_recall_by_size_pct": {k: _pct(v[1], v[0]) for k, v in
                                     sorted(frame_hits.items(), key=lambda kv: _order(kv[0]))},
        "tracks": len(tracks), "false_tracks": false_tracks,
        "split_faces": sum(len(ts) > 1 for ts in by_face.values()),
        "new_accuracy_pct": _pct(new_ok, len(matched)),
        "end_accuracy_pct": _pct(end_ok, len(ended)),
        "still_accuracy_same_faces_pct": _pct(still_ok_matched, len(matched)),
        "still_accuracy_all_faces_pct": _pct(still_ok_all, len(label)),
        "matched_tracks": len(matched), "ended_tracks": len(ended),
        "detect_ms": _ms([c[2] for c in run["calls"]]),
        "per_face": [{"scene": si, "face": j, "file": faces[sf.face].path, "label": sf.label, "size": sf.size,
                      "background": plan.scenes[si].background, "tracks": len(by_face.get((si, j), [])),
                      "frames_found": face_frames.get((si, j), [0, 0])[1],
                      "frames_shown": face_frames.get((si, j), [0, 0])[0],
                      "new": [t["new"] for t in by_face.get((si, j), [])], "still": still_of[(si, j)]}
                     for si, j, sf in all_faces],
        "daemon_total_ms": {k: lat.get("total", {}).get(k) for k in ("p50_ms", "p95_ms")},
    }


def _order(bucket: str) -> int:
    return -1 if bucket.startswith("<") else int(bucket.lstrip(">=").split("-")[0])


# --- framing: where a detector's box sits on a FER-framed face ----------------------------------------------------------

def framing(faces: list[FaceImage], clf, backend: str, overrides: dict[str, str], seed: int = 2013,
            sizes: tuple[int, int] = (90, 170)) -> dict:
    """Paste each face alone on a plain frame, detect it, and compare the box with the pasted square.

    Returns the median geometry of the detector's box relative to the square (centre, width, height as fractions
    of its side) and the model's accuracy on the same found faces cropped from the true square, from the detector's
    box, and from the box with the landmarks' roll removed (YuNet): what edge.detect's framing constants and the
    alignment decision rest on.
    """
    from types import SimpleNamespace

    from edge.config import load_config
    from edge.detect import make_detector
    from edge.preprocess import crop_face

    cfg = load_config(None, overrides={**overrides, "detect.backend": backend, "detect.min_face": "1"}, env={})
    det = make_detector(cfg.detect)
    rng = np.random.default_rng(seed)
    size, margin, labels = clf.input_size, clf.margin, list(clf.labels)
    geo, right = [], {"truth": 0, "detector": 0, "aligned": 0}
    found = 0
    for fi in faces:
        s = int(rng.integers(sizes[0], sizes[1] + 1))
        x, y = int(rng.integers(10, 640 - s - 10)), int(rng.integers(10, 480 - s - 10))
        img = np.full((480, 640, 3), int(rng.integers(60, 200)), np.uint8)
        img[y:y + s, x:x + s] = cv2.resize(fi.gray, (s, s), interpolation=cv2.INTER_CUBIC)[..., None]
        boxes = [b for b in det.detect(img) if iou((b.x, b.y, b.w, b.h), (x, y, s, s)) >= 0.3]
        if not boxes:
            continue
        b = boxes[0]
        found += 1
        geo.append(((b.x + b.w / 2 - x) / s, (b.y + b.h / 2 - y) / s, b.w / s, b.h / s))
        crops = {"truth": crop_face(img, SimpleNamespace(x=x, y=y, w=s, h=s), size, margin),
                 "detector": crop_face(img, b, size, margin)}
        crops["aligned"] = align_crop(img, b, size, margin) if b.landmarks else crops["detector"]
        probs = clf.predict(np.stack(list(crops.values())))
        for k, pr in zip(crops, probs):
            right[k] += int(labels[int(np.argmax(pr))] == fi.label)
    med = np.median(np.asarray(geo), axis=0) if geo else [None] * 4
    return {"detector": det.name, "faces": len(faces), "found": found,
            "box_centre_x": _r(med[0]), "box_centre_y": _r(med[1]), "box_w": _r(med[2]), "box_h": _r(med[3]),
            "accuracy_on_found_pct": {k: _pct(v, found) for k, v in right.items()}}


def _r(v) -> Optional[float]:
    return None if v is None else round(float(v), 3)


def align_crop(image: np.ndarray, box, size: int, margin: float) -> np.ndarray:
    """The crop_face square of ``box`` with the face's roll (eye line) rotated away, for the alignment trial."""
    (rx, ry), (lx, ly) = box.landmarks[0], box.landmarks[1]
    angle = math.degrees(math.atan2(ly - ry, lx - rx))
    side = max(box.w, box.h) * (1.0 + margin)
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0
    m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    m[:, 2] += (side / 2.0 - cx, side / 2.0 - cy)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    n = max(1, int(round(side)))
    out = cv2.warpAffine(gray, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA if n > size else cv2.INTER_LINEAR)


# --- command -----------------------------------------------------------------------------------------------------------

def run_benchmark(args: argparse.Namespace) -> dict:
    from edge.classify import load_classifier
    from edge.config import parse_set_option

    overrides = dict(parse_set_option(s) for s in args.set)
    clf = load_classifier(args.model or None, threads=1)
    if args.framing:
        faces = load_faces(Path(args.data), list(clf.labels), args.framing, args.seed)
        return {"tool": "training.scenes --framing", "command": command_line(args), "data": str(args.data),
                "model": {"version": clf.version, "sha256": clf.sha256},
                "results": [framing(faces, clf, b, overrides, args.seed) for b in args.detector]}
    n_faces = args.scenes * 3
    faces = load_faces(Path(args.data), list(clf.labels), n_faces, args.seed)
    plan = plan_scenes(args.scenes, faces, width=args.width, height=args.height, fps=args.fps,
                       scene_s=args.scene_s, gap_s=args.gap_s, sizes=tuple(args.sizes), seed=args.seed,
                       jitter=args.jitter)
    still = still_predictions(clf, faces)
    results = []
    with tempfile.TemporaryDirectory(prefix="fer-scenes-") as tmp:
        video = Path(args.video) if args.video else Path(tmp) / "scenes.mp4"
        write_video(video, plan, faces)
        for backend in args.detector:
            ov = {**overrides, "detect.backend": backend}
            if args.model:
                ov["model.path"] = args.model
            t0 = time.monotonic()
            run = run_daemon(video, ov, tmp, plan.fps)
            cfg = run["cfg"]
            if run["detector"] != backend:
                log.warning("asked for %s, the daemon ran %s (%s)", backend, run["detector"], run["reason"])
            max_missed = cfg.track.max_missed_s
            r = score(plan, faces, still, run, cfg.detect.min_face, args.iou)
            r.update(backend=backend, wall_s=round(time.monotonic() - t0, 1),
                     settings={"detect_width": cfg.detect.detect_width, "fine_scale": cfg.detect.fine_scale,
                               "fine_tile": cfg.detect.fine_tile, "fine_angles": list(cfg.detect.fine_angles),
                               "min_face": cfg.detect.min_face,
                               "score_threshold": cfg.detect.score_threshold, "every_n": cfg.detect.every_n,
                               "max_missed_s": max_missed})
            results.append(r)
    gap = args.gap_s
    if gap <= max(r["settings"]["max_missed_s"] for r in results):
        log.warning("--gap-s %.1f is not longer than track.max_missed_s: tracks can bridge two scenes", gap)
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "tool": "training.scenes", "command": command_line(args),
        "data": str(args.data), "model": {"version": clf.version, "sha256": clf.sha256},
        "video": {"width": plan.width, "height": plan.height, "fps": plan.fps, "frames": plan.frames,
                  "scenes": len(plan.scenes), "faces": sum(len(s.faces) for s in plan.scenes),
                  "scene_s": args.scene_s, "gap_s": args.gap_s, "sizes": list(args.sizes), "seed": args.seed},
        "opencv": cv2.__version__, "loadavg_at_end": load, "results": results,
    }


def command_line(args: argparse.Namespace) -> str:
    import shlex

    parts = ["python", "-m", "training.scenes", "--data", str(args.data), "--scenes", str(args.scenes),
             "--sizes", *map(str, args.sizes), "--seed", str(args.seed), "--detector", *args.detector]
    for s in args.set:
        parts += ["--set", s]
    if args.model:
        parts += ["--model", args.model]
    if args.framing:
        parts += ["--framing", str(args.framing)]
    if args.jitter:
        parts.append("--jitter")
    return shlex.join(parts)


def format_table(report: dict) -> str:
    v = report["video"]
    lines = [f"scenes: {v['scenes']} scenes, {v['faces']} faces, {v['frames']} frames {v['width']}x{v['height']} at "
             f"{v['fps']:g} fps, sizes {v['sizes'][0]}-{v['sizes'][1]} px; model {report['model']['version']}; "
             f"opencv {report['opencv']}; load average at end {report['loadavg_at_end']}", ""]
    head = (f"{'detector':<8} {'recall':>6} {'>=min':>6} {'frames':>6} {'false':>5} {'split':>5} {'new acc':>7} "
            f"{'end acc':>7} {'still':>6} {'still*':>6} {'det p50/p95':>12} {'total p95':>9}")
    lines += [head, "-" * len(head)]
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    for r in report["results"]:
        d = r["detect_ms"]
        lines.append(f"{r['detector']:<8} {f(r['recall_pct']):>6} {f(r['recall_min_face_pct']):>6} "
                     f"{f(r['frame_recall_min_face_pct']):>6} {r['false_tracks']:>5} {r['split_faces']:>5} "
                     f"{f(r['new_accuracy_pct']):>7} {f(r['end_accuracy_pct']):>7} "
                     f"{f(r['still_accuracy_same_faces_pct']):>6} {f(r['still_accuracy_all_faces_pct']):>6} "
                     f"{f(d['p50_ms']) + '/' + f(d['p95_ms']):>12} {f(r['daemon_total_ms']['p95_ms']):>9}")
    lines += ["", "recall = faces with a track, % (>=min = faces of at least detect.min_face px); frames = face-frames "
              "(>= min_face) with a detection, %; false = tracks matching no face; split = faces with 2+ tracks;",
              "new/end acc = new-event emotion / end-summary dominant vs the label, % of matched tracks; still = the "
              "model on the same faces' original images, % (still* = all faces); ms per detect call / daemon frame",
              ""]
    for r in report["results"]:
        by = r["recall_by_size_pct"]
        fb = r["frame_recall_by_size_pct"]
        lines.append(f"{r['detector']} ({r['reason']}) recall by face size: " + ", ".join(
            f"{k} px {f(by[k])}% of {r['faces_by_size'][k]} (frames {f(fb.get(k))}%)" for k in by))
    lines += ["", f"reproduce: {report['command']}"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.scenes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Kaggle-layout folder of labelled faces "
                                                             "(default ../shared/data/fer2013/test)")
    p.add_argument("--scenes", type=int, default=60, help="number of scenes (1-3 faces each; default 60)")
    p.add_argument("--sizes", type=int, nargs=2, default=[40, 200], metavar=("MIN", "MAX"),
                   help="face side in pixels, drawn log-uniform (default 40 200)")
    p.add_argument("--detector", nargs="+", default=["yunet", "haar"], choices=("yunet", "haar"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="daemon config override, e.g. detect.detect_width=480 (repeatable)")
    p.add_argument("--model", default="", help="classifier .tflite (default: the bundled model)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--scene-s", type=float, default=4.0, help="seconds each scene is on screen (default 4)")
    p.add_argument("--gap-s", type=float, default=2.0,
                   help="seconds without faces between scenes; keep it > track.max_missed_s (default 2)")
    p.add_argument("--iou", type=float, default=0.3, help="minimum IoU of a track's box with its true face")
    p.add_argument("--seed", type=int, default=2013)
    p.add_argument("--video", default="", help="also keep the generated video at this path")
    p.add_argument("--jitter", action="store_true", help="vary each face's brightness and contrast")
    p.add_argument("--framing", type=int, default=0, metavar="N",
                   help="instead of scenes: N faces alone, each detector's box against the true square and the "
                        "model's accuracy on true, detector and roll-aligned crops")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-o", "--output", help="write the JSON report here")
    args = p.parse_args(argv)
    if not 1 <= args.scenes <= 10_000:
        p.error("--scenes must be 1..10000")
    if not 1.0 <= args.fps <= 120.0:
        p.error("--fps must be 1..120")
    if not 0.0 < args.iou <= 1.0:
        p.error("--iou must be in (0, 1]")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from edge.classify import ModelError
    from edge.config import ConfigError
    from edge.detect import DetectorError

    try:
        report = run_benchmark(args)
    except (ScenesError, ModelError, DetectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text if args.json or args.framing else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
