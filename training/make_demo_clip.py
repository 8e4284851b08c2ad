"""Make the bundled demo clip edge/data/demo.mp4 (+ ground truth edge/data/demo.json) from real FER-2013 test faces.

A 640x480, 10 fps, 32 s clip on a soft gradient background. Four "people" (tracks) enter and leave at different times,
drift slowly, at most three at once; the first one changes expression by cross-fading from a happy face to a surprised
one in place, so a tracker sees new / update / end events. Each face is chosen (fixed seed, deterministic) among the
test faces of its class that both the Haar cascade and YuNet find in the composed frame at every place it will be.

    python training/make_demo_clip.py [--shared ../shared] [--out edge/data]

Run once; the outputs are committed. Needs opencv-python-headless and ../shared (FER-2013 + the YuNet model).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from edge.detect import Box, DetectConfig, make_detector  # noqa: E402

log = logging.getLogger("make_demo_clip")

W, H, FPS, N_FRAMES = 640, 480, 10, 320
FADE = 3  # frames to fade a face in or out (entering/leaving)
SEED = 2013
YUNET = "models/face_detection_yunet_2026may.onnx"


@dataclass
class Track:
    """One person on screen: a box moving linearly from start to end, showing one or more faces."""

    tid: int
    first: int
    last: int
    size: int
    start_xy: tuple[int, int]
    end_xy: tuple[int, int]
    classes: list[str]  # one class per face shown; two = cross-fade from the first to the second
    xfade: tuple[int, int] | None = None  # frames over which face 0 blends into face 1
    files: list[Path] = field(default_factory=list)

    def box(self, f: int) -> tuple[int, int, int, int]:
        t = (f - self.first) / max(1, self.last - self.first)
        x = round(self.start_xy[0] + t * (self.end_xy[0] - self.start_xy[0]))
        y = round(self.start_xy[1] + t * (self.end_xy[1] - self.start_xy[1]))
        return x, y, self.size, self.size

    def alpha(self, f: int) -> float:
        if f < self.first or f > self.last:
            return 0.0
        return min(1.0, (f - self.first + 1) / FADE, (self.last - f + 1) / FADE)

    def mix(self, f: int) -> float:
        """Weight of the second face (0 before the cross-fade, 1 after)."""
        if self.xfade is None:
            return 0.0
        a, b = self.xfade
        return float(np.clip((f - a) / (b - a), 0.0, 1.0))


TRACKS = [
    Track(1, 10, 170, 180, (60, 50), (140, 90), ["happy", "surprise"], xfade=(80, 95)),
    Track(2, 50, 220, 160, (430, 260), (370, 230), ["sad"]),
    Track(3, 130, 280, 150, (70, 300), (170, 270), ["angry"]),
    Track(4, 190, 305, 190, (410, 20), (340, 30), ["neutral"]),
]


def background() -> np.ndarray:
    """A calm vertical gradient with a slight horizontal tint change (BGR)."""
    ys = np.linspace(0.0, 1.0, H)[:, None, None]
    xs = np.linspace(0.0, 1.0, W)[None, :, None]
    top = np.array([120, 105, 90], np.float32)
    bottom = np.array([170, 160, 150], np.float32)
    img = top + (bottom - top) * ys + np.array([-12, 0, 12], np.float32) * (xs - 0.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def soft_mask(size: int) -> np.ndarray:
    """Rectangle with feathered edges so the pasted face blends into the background."""
    m = np.zeros((size, size), np.float32)
    inset = max(2, size // 14)
    m[inset:-inset, inset:-inset] = 1.0
    k = (size // 8) | 1
    return cv2.GaussianBlur(m, (k, k), 0)


def load_face(path: Path, size: int) -> np.ndarray:
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise SystemExit(f"cannot read {path}")
    up = cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(up, cv2.COLOR_GRAY2BGR).astype(np.float32)


def paste(frame: np.ndarray, face: np.ndarray, box, alpha: float) -> None:
    x, y, w, h = box
    a = soft_mask(w)[..., None] * alpha
    roi = frame[y:y + h, x:x + w].astype(np.float32)
    frame[y:y + h, x:x + w] = np.clip(roi * (1 - a) + face * a, 0, 255).astype(np.uint8)


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / float(aw * ah + bw * bh - inter)


def found(boxes: list[Box], gt) -> bool:
    return any(iou((b.x, b.y, b.w, b.h), gt) >= 0.3 for b in boxes)


def detectable(face: np.ndarray, track: Track, detectors, bg: np.ndarray) -> bool:
    """The face alone on the background is found (and nothing else) at the track's first, middle and last place."""
    for f in (track.first, (track.first + track.last) // 2, track.last):
        frame = bg.copy()
        gt = track.box(f)
        paste(frame, face, gt, 1.0)
        for det in detectors:
            boxes = det.detect(frame)
            if len(boxes) != 1 or not found(boxes, gt):
                return False
    return True


def choose_faces(fer: Path, detectors, rng: np.random.Generator, bg: np.ndarray) -> None:
    used: set[Path] = set()
    for track in TRACKS:
        for cls in track.classes:
            cands = sorted((fer / "test" / cls).glob("*.jpg"))
            for i in rng.permutation(len(cands)):
                p = cands[i]
                if p in used or not detectable(load_face(p, track.size), track, detectors, bg):
                    continue
                track.files.append(p)
                used.add(p)
                break
            else:
                raise SystemExit(f"no detectable {cls} face found in {fer / 'test' / cls}")
        if track.xfade:
            # The half-way blend must still look like a face to the detectors.
            faces = [load_face(p, track.size) for p in track.files]
            blend = faces[0] * 0.5 + faces[1] * 0.5
            if not detectable(blend, track, detectors, bg):
                log.warning("track %d: 50%% blend of the two faces is not always detected", track.tid)
        log.info("track %d: %s", track.tid, ", ".join(str(p.relative_to(fer)) for p in track.files))


def render(bg: np.ndarray) -> list[np.ndarray]:
    faces = {t.tid: [load_face(p, t.size) for p in t.files] for t in TRACKS}
    frames = []
    for f in range(N_FRAMES):
        frame = bg.copy()
        for t in TRACKS:
            alpha = t.alpha(f)
            if alpha <= 0:
                continue
            m = t.mix(f)
            face = faces[t.tid][0] if m == 0 else faces[t.tid][0] * (1 - m) + faces[t.tid][1] * m
            paste(frame, face, t.box(f), alpha)
        frames.append(frame)
    return frames


def write_clip(frames: list[np.ndarray], out_dir: Path) -> Path:
    """Write mp4v .mp4; fall back to MJPG .avi when this OpenCV build cannot write or read it back."""
    for name, fourcc in (("demo.mp4", "mp4v"), ("demo.avi", "MJPG")):
        path = out_dir / name
        vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (W, H))
        if not vw.isOpened():
            log.warning("cannot write %s with %s", path, fourcc)
            continue
        for fr in frames:
            vw.write(fr)
        vw.release()
        cap = cv2.VideoCapture(str(path))
        n = 0
        while cap.read()[0]:
            n += 1
        cap.release()
        if n == len(frames):
            for other in out_dir.glob("demo.*"):
                if other.suffix in (".mp4", ".avi") and other != path:
                    other.unlink()
            return path
        log.warning("%s reads back %d of %d frames; trying the next format", path, n, len(frames))
        path.unlink(missing_ok=True)
    raise SystemExit("OpenCV can write neither mp4v/.mp4 nor MJPG/.avi")


