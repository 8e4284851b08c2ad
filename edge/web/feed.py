"""The hand-over between the frame loop and the web server threads.

The loop calls the ``on_*``/``publish_state`` methods: each stores references under a lock held for
microseconds and never waits for a reader. Images are neither copied nor encoded here: the server
encodes the latest preview frame in its own thread, at most ``preview_fps`` times a second.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np

STATE_INTERVAL_S = 0.5  # the page polls once a second; the loop computes stats at most this often


class Feed:
    def __init__(self, preview: bool, preview_fps: float, events: int, stale_s: float):
        self.preview = preview
        self.stale_s = stale_s
        self._preview_interval = 1.0 / preview_fps
        self._lock = threading.Lock()
        self._new_frame = threading.Condition(self._lock)
        self.started_mono = time.monotonic()
        self._last_frame_mono: Optional[float] = None
        self.faces_classified = 0  # loop thread only writes; an int read is atomic
        self._scores: dict[str, np.ndarray] = {}  # face id -> latest per-frame probabilities
        self._faces: list[tuple[str, Any, Optional[np.ndarray]]] = []
        self._labels: Sequence[str] = ()
        self._stats: Optional[dict] = None
        self._next_state = 0.0
        self._events: collections.deque = collections.deque(maxlen=events)
        self._frame: Optional[tuple] = None  # (seq, image, faces, labels, epoch)
        self._seq = 0
        self._next_preview = 0.0
        self.stop_reason: Optional[str] = None

    # --- loop side -------------------------------------------------------------------------------

    def on_frame(self, image: np.ndarray, epoch: float, tracks, kept: Sequence, probs, labels: Sequence[str],
                 classified: Optional[int] = None) -> None:
        """A processed frame: ``tracks`` = tracker.tracks(), ``kept``/``probs`` = the frame's boxes and their
        scores, ``classified`` = how many of them the classifier ran on (default: all; the others, with
        model.max_faces_per_frame, carry their track's smoothed scores)."""
        now = time.monotonic()
        row_of = {id(b): i for i, b in enumerate(kept)} if probs is not None else {}
        scores = {}
        faces = []
        for fid, box in tracks:
            i = row_of.get(id(box))  # the tracker keeps the very Box object it was given for a matched face
            row = probs[i] if i is not None and i < len(probs) else self._scores.get(fid)
            if row is not None:
                scores[fid] = row
            faces.append((fid, box, row))
        self.faces_classified += (len(kept) if classified is None else classified) if probs is not None else 0
        with self._lock:
            self._last_frame_mono = now
            self._scores = scores
            self._faces = faces
            self._labels = labels
            if self.preview and now >= self._next_preview:
                self._next_preview = now + self._preview_interval
                self._seq += 1
                self._frame = (self._seq, image, faces, labels, epoch)
                self._new_frame.notify_all()

    def state_due(self, now: float) -> bool:
        return now >= self._next_state

    def publish_state(self, stats: dict, now: float) -> None:
        self._next_state = now + STATE_INTERVAL_S
        with self._lock:
            self._stats = stats

    def on_event(self, payload: dict) -> None:
        with self._lock:
            self._events.append(payload)

    def stopping(self, reason: str) -> None:
        with self._lock:
            self.stop_reason = reason
            self._new_frame.notify_all()

    # --- server side -----------------------------------------------------------------------------

    def health(self, source: Optional[dict] = None) -> tuple[bool, str]:
        """(frames flow, why not / how): frames flow when one was processed within ``stale_s``."""
        now = time.monotonic()
        with self._lock:
            last, reason, stats = self._last_frame_mono, self.stop_reason, self._stats
        src = (stats or {}).get("source") or {}
        where = f"source {src.get('name') or '?'}"
        if src and not src.get("connected"):
            where += f" disconnected ({src.get('reconnects', 0)} reconnects)"
        if reason is not None:
            return False, f"stopping: {reason}"
        if last is None:
            return False, f"starting: no frame yet after {now - self.started_mono:.1f} s ({where})"
        age = now - last
        if age > self.stale_s:
            return False, f"no frame for {age:.1f} s (limit {self.stale_s:g} s; {where})"
        return True, f"last frame {age:.2f} s ago"

    def last_frame_age(self) -> Optional[float]:
        last = self._last_frame_mono
        return None if last is None else time.monotonic() - last

    def stats(self) -> Optional[dict]:
        with self._lock:
            return self._stats

    def faces(self) -> list[dict]:
        with self._lock:
            faces, labels = self._faces, self._labels
        return [face_dict(fid, box, row, labels) for fid, box, row in faces]

    def events(self, limit: int, after: float = 0.0) -> list[dict]:
        with self._lock:
            evs = list(self._events)
        if after:
            evs = [e for e in evs if e.get("epoch", 0) > after]
        return evs[-limit:] if limit else []

    def wait_frame(self, after_seq: int, timeout: float) -> Optional[tuple]:
        """The newest preview frame newer than ``after_seq``, waiting up to ``timeout``; None if none came."""
        deadline = time.monotonic() + timeout
        with self._new_frame:
            while (self._frame is None or self._frame[0] <= after_seq) and self.stop_reason is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._new_frame.wait(left)
            return self._frame if self._frame is not None and self._frame[0] > after_seq else None

    def latest_frame(self) -> Optional[tuple]:
        with self._lock:
            return self._frame


def face_dict(fid: str, box, row: Optional[np.ndarray], labels: Sequence[str]) -> dict:
    out: dict[str, Any] = {"face_id": fid, "bbox": {"x": int(box.x), "y": int(box.y), "w": int(box.w), "h": int(box.h)},
                           "emotion": None, "confidence": None, "scores": {}}
    if row is not None and len(row) == len(labels):
        k = int(np.argmax(row))
        out.update(emotion=labels[k], confidence=round(float(row[k]), 4),
                   scores={lab: round(float(v), 4) for lab, v in zip(labels, row)})
    return out
