"""Per-face tracking: IoU association across frames, smoothed emotion scores, new/update/end events.

A detection that does not overlap an existing track starts a tentative track; after `min_hits` matched frames it is
confirmed and emits "new". Confirmed tracks emit "update" when the smoothed dominant emotion changes (at most every
`min_update_gap_s`) or every `update_interval_s`, and "end" (with a summary) once unseen for more than `max_missed_s`.
Tentative tracks that expire are dropped without events. The config object is read on every call, so live changes
to it take effect immediately.

``select`` decides, before classification, which of a frame's faces the classifier sees: new and tentative faces
always (their first frames decide "new"), confirmed ones in turns, least recently classified first, so a frame
costs at most ``limit`` classifications once its faces are known (``model.max_faces_per_frame``). A face left out
keeps its box up to date and its smoothed scores as they were.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Optional

import numpy as np

from edge.detect import Box

log = logging.getLogger(__name__)


@dataclass
class TrackConfig:
    iou_threshold: float = 0.3  # minimum box overlap to continue a track
    min_hits: int = 3  # matched frames before a face is confirmed ("new")
    max_missed_s: float = 1.0  # seconds unseen before "end"
    smoothing: float = 0.6  # EMA weight of history (0 = raw per-frame scores)
    update_interval_s: float = 5.0  # periodic "update" even if unchanged (0 = only on change)
    min_update_gap_s: float = 0.5  # minimum seconds between events of one face when the emotion flips

    def validate(self) -> None:
        """Raise ValueError("<field>: ...") for values the tracker cannot work with."""
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold: {self.iou_threshold} must be in (0, 1] (default 0.3)")
        if not 1 <= self.min_hits <= 1000:
            raise ValueError(f"min_hits: {self.min_hits} must be 1..1000 (1 = report faces on first sight)")
        if not 0 < self.max_missed_s <= 3600:
            raise ValueError(f"max_missed_s: {self.max_missed_s} must be in (0, 3600] seconds (default 1.0)")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing: {self.smoothing} must be in [0, 1) (0 = no smoothing)")
        if not 0 <= self.update_interval_s <= 86_400:
            raise ValueError(f"update_interval_s: {self.update_interval_s} must be 0..86400 s (0 = only on change)")
        if not 0 <= self.min_update_gap_s <= 3600:
            raise ValueError(f"min_update_gap_s: {self.min_update_gap_s} must be 0..3600 s")


@dataclass
class TrackEvent:
    type: str  # "new" | "update" | "end"
    face_id: str
    bbox: Box
    scores: dict[str, float]  # smoothed, one per label
    emotion: str
    confidence: float
    first_seen: float
    last_seen: float
    duration_s: float
    summary: Optional[dict] = None  # only for "end"


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


class _Track:
    __slots__ = ("face_id", "box", "first_seen", "last_seen", "hits", "ema", "prob_sum", "label_time",
                 "label_frames", "last_emit", "emitted_emotion", "classified", "classified_at")

    def __init__(self, box: Box, probs: np.ndarray, ts: float, seq: int = 0) -> None:
        self.face_id: Optional[str] = None  # assigned on confirmation
        self.box = box
        self.first_seen = ts
        self.last_seen = ts
        self.hits = 1
        self.ema = probs.astype(np.float64)
        self.prob_sum = probs.astype(np.float64)
        self.label_time = np.zeros(len(probs))
        self.label_frames = np.zeros(len(probs))
        self.label_frames[int(np.argmax(self.ema))] += 1
        self.last_emit = ts
        self.emitted_emotion = -1
        self.classified = 1  # observations that carried the classifier's scores (the others only moved the box)
        self.classified_at = seq  # Tracker frame number of the latest of them: who is next in select()

    def observe(self, box: Box, probs: np.ndarray | None, ts: float, smoothing: float, seq: int = 0) -> None:
        # Time since the previous observation counts for the emotion that was dominant during it.
        self.label_time[int(np.argmax(self.ema))] += max(0.0, ts - self.last_seen)
        if probs is not None:
            self.ema = smoothing * self.ema + (1.0 - smoothing) * probs
            self.prob_sum += probs
            self.classified += 1
            self.classified_at = seq
        self.label_frames[int(np.argmax(self.ema))] += 1
        self.box = box
        self.last_seen = ts
        self.hits += 1

    def shift(self, delta: float) -> None:
        self.first_seen += delta
        self.last_seen += delta
        self.last_emit += delta


class Tracker:
    """Greedy-IoU face tracker turning per-frame (box, probabilities) into face events."""

    def __init__(self, cfg: TrackConfig, labels: list[str]) -> None:
        if len(labels) < 2:
            raise ValueError(f"tracker needs at least 2 labels, got {labels!r}")
        self.cfg = cfg
        self.labels = list(labels)
        self._tracks: list[_Track] = []
        self._counter = 0
        self._frame = 0  # update() calls: the clock of select()'s turns
        self._last_ts: Optional[float] = None

    @property
    def active(self) -> int:
        """Confirmed faces currently tracked."""
        return sum(1 for t in self._tracks if t.face_id is not None)

    def tracks(self) -> list[tuple[str, Box]]:
        """(face_id, last box) of the confirmed tracks."""
        return [(t.face_id, t.box) for t in self._tracks if t.face_id is not None]

    def select(self, boxes: list[Box], ts: float, limit: int) -> tuple[list[bool], np.ndarray]:
        """Which of this frame's ``boxes`` to classify, before ``update(boxes, probs, ts, fresh)`` is fed them.

        A box that starts a track or continues a tentative one is always classified; boxes of confirmed tracks
        take turns, least recently classified first, within ``limit`` classifications for the frame (0 = every
        box). Returns (fresh, prior): per box whether to classify it, and (N, n_labels) the smoothed scores of
        the track a box continues (zeros for a new face), for a box left out. Changes nothing."""
        prior = np.zeros((len(boxes), len(self.labels)), dtype=np.float32)
        if limit <= 0:
            return [True] * len(boxes), prior
        live = [t for t in self._tracks if ts - t.last_seen <= self.cfg.max_missed_s]  # what update() keeps
        match = self._match(live, boxes)
        fresh = [di not in match or live[match[di]].face_id is None for di in range(len(boxes))]
        turns = sorted((live[ti].classified_at, di) for di, ti in match.items() if not fresh[di])
        for _, di in turns[:max(0, limit - sum(fresh))]:
            fresh[di] = True
        for di, ti in match.items():
            prior[di] = live[ti].ema
        return fresh, prior

    def update(self, boxes: list[Box], probs: np.ndarray, ts: float, fresh: list[bool] | None = None) -> list[TrackEvent]:
        """Feed one detection frame: boxes with their class probabilities (N, n_labels) at time ts. ``fresh``
        (from ``select``): which rows the classifier produced this frame; the others only move their track's
        box (a row is still needed: a box that no longer continues a track starts one with it)."""
        probs = np.asarray(probs, dtype=np.float64)
        if len(boxes) == 0:
            probs = probs.reshape(0, len(self.labels))
        if probs.shape != (len(boxes), len(self.labels)):
            raise ValueError(f"probs shape {probs.shape} does not match {len(boxes)} boxes x "
                             f"{len(self.labels)} labels")
        if not np.all(np.isfinite(probs)):
            raise ValueError("probs contain NaN/inf")
        if fresh is not None and len(fresh) != len(boxes):
            raise ValueError(f"fresh has {len(fresh)} flags for {len(boxes)} boxes")
        ts = self._clock(ts)
        cfg = self.cfg
        events = self._expire(ts)
        self._frame += 1

        match = self._match(self._tracks, boxes)
        for di, ti in match.items():  # in pairing order, as events were always emitted
            t = self._tracks[ti]
            t.observe(boxes[di], probs[di] if fresh is None or fresh[di] else None, ts, cfg.smoothing, self._frame)
            ev = self._after_observe(t, ts)
            if ev is not None:
                events.append(ev)
        for di, b in enumerate(boxes):
            if di not in match:
                t = _Track(b, probs[di], ts, self._frame)
                self._tracks.append(t)
                ev = self._after_observe(t, ts)
                if ev is not None:
                    events.append(ev)
        return events

    def predict_only(self, ts: float) -> list[TrackEvent]:
        """A frame without detection: keep tracks at their last boxes, end those unseen too long."""
        return self._expire(self._clock(ts))

    def flush(self, ts: float) -> list[TrackEvent]:
        """End every confirmed track (shutdown); tentative ones are dropped."""
        self._clock(ts)
        events = [self._event("end", t) for t in self._tracks if t.face_id is not None]
        self._tracks = []
        return events

    # ---- internals --------------------------------------------------------------------------------------------

    def _match(self, tracks: list[_Track], boxes: list[Box]) -> dict[int, int]:
        """Greedy IoU association: box index -> track index, highest overlap first; ties by track age then
        detection order, so select() and update() pair the same boxes with the same tracks."""
        pairs = []
        for ti, t in enumerate(tracks):
            for di, b in enumerate(boxes):
                v = iou(t.box, b)
                if v >= self.cfg.iou_threshold:
                    pairs.append((-v, ti, di))
        pairs.sort()
        used_t, match = set(), {}
        for _, ti, di in pairs:
            if ti in used_t or di in match:
                continue
            used_t.add(ti)
            match[di] = ti
        return match

    def _clock(self, ts: float) -> float:
        # Wall clocks jump back (NTP on a Pi without RTC). Rebase the tracks so durations and timeouts stay sane.
        if self._last_ts is not None and ts < self._last_ts:
            delta = ts - self._last_ts
            if delta < -1.0:
                log.warning("clock went back %.1f s; shifting %d open tracks", -delta, len(self._tracks))
            for t in self._tracks:
                t.shift(delta)
        self._last_ts = ts
        return ts

    def _expire(self, ts: float) -> list[TrackEvent]:
        events, keep = [], []
        for t in self._tracks:
            if ts - t.last_seen > self.cfg.max_missed_s:
                if t.face_id is not None:
                    events.append(self._event("end", t))
            else:
                keep.append(t)
        self._tracks = keep
        return events

    def _after_observe(self, t: _Track, ts: float) -> Optional[TrackEvent]:
        cfg = self.cfg
        dominant = int(np.argmax(t.ema))
        if t.face_id is None:
            if t.hits < cfg.min_hits:
                return None
            self._counter += 1
            t.face_id = f"{self._counter:x}-{secrets.token_hex(2)}"
            kind = "new"
        elif dominant != t.emitted_emotion and ts - t.last_emit >= cfg.min_update_gap_s:
            kind = "update"
        elif cfg.update_interval_s > 0 and ts - t.last_emit >= cfg.update_interval_s:
            kind = "update"
        else:
            return None
        t.last_emit = ts
        t.emitted_emotion = dominant
        return self._event(kind, t)

    def _event(self, kind: str, t: _Track) -> TrackEvent:
        dominant = int(np.argmax(t.ema))
        scores = {lab: float(v) for lab, v in zip(self.labels, t.ema)}
        summary = None
        if kind == "end":
            mean = t.prob_sum / t.classified
            total = float(t.label_time.sum())
            share = t.label_time / total if total > 0 else t.label_frames / t.label_frames.sum()
            # Most time spent in; ties (e.g. equal frame counts) go to the higher mean score.
            best = max(range(len(self.labels)), key=lambda i: (round(float(share[i]), 9), mean[i]))
            summary = {
                "dominant": self.labels[best],
                "mean_scores": {lab: float(v) for lab, v in zip(self.labels, mean)},
                "time_share": {lab: float(v) for lab, v in zip(self.labels, share)},
                "frames": int(t.hits),
            }
        return TrackEvent(type=kind, face_id=t.face_id, bbox=t.box, scores=scores, emotion=self.labels[dominant],
                          confidence=float(t.ema[dominant]), first_seen=t.first_seen, last_seen=t.last_seen,
                          duration_s=max(0.0, t.last_seen - t.first_seen), summary=summary)