def ground_truth(fer: Path, clip: Path) -> dict:
    tracks = []
    faces = []
    for t in TRACKS:
        full = [f for f in range(t.first, t.last + 1) if t.alpha(f) >= 1.0]
        tracks.append({
            "track": t.tid,
            "frames": [t.first, t.last],  # visible at all (fading in/out at the ends)
            "frames_full": [full[0], full[-1]],  # fully opaque: a detector should find it
            "boxes": [list(t.box(f)) for f in range(t.first, t.last + 1)],  # [x, y, w, h] per frame from "first"
        })
        for i, (p, cls) in enumerate(zip(t.files, t.classes)):
            if t.xfade is None:
                rng = [t.first, t.last]
            elif i == 0:
                rng = [t.first, t.xfade[1] - 1]
            else:
                rng = [t.xfade[0] + 1, t.last]
            faces.append({"track": t.tid, "file": str(p.relative_to(fer)), "class": cls, "frames": rng})
    changes = [{"track": t.tid, "from": t.classes[0], "to": t.classes[1], "frames": list(t.xfade)}
               for t in TRACKS if t.xfade]
    return {
        "clip": clip.name, "width": W, "height": H, "fps": FPS, "frames": N_FRAMES, "seed": SEED,
        "source": "FER-2013 PublicTest faces (48x48 gray), upscaled with INTER_CUBIC",
        "generator": "training/make_demo_clip.py",
        "faces": faces, "expression_changes": changes, "tracks": tracks,
    }


