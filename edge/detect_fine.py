"""Fine search: small faces found at full resolution for about the cost of one small detector call a frame.

The coarse pass (the whole frame downscaled to ``detect.detect_width``) misses faces that shrink to ~30 px in it
(a 60 px face at width 320 of 640), and detecting the whole frame at full resolution costs 3-4x as much. The fine
search adds small, bounded detector calls:

* a **sweep**: each frame, one ``detect.fine_tile``-pixel square tile of the frame, taken at ``detect.fine_scale``
  (1 = source resolution), in rotation, so the whole frame is searched at the fine scale every few frames
  (``tiles()``; 9 tiles at 640x480) at a constant cost per frame - a new small face is found within one sweep;
* **re-detection** around every face the detector returned recently and the coarse pass missed on this frame: a
  window of ``ROI_CONTEXT`` face sides scaled to ``ROI_INPUT`` pixels (small faces enlarged up to
  ``ROI_MAX_SCALE``), so a small face, once found, is found on every frame, not only when the sweep passes over it;
* **proposals**: a coarse or sweep box scoring between ``PROPOSAL_SCORE`` and ``detect.score_threshold`` is not a
  face yet, but gets one such window on the next frame (at most ``MAX_PROPOSALS`` a frame), where the enlarged
  face either passes the threshold or is dropped - a two-stage cascade on the faces the coarse pass half sees.

Each pass keeps one fixed input size (a net per size: switching sizes costs as much as a small detection).
Detections of all passes are merged by non-maximum suppression (``merge``; a face cut by a tile's edge is part of
the whole face's box, ``same_face``), and a cut face the coarse pass missed is seen whole in its window next frame. The state (which tile is next, which
faces to look for again) lives in one ``FineSearch`` per detector, so two daemons never share it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

ROI_CONTEXT = 2.0  # re-detection window side, in face sides: room for a frame's movement and the detector's context
ROI_INPUT = 144  # the window's side at the detector (one fixed input size): a face of up to ~72 px, which YuNet
ROI_MAX_SCALE = 2.0  # finds nearly always; small faces are enlarged at most this much (enlarging more adds nothing)
ROI_HOLD = 2  # keep looking for a face this many frames after it was last found (a blink, a turned head)
# Neighbouring tiles share this fraction of a tile: a face up to that size (64 px of a 256 tile) is whole in one;
# larger faces are the coarse pass's. A quarter, not a third, makes 9 tiles of 640x480 instead of 12, so the sweep
# returns to a face within 0.9 s at 10 fps, inside track.max_missed_s: a face only the sweep sees can be
# confirmed (scene benchmark, 150 scenes: 88.3% of faces >= 48 px found instead of 86.0%; model card).
TILE_OVERLAP = 0.25
MERGE_IOU = 0.3  # boxes of two passes overlapping this much are the same face (edge.track's default match)
MERGE_COVER = 0.6  # ... and so is a box lying this much inside another (a face cut by a tile's edge)
MIN_REGION_PX = 24  # a window smaller than this at its scale holds no findable face
PROPOSAL_SCORE = 0.3  # a coarse or sweep box scoring this (below detect.score_threshold) is looked at again ...
MAX_PROPOSALS = 2  # ... in a re-detection window on the next frame, at most this many a frame (best first)
PROPOSAL_MIN_FACE = 0.75  # ... if its side is at least this fraction of detect.min_face
# A sweep (all tiles at all rolls) longer than this many frames (3 s at 10 fps) comes back to a face so rarely that
# rolls cost more faces than they find (fine_tile 160 at 640x480: 20 tiles x 3 rolls, 84.0% of the 60 scenes' faces
# against 87.7% upright; model card): say so once.
SWEEP_WARN_FRAMES = 30

@dataclass
class _Seen:
    box: object  # edge.detect.Box in source pixels
    misses: int = 0


def iou(a, b) -> float:
    """Intersection over union of two boxes (edge.track.iou's measure; edge.track imports edge.detect, so
    importing it here would be circular)."""
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


def tiles(width: int, height: int, side: float) -> list[tuple[int, int, int, int]]:
    """Square tiles (x0, y0, x1, y1) of ``side`` source pixels covering the frame with TILE_OVERLAP, row by row."""
    def starts(extent: int) -> list[int]:
        if side >= extent:
            return [0]
        step = side * (1.0 - TILE_OVERLAP)
        n = math.ceil((extent - side) / step) + 1
        return [round(i * (extent - side) / (n - 1)) for i in range(n)]

    s = int(round(side))
    return [(x, y, min(width, x + s), min(height, y + s)) for y in starts(height) for x in starts(width)]


def same_face(a, b) -> bool:
    """Two boxes of one face: they overlap by MERGE_IOU, or the smaller lies mostly inside the larger."""
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    small = min(a.w * a.h, b.w * b.h)
    return iou(a, b) >= MERGE_IOU or (small > 0 and inter / small >= MERGE_COVER)


def merge(boxes: list) -> list:
    """Non-maximum suppression across passes: the highest-scoring box of each group of boxes of one face."""
    kept: list = []
    for b in sorted(boxes, key=lambda b: b.score, reverse=True):
        if not any(same_face(b, k) for k in kept):
            kept.append(b)
    return kept


class FineSearch:
    """Per-detector state of the fine search; ``search`` is called once per frame after the coarse pass.

    ``detect_region(image, (x0, y0, x1, y1), scale, pad_to, angle)`` runs the detector on that source rectangle resized
    by ``scale`` (padded to a ``pad_to`` square: one input size per pass) and returns Boxes in source pixels
    (edge.detect.Detector._detect_region).
    """

    def __init__(self, fine_scale: float, fine_tile: int, max_faces: int,
                 detect_region: Callable[..., list], threshold: float = 0.6, min_face: int = 1,
                 angles=(0.0,)):
        self.scale = fine_scale
        self.tile_px = fine_tile
        self.max_faces = max_faces
        self.threshold = threshold
        self.min_face = min_face
        self.angles = tuple(float(a) for a in angles) or (0.0,)
        self._detect_region = detect_region
        self._seen: list[_Seen] = []
        self._proposals: list = []
        self._next_tile = 0
        self._tiles: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
        self.calls = 0  # detector calls made by the fine search (tests, diagnostics)

    def tiles_for(self, width: int, height: int) -> list[tuple[tuple[int, int, int, int], float]]:
        """The sweep's schedule: (tile, roll) pairs, every tile at the first roll, then at the next."""
        key = (width, height)
        if key not in self._tiles:
            grid = tiles(width, height, self.tile_px / self.scale) if self.tile_px else []
            self._tiles = {key: [(t, a) for a in self.angles for t in grid]}
            if len(self.angles) > 1 and len(grid) * len(self.angles) > SWEEP_WARN_FRAMES:
                log.warning("detect: the fine search's sweep takes %d frames at %dx%d (%d tiles of %d px x %d rolls), "
                            "so it rarely comes back to a face; set detect.fine_angles = [0] with this fine_tile, "
                            "or a larger fine_tile", len(grid) * len(self.angles), width, height, len(grid),
                            self.tile_px, len(self.angles))
        return self._tiles[key]

    def search(self, image, coarse: list, proposals: list = ()) -> list:
        """All faces of this frame: ``coarse`` (source-pixel Boxes of the coarse pass scoring at least the
        threshold) plus what the fine passes find, merged. ``proposals``: the coarse pass's boxes that scored
        between PROPOSAL_SCORE and the threshold, looked at closer on the next frame."""
        h, w = image.shape[:2]
        found = list(coarse)
        windows = [s.box for s in self._seen if not any(same_face(s.box, c) for c in coarse)]  # lost by coarse
        windows += [b for b in self._proposals if not any(same_face(b, k) for k in found + windows)]
        for b in windows:
            side = ROI_CONTEXT * max(b.w, b.h)
            scale = min(ROI_MAX_SCALE, ROI_INPUT / side)
            cx, cy = b.x + b.w / 2.0, b.y + b.h / 2.0
            rect = (max(0, int(cx - side / 2)), max(0, int(cy - side / 2)), min(w, int(math.ceil(cx + side / 2))),
                    min(h, int(math.ceil(cy + side / 2))))
            if min(rect[2] - rect[0], rect[3] - rect[1]) * scale >= MIN_REGION_PX:
                found += [d for d in self._detect_region(image, rect, scale, ROI_INPUT, getattr(b, "angle", 0.0))
                      if d.score >= self.threshold]
                self.calls += 1
        weak = list(proposals)
        grid = self.tiles_for(w, h)
        if grid:
            rect, angle = grid[self._next_tile % len(grid)]
            self._next_tile = (self._next_tile + 1) % len(grid)
            for d in self._detect_region(image, rect, self.scale, self.tile_px, angle):
                (found if d.score >= self.threshold else weak).append(d)
            self.calls += 1
        found = merge(found)
        weak = [b for b in merge(weak) if max(b.w, b.h) >= PROPOSAL_MIN_FACE * self.min_face
                and not any(same_face(b, k) for k in found)]
        self._proposals = weak[:MAX_PROPOSALS]
        return found

    def remember(self, final: list) -> None:
        """The boxes the detector returned this frame: look for them again next frame, and for the ones that
        vanished for ROI_HOLD more frames."""
        seen = [_Seen(b) for b in final]
        for old in self._seen:
            if old.misses < ROI_HOLD and not any(same_face(old.box, b) for b in final):
                seen.append(_Seen(old.box, old.misses + 1))
        self._seen = seen[: 2 * self.max_faces]

    def reset(self) -> None:
        self._seen = []
        self._proposals = []
        self._next_tile = 0