def detection_rates(clip: Path, gt: dict, detectors) -> dict:
    """Per detector: share of fully visible faces found (IoU >= 0.3) and false positives per frame, on the decoded clip."""
    cap = cv2.VideoCapture(str(clip))
    hits = {d.name: 0 for d in detectors}
    fps_ = {d.name: 0 for d in detectors}
    total = f = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        present = [t["boxes"][f - t["frames"][0]] for t in gt["tracks"]
                   if t["frames_full"][0] <= f <= t["frames_full"][1]]
        total += len(present)
        for d in detectors:
            boxes = d.detect(frame)
            hits[d.name] += sum(found(boxes, g) for g in present)
            # Faces fading in/out are neither required nor false positives.
            visible = [t["boxes"][f - t["frames"][0]] for t in gt["tracks"] if t["frames"][0] <= f <= t["frames"][1]]
            fps_[d.name] += sum(not any(iou((b.x, b.y, b.w, b.h), g) >= 0.3 for g in visible) for b in boxes)
        f += 1
    cap.release()
    return {d.name: {"recall": round(hits[d.name] / total, 4), "false_positives_per_frame": round(fps_[d.name] / f, 4)}
            for d in detectors} | {"faces_checked": total, "frames": f, "opencv": cv2.__version__}


def dump_json(gt: dict) -> str:
    """Readable but compact: one line per top-level key, per face and per track."""
    lines = []
    for k, v in gt.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            items = ",\n".join("  " + json.dumps(x, separators=(",", ":")) for x in v)
            lines.append(f" {json.dumps(k)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding data/fer2013 and models/")
    ap.add_argument("--out", type=Path, default=REPO / "edge" / "data", help="output folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fer = args.shared / "data" / "fer2013"
    model = args.shared / YUNET
    if not fer.is_dir() or not model.is_file():
        raise SystemExit(f"need {fer} and {model} (../shared beside the repo)")
    args.out.mkdir(parents=True, exist_ok=True)
    detectors = [make_detector(DetectConfig(backend="haar")),
                 make_detector(DetectConfig(backend="yunet", model_path=str(model)))]
    bg = background()
    choose_faces(fer, detectors, np.random.default_rng(SEED), bg)
    clip = write_clip(render(bg), args.out)
    gt = ground_truth(fer, clip)
    gt["detection"] = detection_rates(clip, gt, detectors)
    (args.out / "demo.json").write_text(dump_json(gt))
    log.info("wrote %s (%.0f kB, %d frames, %.1f s) and demo.json", clip, clip.stat().st_size / 1024, N_FRAMES,
             N_FRAMES / FPS)
    log.info("detection on the decoded clip: %s", json.dumps(gt["detection"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
